"""The ``lowbit formats`` and ``lowbit inspect`` commands (rich tables).

``lowbit formats``: one row of facts per number format.
``lowbit inspect VALUE --format F [--saturate]``: how VALUE is stored in F (code, bits, exact
value, error, reasons). VALUE may be negative (``lowbit inspect -1.5 --format fp16``); ``--`` also
works (``lowbit inspect --format fp16 -- -1.5``). There are deliberately no one-letter options, so
that ``-inf`` or ``-1e-3`` can never be mistaken for a cluster of short flags.
"""

from __future__ import annotations

import math
import os
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowbit.formats.inspect import explain, parse_value
from lowbit.formats.registry import canonical_name, format_table


def _console(stderr: bool = False) -> Console:
    """A console; when not on a terminal and COLUMNS is unset, wide enough for the table."""
    console = Console(stderr=stderr, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=160, markup=False)
    return console


def _fail(argument: str, message: str) -> NoReturn:
    """Print one red line naming the argument to stderr and exit with status 2."""
    console = _console(stderr=True)
    console.print(f"[red]{escape(f'{argument}: {message}')}[/red]", highlight=False,
                  soft_wrap=True, markup=True)
    raise typer.Exit(2)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:.7g}"


def formats_command() -> None:
    """List every number format with its bit layout, range, precision and special values."""
    table = Table(title="lowbit number formats")
    for col in ("name", "kind", "bits", "s/e/m", "bias", "max", "min normal", "min subnormal",
                "eps", "digits", "specials", "torch"):
        numeric = col in ("bits", "bias", "max", "min normal", "min subnormal", "eps", "digits")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    for row in format_table():
        sem = (
            "-"
            if row["kind"] == "codebook"
            else f"{row['sign_bits']}/{row['exponent_bits']}/{row['mantissa_bits']}"
        )
        digits = row["decimal_digits"]
        table.add_row(
            row["name"], row["kind"], str(row["bits"]), sem,
            "-" if row["bias"] is None else str(row["bias"]),
            _num(row["max"]), _num(row["min_normal"]), _num(row["min_subnormal"]),
            _num(row["eps"]), "-" if digits is None else f"{digits:.2f}",
            row["specials"], row["torch_dtype"],
        )
    _console().print(table)


def inspect_command(value: str, format: str, saturate: bool = False) -> None:
    """Show how VALUE is stored in FORMAT: code, bits, exact stored value, error and why."""
    try:
        name = canonical_name(format)
    except ValueError as e:
        _fail("--format", str(e))
    try:
        parse_value(value)
    except ValueError as e:
        _fail("VALUE", str(e))
    try:
        ex = explain(value, name, saturate=saturate)
    except ValueError as e:
        _fail("VALUE", str(e))
    table = Table(title=f"{value} as {ex.format}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("input", repr(ex.value)),
        ("format", ex.format + (" (saturating)" if saturate and ex.kind == "float" else "")),
        ("code", f"{ex.code} ({ex.hex})"),
        ("bits", ex.bits + ("  (sign exponent mantissa)" if ex.kind == "float" else "")),
    ]
    if ex.kind == "float":
        rows.append(("fields", f"sign={ex.sign} exponent={ex.exponent} mantissa={ex.mantissa}"))
    rows += [
        ("stored value", repr(ex.decoded)),
        ("exact decimal", ex.exact),
        ("abs error", _num(ex.abs_error) if ex.abs_error == 0 else f"{ex.abs_error:.6g}"),
        ("rel error", _num(ex.rel_error) if ex.rel_error == 0 else f"{ex.rel_error:.6g}"),
        ("why", "; ".join(ex.reason)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    _console().print(table, highlight=False)


_FORMAT_HELP = "Number format (see `lowbit formats`)."


def register(app: typer.Typer) -> None:
    """Add the ``formats`` and ``inspect`` commands to ``app``."""
    app.command("formats")(formats_command)

    @app.command(
        "inspect",
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True},
    )
    def _inspect(
        value: str = typer.Argument(..., help="A number: 0.1, -1.5, 1e-3, inf, nan, -0."),
        format: str = typer.Option(..., "--format", help=_FORMAT_HELP),
        saturate: bool = typer.Option(
            False, "--saturate", help="Clamp overflow (and ±inf) to ±max instead of inf."
        ),
    ) -> None:
        """Show how VALUE is stored in a format: code, bits, exact value, error and why."""
        inspect_command(value, format, saturate)


__all__ = ["formats_command", "inspect_command", "register"]
