"""`lowbit size`: memory a model needs in each format."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lowbit.cli.common import console, fail
from lowbit.eval.size import human_bibytes, human_bytes, size_from_model, size_from_params


def size_command(
    model_dir: Path | None = typer.Argument(
        None, help="A Hugging Face model folder (read from safetensors headers, not loaded)."
    ),
    params: float | None = typer.Option(
        None, "--params", help="A parameter count instead of a folder, e.g. 7e9."
    ),
) -> None:
    """Memory a model needs in each format and preset (bits per weight include scales/zeros)."""
    if (model_dir is None) == (params is None):
        fail("give either MODEL_DIR or --params N (e.g. lowbit size --params 7e9)")
    try:
        if params is not None:
            rows = size_from_params(params)
            title = f"{params:,.0f} parameters"
            note = "overhead of per-channel/group scales as for 4096x4096 matrices"
            ref = rows[0].nbytes
        else:
            rows, summary = size_from_model(model_dir)
            title = f"{model_dir}: {summary['params']:,} parameters in {summary['tensors']} tensors"
            note = (
                f"stored now: {human_bytes(summary['stored_bytes'])}; 2-D weight matrices "
                f"({summary['matrix_params']:,} params) quantized, other tensors kept as stored"
            )
            ref = summary["stored_bytes"]
    except ValueError as e:
        fail(str(e))
    table = Table(title=title, caption=note)
    table.add_column("format")
    table.add_column("bits/weight", justify="right")
    table.add_column("size", justify="right")
    table.add_column("", justify="right")
    table.add_column("vs stored" if model_dir else "vs fp32", justify="right")
    table.add_column("what")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.bits_per_weight:.3f}",
            human_bytes(r.nbytes),
            human_bibytes(r.nbytes),
            f"{r.nbytes / ref:.3f}x",
            r.description,
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("size")(size_command)
