"""`d2moe inspect` (being built)."""

import typer


def register(app: typer.Typer) -> None:
    pass
