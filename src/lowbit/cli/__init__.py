"""The `lowbit` command."""

from __future__ import annotations

import sys

import typer

from lowbit.cli import (
    demo_cmd,
    eval_cmd,
    formats_cmd,
    generate_cmd,
    qat_cmd,
    quantize_cmd,
    size_cmd,
)
from lowbit.cli.common import fail

app = typer.Typer(
    name="lowbit",
    help="Quantize PyTorch models: exact number formats, packed low-bit tensors, honest numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
formats_cmd.register(app)
size_cmd.register(app)
quantize_cmd.register(app)
eval_cmd.register(app)
generate_cmd.register(app)
demo_cmd.register(app)
qat_cmd.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app; a ValueError / TypeError / OSError becomes one red line and
    exit code 2."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=True)
    except (ValueError, TypeError, OSError) as e:  # OSError: a folder not writable, disk full
        try:
            fail(f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
        except typer.Exit as done:  # (outside typer's runner: exit here)
            raise SystemExit(done.exit_code) from None


__all__ = ["app", "main"]
