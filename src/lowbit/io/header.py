"""Tensor names, dtypes and shapes of safetensors files, read from their JSON headers only.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header mapping
each name to ``{"dtype", "shape", "data_offsets"}``; nothing here touches the tensor data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of safetensors dtype names.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def read_safetensors_header(path: str | Path) -> list[TensorInfo]:
    """Every tensor of one safetensors file; ValueError if the file is not one or is truncated."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    infos = []
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, entry)
        start, end = entry["data_offsets"]
        if end > data_size:
            raise ValueError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file holds "
                f"{data_size} data bytes"
            )
        if end - start != info.nbytes:
            raise ValueError(f"{path}: tensor {name!r} spans {end - start} bytes; its dtype "
                             f"{info.dtype} and shape {list(info.shape)} need {info.nbytes}")
        infos.append(info)
    return infos


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    """One header entry, checked: a known dtype, dims and offsets that are integers >= 0."""
    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"{path}: tensor {name!r}: a header entry needs dtype, shape and "
                         "data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{path}: tensor {name!r}: dtype {dtype!r}; known: "
                         f"{', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(whole(d) for d in shape):
        raise ValueError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of sizes >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(whole, offsets))
            or offsets[0] > offsets[1]):
        raise ValueError(f"{path}: tensor {name!r}: data_offsets {offsets!r} are not "
                         "[start, end] with 0 <= start <= end")
    return TensorInfo(name, dtype, tuple(shape), path.name)


def model_tensor_infos(model_dir: str | Path) -> list[TensorInfo]:
    """Tensors of a Hugging Face model folder (single or sharded safetensors)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"MODEL_DIR {str(model_dir)!r} is not a folder")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a "
                             f"'weight_map' of tensor -> file): {type(e).__name__} {e}") from None
        if not all(isinstance(f, str) for f in shards):
            raise ValueError(f"{index}: weight_map values must be file names")
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise ValueError(f"{model_dir}: index names missing shard files {missing}")
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"MODEL_DIR {str(model_dir)!r} holds no *.safetensors files; a Hugging Face model "
            "folder is expected"
        )
    return [info for f in files for info in read_safetensors_header(f)]
