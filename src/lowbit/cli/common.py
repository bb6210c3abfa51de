"""Shared CLI helpers: one-line errors and human-readable sizes."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red on stderr (one line) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def human_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 bytes, as model sizes are quoted) with the binary size beside."""
    for unit, base in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= base:
            return f"{n / base:,.2f} {unit}"
    return f"{int(n)} B"


def human_bibytes(n: float) -> str:
    for unit, base in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= base:
            return f"{n / base:,.2f} {unit}"
    return f"{int(n)} B"
