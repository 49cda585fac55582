"""`d2moe pack` (being built)."""

import typer


def register(app: typer.Typer) -> None:
    pass
