"""``lowbit.load``: rebuild a model written by ``lowbit.save`` without materializing float weights.

The model is built from config.json on the meta device, its quantized modules are swapped in
(also on meta) from ``quantization_config``, and the safetensors tensors are assigned in place,
after checking every name, shape and dtype. Non-persistent buffers (rotary ``inv_freq``, BERT
``position_ids``) are not in the file; they are recomputed by the model's own initializer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.io.header import read_safetensors_header
from lowbit.io.save import (
    FORMAT_VERSION,
    QUANT_METHOD,
    QUANT_MODULES,
    WEIGHTS_NAME,
    float_module_kind,
)
from lowbit.models.experts import fused_experts, unfuse_experts
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.spec import QuantSpec


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_dir():
        aside = sorted(path.parent.glob(f".{path.name}.lowbit-old-*")) if path.name else []
        if aside and not path.exists():  # save was killed between its two renames
            raise ValueError(f"path {str(path)!r} does not exist, but {str(aside[-1])!r} holds "
                             "the checkpoint an interrupted lowbit.save set aside: rename it "
                             "back to load it")
        raise ValueError(f"path {str(path)!r} is not a folder; a lowbit checkpoint is expected")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; a folder written by lowbit.save is expected")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file}: not a JSON object")
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{cfg_file} has no lowbit quantization_config (quant_method 'lowbit'); load float "
            "models with lowbit.models.hf.load_hf_model"
        )
    version = qc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= \
            FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: quantization_config version {version!r}; this lowbit reads versions "
            f"1 to {FORMAT_VERSION}"
        )
    if qc.get("format") != "packed":
        raise ValueError(f"{cfg_file}: quantization_config format {qc.get('format')!r}; "
                         "allowed: 'packed'")
    return config, qc


def _quant_method(path: Path) -> str | None:
    """config.json's ``quantization_config.quant_method`` (None if there is none)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _group_specs(qc: dict[str, Any]) -> dict[str, QuantSpec]:
    """``{module name: spec}`` from the config groups."""
    out: dict[str, QuantSpec] = {}
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ValueError(f"quantization_config config_groups must be an object of groups, got "
                         f"{type(groups).__name__}")
    for group, body in groups.items():
        try:
            spec = QuantSpec.from_dict(body["spec"])
            targets = list(body["targets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"quantization_config group {group!r}: {e}") from None
        for name in targets:
            out[name] = spec
    return out


def _empty_quant_module(
    name: str, module: nn.Module, spec: QuantSpec, dtype: torch.dtype
) -> nn.Module:
    """A quantized module on meta shaped like float ``module`` (its buffers get loaded later)."""
    kind = float_module_kind(module)
    if kind == "Linear":
        return QuantLinear(module.in_features, module.out_features, spec,
                           module.bias is not None, dtype, device="meta")
    if kind == "Conv1D":  # GPT-2: weight [in, out] stored as a QuantLinear [out, in]
        return QuantLinear(module.nx, module.nf, spec, module.bias is not None, dtype,
                           device="meta")
    if kind == "Embedding":
        return QuantEmbedding.empty_like(module, spec, dtype, device="meta")
    if kind == "Conv2d":
        return QuantConv2d.empty_like(module, spec, dtype, device="meta")
    raise ValueError(
        f"quantization_config targets {name!r}, a {type(module).__name__}; lowbit quantizes "
        "Linear, Conv1D, Conv2d and Embedding modules"
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make tensor ``alias`` the very tensor ``source`` (as saved: one storage, two names)."""
    mod_name, _, attr = alias.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    src_mod_name, _, src_attr = source.rpartition(".")
    src_module = model.get_submodule(src_mod_name) if src_mod_name else model
    if src_attr in src_module._parameters:
        value = src_module._parameters[src_attr]
    else:
        value = src_module._buffers[src_attr]
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(
            value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise ValueError(f"tied tensor {alias!r} is not a parameter or buffer of the model")


def rebuild_meta_buffers(model: nn.Module) -> None:
    """Recompute non-persistent buffers left on meta with the model's own initializer.

    Each is pre-filled with a sentinel (NaN, or the dtype's minimum) so a buffer the initializer
    does not know is reported instead of being left with garbage.
    """
    pending = []
    for mod_name, module in model.named_modules():
        metas = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if metas:
            pending.append((mod_name, module, metas))
    if not pending:
        return
    init_fn = getattr(model, "_init_weights", None)
    # transformers' init functions skip tensors flagged as initialized: flag all loaded ones.
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            t._is_hf_initialized = True
    for mod_name, module, metas in pending:
        for b in metas:
            like = module._buffers[b]
            fill = float("nan") if like.is_floating_point() else _int_min(like.dtype)
            module._buffers[b] = torch.full(like.shape, fill, dtype=like.dtype, device="cpu")
        if init_fn is not None:
            with torch.no_grad():
                init_fn(module)
        for b in metas:
            t = module._buffers[b]
            bad = t.isnan() if t.is_floating_point() else t == _int_min(t.dtype)
            if t.numel() and bool(bad.any()):
                raise ValueError(
                    f"buffer {mod_name}.{b} is not saved (non-persistent) and the model's "
                    "initializer does not recompute it"
                )


def _int_min(dtype: torch.dtype) -> int:
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _build(config: Any, kind: str, dtype: torch.dtype, targets: list[str],
           unfused: list[str]) -> nn.Module:
    """The saved model on meta: the class config.json's ``architectures`` names (lowbit.save
    records the class it saved), else the Auto class of ``kind``; the first whose modules hold
    every quantized target (checkpoints saved before the class was recorded). The ``unfused``
    MoE experts modules are split into per-expert Linears, as quantize split them."""
    import transformers

    from lowbit.models.hf import build_on_meta

    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        with torch.device("meta"):
            model = cls._from_config(config, dtype=dtype)
        found = fused_experts(model)
        if all(n in found for n in unfused):
            unfuse_experts(model, unfused)
            names = {name for name, _ in model.named_modules()}
            if all(t in names for t in targets):
                return model
    model = build_on_meta(config, kind, dtype)
    unfuse_experts(model, unfused)
    return model


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a checkpoint written by :func:`lowbit.save`; returns the model in eval mode.

    Compressed-tensors checkpoints (llm-compressor's, or ``lowbit.save(format=
    "compressed-tensors")``) load too: their integer / fp8 Linears become lowbit's quantized
    modules holding the same codes (see lowbit.io.compressed_tensors.load_checkpoint).

    Float tensors are cast to ``dtype``; quantized tensors keep their stored dtypes. The model's
    ``lowbit_summary`` lists quantized and ignored modules as ``lowbit.quantize`` did.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CONFIG_MAPPING

    # Imported here: lowbit.api and lowbit.models import lowbit.io themselves.
    from lowbit.api import ModuleReport, QuantizeSummary
    from lowbit.models.hf import model_kind

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    if _quant_method(path) == "compressed-tensors":
        from lowbit.io.compressed_tensors import load_checkpoint

        return load_checkpoint(path, dtype)
    config_dict, qc = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{path} has no {WEIGHTS_NAME}")
    header = {info.name: info for info in read_safetensors_header(weights)}
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}/config.json: unknown model_type {model_type!r}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as e:  # transformers' strict config validation raises its own types
        raise ValueError(f"{path}/config.json: {str(e).splitlines()[0]}") from None
    kind = model_kind(config)
    # the float tensors' dtype in the file: bytes are reported as stored
    file_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(config_dict.get("dtype")))
    specs = _group_specs(qc)
    unfused = qc.get("unfused_experts") or []
    if not (isinstance(unfused, list) and all(isinstance(n, str) for n in unfused)):
        raise ValueError(f"{path}/config.json: quantization_config unfused_experts must be a "
                         f"list of module names, got {unfused!r}")
    try:
        model = _build(config, kind, dtype, list(specs), unfused)
    except ValueError as e:
        raise ValueError(f"{path}/config.json: unfused_experts: {e}") from None

    dropped = qc.get("dropped") or []
    if dropped != [] and dropped != ["pooler"]:
        raise ValueError(f"{path}/config.json: quantization_config dropped must be [] or "
                         f"['pooler'], got {dropped!r}")
    if dropped and getattr(model, "pooler", None) is not None:
        model.pooler = None  # saved without one (see lowbit.io.save.quantization_config)
    summary = QuantizeSummary(notes=list(qc.get("notes") or []))
    logical_shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in specs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"quantization_config targets {name!r}, which is not a module of "
                f"{type(model).__name__}"
            ) from None
        new = _empty_quant_module(name, module, spec, dtype)
        if f"{name}.weight_g_idx" in header:  # GPTQ act-order: columns' group indices
            g_idx_shape = header[f"{name}.weight_g_idx"].shape
            if g_idx_shape != tuple(new.weight_shape.tolist())[1:2]:
                raise ValueError(f"{weights}: {name}.weight_g_idx has shape "
                                 f"{list(g_idx_shape)}; the layer has "
                                 f"{int(new.weight_shape[1])} input columns")
            new.register_buffer("weight_g_idx", torch.empty(
                g_idx_shape, dtype=torch.int32, device="meta"))
        logical_shapes[name] = tuple(new.weight_shape.tolist())
        _set_submodule(model, name, new)
        summary.modules.append(ModuleReport(
            name, float_module_kind(module) or "", str(spec), "quantized", "",
            module.weight.numel() * (file_dtype or dtype).itemsize, 0))
    aliases = qc.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
            isinstance(a, str) and isinstance(n, str) for a, n in aliases.items()):
        raise ValueError(f"{path}/config.json: quantization_config aliases must map module "
                         f"names to module names, got {aliases!r}")
    for alias, name in aliases.items():  # one module under several names, as saved
        if name not in specs:
            raise ValueError(f"{path}/config.json: alias {alias!r} names {name!r}, which is not "
                             "a quantized target")
        try:
            model.get_submodule(alias)
        except AttributeError:
            raise ValueError(f"{path}/config.json: alias {alias!r} is not a module of "
                             f"{type(model).__name__}") from None
        if any(key.startswith(alias + ".") for key in header):
            raise ValueError(f"{path}/config.json: alias {alias!r} has tensors of its own in "
                             f"{WEIGHTS_NAME}; an alias shares {name!r}'s")
        _set_submodule(model, alias, model.get_submodule(name))
    reasons = qc.get("ignore_reasons") or {}
    ignored = qc.get("ignore") or []
    tied = qc.get("tied") or {}
    for field, value, ok in (
        ("ignore", ignored, isinstance(ignored, list) and all(isinstance(n, str) for n in ignored)),
        ("ignore_reasons", reasons, isinstance(reasons, dict)
         and all(isinstance(v, str) for v in reasons.values())),
        ("tied", tied, isinstance(tied, dict)
         and all(isinstance(a, str) and isinstance(t, str) for a, t in tied.items())),
    ):
        if not ok:
            raise ValueError(f"{path}/config.json: quantization_config {field} must be "
                             f"{'a list of' if field == 'ignore' else 'a map of'} names, got "
                             f"{value!r}")
    for name in ignored:
        summary.modules.append(ModuleReport(
            name, "", None, "skipped", reasons.get(name, "not quantized in checkpoint"), 0, 0))

    quant_prefixes = {name + "." for name in specs}
    expected = model.state_dict()
    for key in expected:
        if key not in header and key not in tied:
            raise ValueError(f"{weights}: tensor {key!r} is missing")
    for key in header:
        if key not in expected:
            raise ValueError(f"{weights}: tensor {key!r} is not part of {type(model).__name__}")
    for alias, source in tied.items():
        if source not in header:
            raise ValueError(f"{path}/config.json: tied tensor {alias!r} names missing {source!r}")
        if alias not in expected or tuple(expected[alias].shape) != header[source].shape:
            raise ValueError(f"{path}/config.json: tied tensor {alias!r} is not a tensor of "
                             f"{type(model).__name__} of {source!r}'s shape")

    try:
        state = load_file(str(weights))
    except SafetensorError as e:  # data that its (checked) header does not describe
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    for key, t in state.items():
        want = expected[key]
        # the quantized state keeps its spec's dtypes; a quantized module's bias is a float
        in_quant = any(key.startswith(p) and key[len(p):].startswith(("weight_", "input_"))
                       for p in quant_prefixes)
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(
                f"{weights}: tensor {key!r} has shape {list(t.shape)}; the model expects "
                f"{list(want.shape)}"
            )
        if in_quant or not want.is_floating_point():
            if t.dtype != want.dtype:
                raise ValueError(
                    f"{weights}: tensor {key!r} has dtype {t.dtype}; the model expects "
                    f"{want.dtype}"
                )
        elif not t.is_floating_point():
            raise ValueError(f"{weights}: tensor {key!r} has dtype {t.dtype}; a float is expected")
        elif t.dtype != dtype:
            state[key] = t.to(dtype)
    for name, logical in logical_shapes.items():
        key = f"{name}.weight_shape"
        stored = tuple(int(s) for s in state[tied.get(key, key)].tolist())
        if stored != logical:
            raise ValueError(
                f"{weights}: tensor {name + '.weight_shape'!r} says {list(stored)}; the model's "
                f"{name!r} weight is {list(logical)}"
            )

    model.load_state_dict(state, strict=False, assign=True)
    for alias, source in tied.items():
        _tie(model, alias, source)
    rebuild_meta_buffers(model)

    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULES):
            try:
                module.qweight.validate()
            except ValueError as e:
                raise ValueError(f"{weights}: module {name!r}: {e}") from None
            module._kernel_cache.clear()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if meta:
        raise ValueError(f"{path}: tensors {meta[:3]} were neither saved nor recomputable")
    for report in summary.quantized:
        report.bytes_after = model.get_submodule(report.name).weight_nbytes
    for report in summary.skipped:
        try:
            report.kind = float_module_kind(model.get_submodule(report.name)) or ""
            w = model.get_submodule(report.name).weight
            report.bytes_before = report.bytes_after = w.numel() * (file_dtype or dtype).itemsize
        except AttributeError:
            pass
    if file_dtype is not None:  # saved again, the float tensors keep it (lowbit.save's default)
        model._lowbit_stored_dtype = file_dtype
    model.lowbit_summary = summary
    model.lowbit_quantization_config = qc
    model._lowbit_source = str(path.resolve())
    _load_generation_config(model, path)
    return model.eval()


def _load_generation_config(model: nn.Module, path: Path) -> None:
    if (path / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            pass
