"""`d2moe train-router` (being built)."""

import typer


def register(app: typer.Typer) -> None:
    pass
