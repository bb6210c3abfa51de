"""Shared CLI helpers: one-line errors and human-readable sizes."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# markup off: paths, prompts, generated text and patterns (re:[01]) print as they are; the
# few styled lines ask for markup and escape what they interpolate
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red on stderr (one line) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False,
                      markup=True)
    raise typer.Exit(code)
