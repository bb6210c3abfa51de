"""``lowbit.save``: a quantized transformers model as safetensors + config.json, atomically.

Layout (see docs/format.md): one ``model.safetensors`` holding the quantized modules' buffers under
compressed-tensors-style names (``<module>.weight_packed``, ``.weight_scale``, ...) and every other
tensor in float, and ``config.json`` = the model's config plus a ``quantization_config`` saying
which spec each module was quantized with.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.io import compressed_tensors as ct
from lowbit.models.experts import LinearExperts
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.spec import QuantSpec

FORMAT_VERSION = 1
QUANT_METHOD = "lowbit"
WEIGHTS_NAME = "model.safetensors"
QUANT_MODULES = (QuantLinear, QuantConv2d, QuantEmbedding)
SAVE_FORMATS = ("lowbit", ct.FORMAT_NAME, "gguf")

# Files of a source folder that hold weights (replaced by ours) rather than tokenizer/config data.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf",
                    ".onnx", ".onnx_data", ".ot", ".tflite", ".npz", ".npy", ".mlmodel", ".pb",
                    ".engine", ".plan")
# Folders of the float weights exported to other runtimes (the Hub's onnx/, openvino/, ...).
_EXPORT_DIRS = {"onnx", "openvino", "coreml", "tflite", "tf", "flax", "mlpackage"}
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class SaveResult:
    """Where a checkpoint went and how its bytes split up.

    quantized_bytes: stored tensors of every QuantizedTensor (codes, scales, zero-points,
        codebooks, g_idx), i.e. the sum of their ``nbytes``.
    other_bytes: every other tensor (float weights, biases, norms, activation qparams, and the
        int64 ``weight_shape`` of each quantized module).
    header_bytes: the safetensors length prefix and JSON header.
    """

    path: Path
    file_bytes: int
    header_bytes: int
    quantized_bytes: int
    other_bytes: int

    @property
    def theoretical_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantLinear / QuantConv2d / QuantEmbedding in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULES):
            yield name, module


def float_module_kind(module: nn.Module) -> str | None:
    """'Linear', 'Conv1D', 'Conv2d' or 'Embedding' for a float module lowbit can quantize."""
    if isinstance(module, QUANT_MODULES):
        return None
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "Conv1D"
    return None


def quantization_config(model: nn.Module, tied: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for ``model`` (see docs/format.md)."""
    groups: dict[QuantSpec, list[str]] = {}
    for name, module in quant_modules(model):
        groups.setdefault(module.spec, []).append(name)
    first = {id(module): name for name, module in reversed(list(quant_modules(model)))}
    aliases = {name: first[id(module)]  # other names of a quantized module: the same module
               for name, module in model.named_modules(remove_duplicate=False)
               if isinstance(module, QUANT_MODULES) and first[id(module)] != name}
    summary = getattr(model, "lowbit_summary", None)
    reasons = {m.name: m.reason for m in summary.skipped} if summary is not None else {}
    ignore = [name for name, m in model.named_modules() if float_module_kind(m) is not None]
    out: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "version": FORMAT_VERSION,
        "format": "packed",
        "config_groups": {
            f"group_{i}": {"spec": spec.to_dict(), "spec_str": str(spec), "targets": names}
            for i, (spec, names) in enumerate(groups.items())
        },
        "ignore": ignore,
        "ignore_reasons": {n: reasons[n] for n in ignore if reasons.get(n)},
        "tied": dict(tied or {}),
        "aliases": aliases,
        # MoE experts modules split into a Linear per expert projection (models/experts.py)
        "unfused_experts": [name for name, m in model.named_modules()
                            if isinstance(m, LinearExperts)],
        # modules the config builds that this model does without (an encoder loaded from a
        # checkpoint without pooler weights): the loader drops them too
        "dropped": ["pooler"] if getattr(model, "pooler", "absent") is None else [],
        "notes": list(summary.notes) if summary is not None else [],
    }
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write, and ``{alias: source}`` for names sharing one tensor.

    Identical views of one storage (tied embeddings) are saved once; other overlaps are copied.
    """
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[int] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device (never loaded); cannot save")
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        view = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and view in seen_views:
            tied[name] = seen_views[view]
            continue
        if t.numel() > 0 and (ptr in seen_storages or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel() > 0:
            seen_storages.add(ptr)
            seen_views[view] = name
        out[name] = t.contiguous()
    return out, tied


def _model_float_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    resolved = out_dir.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ValueError(f"out_dir {str(out_dir)!r} is the current folder or one above it "
                         "(it is replaced as a whole); name a folder to write")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} is a file; a folder path is expected")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True "
            "(CLI: --overwrite) or choose another folder"
        )


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Raise ValueError now if ``save`` would refuse ``out_dir`` (lets callers fail early)."""
    path = Path(out_dir)
    _check_out_dir(path, overwrite)
    return path


