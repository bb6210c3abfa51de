"""Memory a model needs in each format, from a parameter count or a model folder's headers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowbit.io.header import DTYPE_BYTES, model_tensor_infos
from lowbit.spec import PRESETS, preset
from lowbit.tensor import stored_nbytes

FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


def human_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 bytes, as model sizes are quoted)."""
    for unit, base in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= base:
            return f"{n / base:,.2f} {unit}"
    return f"{int(n)} B"


def human_bibytes(n: float) -> str:
    """Binary units (GiB = 2**30 bytes)."""
    for unit, base in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= base:
            return f"{n / base:,.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class SizeRow:
    name: str
    description: str
    nbytes: int
    bits_per_weight: float  # over the counted parameters, overhead included


def size_from_params(n_params: float, matrix: tuple[int, int] = (4096, 4096)) -> list[SizeRow]:
    """Size of ``n_params`` weights per format; scale/zero overhead as for ``matrix``-shaped layers.

    Every parameter is counted as quantized, as in the classic "7B params x 4 bytes = 28 GB".
    """
    if not 1 <= n_params < float("inf"):
        raise ValueError(f"--params must be a finite number of parameters >= 1, got "
                         f"{n_params}")
    rows = [
        SizeRow(name, f"IEEE {name}", int(n_params * bits / 8), float(bits))
        for name, bits in FLOAT_BITS.items()
    ]
    numel = matrix[0] * matrix[1]
    for name, entry in PRESETS.items():
        bpw = stored_nbytes(preset(name), matrix) * 8 / numel
        rows.append(SizeRow(name, entry["doc"], int(round(n_params * bpw / 8)), bpw))
    return rows


def size_from_model(model_dir: str | Path) -> tuple[list[SizeRow], dict[str, int]]:
    """Size of a Hugging Face model folder per format, from its safetensors headers only.

    2-D ``*.weight`` matrices are quantized; other tensors (norms, biases) stay in their stored
    dtype, as do matrices the spec can't tile (e.g. width not divisible by the group size).
    Returns the rows and a summary (parameters, stored bytes, quantizable parameters).
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") in ("lowbit", "compressed-tensors"):
        raise ValueError(f"MODEL_DIR {str(model_dir)!r} is a {qc['quant_method']} checkpoint "
                         "(already quantized: its headers hold packed codes); give the float "
                         "model's folder, or see its bytes with lowbit eval")
    infos = model_tensor_infos(model_dir)
    n_params = sum(i.numel for i in infos)
    if n_params == 0:
        raise ValueError(f"MODEL_DIR {str(model_dir)!r}: its safetensors hold no parameters")
    matrices = [i for i in infos if len(i.shape) == 2 and i.name.endswith(".weight")]
    summary = {
        "params": n_params,
        "stored_bytes": sum(i.nbytes for i in infos),
        "matrix_params": sum(i.numel for i in matrices),
        "tensors": len(infos),
    }
    rows = [
        SizeRow(name, f"IEEE {name}", n_params * bits // 8, float(bits))
        for name, bits in FLOAT_BITS.items()
    ]
    for name, entry in PRESETS.items():
        spec = preset(name)
        total = 0
        kept = 0
        for info in infos:
            if info in matrices:
                try:
                    total += stored_nbytes(spec, info.shape)
                    continue
                except ValueError:
                    kept += 1
            total += info.numel * DTYPE_BYTES.get(info.dtype, 4)
        doc = entry["doc"] + (f" ({kept} matrices kept: shape does not tile)" if kept else "")
        rows.append(SizeRow(name, doc, total, total * 8 / n_params))
    return rows, summary