def _copy_source_files(source: Path, dest: Path, out_dir: Path) -> None:
    """Tokenizer files and other non-weight files (e.g. sentence-transformers' 1_Pooling/);
    never ``out_dir`` itself or lowbit's temporary folders, should they sit in ``source``."""
    skip = {dest.resolve(), out_dir.resolve()}
    for item in sorted(source.iterdir()):
        if item.name in _NOT_COPIED or (item.name.startswith(".git") and item.is_dir()):
            continue
        if item.resolve() in skip or ".lowbit-tmp-" in item.name or ".lowbit-old-" in item.name:
            continue
        # copyfile, not copy2: a read-only source (a Hub cache, a shared folder) must not make
        # the checkpoint's files read-only (the card is rewritten, a later save replaces them)
        if item.is_dir():
            if item.name.lower() not in _EXPORT_DIRS and not item.name.endswith(".mlpackage"):
                shutil.copytree(item, dest / item.name, copy_function=shutil.copyfile,
                                ignore=shutil.ignore_patterns(
                                    *(f"*{s}" for s in _WEIGHT_SUFFIXES)))
        elif not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(item, dest / item.name)


def _cast_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` with every float tensor but the quantized state (codes, scales, zero-points,
    codebooks, activation qparams: a quantized module's tensors other than its bias) cast to
    ``dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"float_dtype must be a floating torch.dtype, got {dtype!r}")
    owners = {name for name, _ in quant_modules(model)}

    def quantized(key: str) -> bool:
        owner, _, leaf = key.rpartition(".")
        return owner in owners and leaf != "bias"

    return {key: t.to(dtype) if t.is_floating_point() and not quantized(key) else t
            for key, t in tensors.items()}


def _write_card(model: nn.Module, path: Path, out_dir: Path, lowbit_config: dict[str, Any],
                file_bytes: int, quantized_bytes: int, source: str | None, format: str) -> None:
    """README.md: lowbit's model card, the float model's card (copied to ``path``) below it."""
    from lowbit import __version__
    from lowbit.io.card import base_model_id, model_card

    summary = getattr(model, "lowbit_summary", None)
    before = (sum(m.bytes_before for m in summary.quantized)
              if summary is not None and summary.quantized else None)
    try:
        original = path.read_text(encoding="utf-8") if path.is_file() else None
    except UnicodeDecodeError:
        original = None
    weights = sum(m.qweight.numel for _, m in quant_modules(model))
    card = model_card(str(out_dir), base_model_id(model.config, source),
                      None if source is None else Path(source).name,
                      lowbit_config, file_bytes, quantized_bytes, weights,
                      before, original, __version__, format)
    path.write_text(card, encoding="utf-8")


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a new sibling folder, then put it in ``out_dir``'s place (the old
    one is removed only once the new one is there); on any error nothing new is left."""
    tmp = out_dir.parent / f".{out_dir.name}.lowbit-tmp-{uuid.uuid4().hex[:8]}"
    old = out_dir.parent / f".{out_dir.name}.lowbit-old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_gguf(model: nn.Module, out_dir: Path, float_dtype: torch.dtype | None) -> SaveResult:
    """``out_dir/model.gguf`` (llama.cpp) and the model card; see lowbit.io.gguf."""
    from lowbit.io import gguf

    for name, module in quant_modules(model):  # refused before anything is written
        gguf.check_spec(module.spec, name)
    source = getattr(model, "_lowbit_source", None)
    sizes: dict[str, int] = {}

    def write(tmp: Path) -> None:
        sizes["quantized"], sizes["other"] = gguf.write_gguf(model, tmp / gguf.FILE_NAME,
                                                             float_dtype)
        sizes["file"] = (tmp / gguf.FILE_NAME).stat().st_size
        if sizes["quantized"]:
            _write_card(model, tmp / "README.md", out_dir, quantization_config(model),
                        sizes["file"], sizes["quantized"], source, gguf.FORMAT_NAME)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_dir, write)
    tensors = sizes["quantized"] + sizes["other"]
    return SaveResult(path=out_dir, file_bytes=sizes["file"],
                      header_bytes=sizes["file"] - tensors, quantized_bytes=sizes["quantized"],
                      other_bytes=sizes["other"])


def _is_transformers_class(cls: type) -> bool:
    import transformers

    return getattr(transformers, cls.__name__, None) is cls


def save(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False,
         float_dtype: torch.dtype | None = None, format: str = "lowbit") -> SaveResult:
    """Write ``model`` (a transformers model, quantized or not) to ``out_dir``.

    Everything is written to a temporary sibling folder that is renamed to ``out_dir`` at the end;
    on error nothing is left behind. An existing non-empty ``out_dir`` is refused unless
    ``overwrite=True``. Tied tensors are stored once and re-tied by ``lowbit.load``.
    float_dtype: store the float tensors (norms, biases, layers kept in float) in this dtype,
    e.g. float16 for a model computed in float32. None: the source checkpoint's float16 /
    bfloat16 where ``load_hf_model`` / ``lowbit.load`` recorded one (a lossless round trip of
    weights read from it), else as they are. Quantized tensors keep the dtypes their spec fixes.
    format: "lowbit" (read back by ``lowbit.load``; every spec), "compressed-tensors" (read by
    vLLM, by transformers with the ``compressed-tensors`` package and by ``lowbit.load``;
    integer and fp8 e4m3 Linear specs, see lowbit.io.compressed_tensors) or "gguf"
    (``out_dir/model.gguf`` for llama.cpp; llama / mistral models, the q4_0 ... q8_0 and
    q2_k ... q6_k specs, see lowbit.io.gguf). What a format cannot carry is refused before
    anything is written.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"model ({type(model).__name__}) has no transformers config; lowbit.save writes "
            "Hugging Face models (use model.state_dict() for plain modules)"
        )
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # write where the link points: the link itself stays
        try:
            out_dir = out_dir.resolve()
        except (OSError, RuntimeError) as e:  # a loop of links
            raise ValueError(f"out_dir {str(out_dir)!r} is a symlink that resolves to no "
                             f"folder ({e})") from None
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r}; allowed: {', '.join(SAVE_FORMATS)}")
    if float_dtype is not None and (not isinstance(float_dtype, torch.dtype)
                                    or not float_dtype.is_floating_point):
        raise TypeError(f"float_dtype must be a floating torch.dtype, got {float_dtype!r}")
    _check_out_dir(out_dir, overwrite)
    if float_dtype is None:
        float_dtype = getattr(model, "_lowbit_stored_dtype", None)
    if format == "gguf":
        return _save_gguf(model, out_dir, float_dtype)
    state = model.state_dict()
    if format == ct.FORMAT_NAME:
        state, exported_config, quantized_bytes = ct.export_tensors(model, state)
    else:
        quantized_bytes = sum(m.weight_nbytes for _, m in quant_modules(model))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors, tied = _dedupe(state)
    if float_dtype is not None:
        tensors = _cast_float_tensors(model, tensors, float_dtype)
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict["dtype"] = str(float_dtype or _model_float_dtype(model)).removeprefix("torch.")
    if _is_transformers_class(type(model)):  # load builds this class (a head, a base model)
        config_dict["architectures"] = [type(model).__name__]
    lowbit_config = quantization_config(model, tied)
    if format == ct.FORMAT_NAME:
        config_dict["quantization_config"] = exported_config
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(output, QUANT_MODULES) and config_dict.get("tie_word_embeddings"):
            # the loader would tie the quantized head back to the float input embedding
            config_dict["tie_word_embeddings"] = False
    else:
        config_dict["quantization_config"] = lowbit_config

    source = getattr(model, "_lowbit_source", None)

    def write(tmp: Path) -> None:
        nonlocal file_bytes, header_len
        if source is not None and Path(source).is_dir():
            _copy_source_files(Path(source), tmp, out_dir)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        # safetensors writes 0600; give the weights config.json's mode (the umask's)
        os.chmod(tmp / WEIGHTS_NAME, (tmp / "config.json").stat().st_mode & 0o777)
        weights = tmp / WEIGHTS_NAME
        with weights.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        file_bytes = weights.stat().st_size
        if quantized_bytes:
            _write_card(model, tmp / "README.md", out_dir, lowbit_config, file_bytes,
                        quantized_bytes, source, format)

    file_bytes = header_len = 0
    _write_atomically(out_dir, write)
    return SaveResult(
        path=out_dir,
        file_bytes=file_bytes,
        header_bytes=8 + header_len,
        quantized_bytes=quantized_bytes,
        other_bytes=total_bytes - quantized_bytes,
    )
