"""Export to compressed-tensors: the checkpoint format vLLM, transformers and llm-compressor read.

lowbit's own format (docs/format.md) borrows compressed-tensors' tensor names; this module writes
the real thing, so a model quantized by lowbit (RTN, GPTQ, AWQ, SmoothQuant, QAT) can be served
by vLLM or loaded by ``transformers.AutoModelForCausalLM.from_pretrained`` with the
``compressed-tensors`` package installed. The mapping is exact (no re-quantization):

- integer weights (intN / uintN, 1..8 bits; per tensor, output channel or input group) become
  ``pack-quantized``: codes as compressed-tensors' signed values plus ``2**(b-1)``, packed into
  int32 words as one little-endian bit stream per row (lowbit's own bit order, so the words are
  lowbit's bytes read four at a time), ``weight_scale [N, K/g]`` as stored, asymmetric
  zero-points packed the same way along the output dim (``[ceil(N*b/32), K/g]``);
- int8 weights with int8 activations (``w8a8``, ``w8a8-static``) become ``int-quantized``
  (``weight`` int8), fp8 e4m3 weights ``float-quantized`` (``weight`` float8_e4m3fn);
- activation specs become ``input_activations`` (dynamic per token, or static per tensor with
  ``input_scale``).

What has no compressed-tensors form is refused in one line naming the layer: codebooks (nf4,
k-means, pow2), fp4 / fp6 / e5m2 grids, 2-D blocks, HQQ's fractional zero-points, GPTQ
act-order ``g_idx`` (compressed-tensors' own dequantization ignores it), asymmetric static
activations, quantized Embedding / Conv2d / GPT-2 Conv1D layers, and MoE experts split by
lowbit (the float model has no Linear of that name).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear
from lowbit.quant.maps import qrange
from lowbit.spec import QuantSpec

FORMAT_NAME = "compressed-tensors"
# The compressed-tensors release whose format this writes (and that the tests load it with).
CT_VERSION = "0.20.0"
_CT_GRANULARITY = {"tensor": "tensor", "channel": "channel", "group": "group", "token": "token"}


def _refuse(name: str | None, spec: QuantSpec, why: str) -> ValueError:
    where = f"layer {name!r} ({spec})" if name is not None else f"spec {spec}"
    return ValueError(f"{where} has no compressed-tensors form: {why}")


def check_spec(spec: QuantSpec) -> None:
    """Raise ValueError now if Linear layers quantized with ``spec`` could not be exported
    (lets a caller fail before quantizing; layer-level checks come at save time)."""
    weight_args(None, spec)
    activation_args(None, spec)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def float_only_layers(model: nn.Module) -> list[str]:
    """Names of the Embedding / Conv2d / GPT-2 Conv1D layers of a float ``model``: lowbit can
    quantize them, compressed-tensors runtimes cannot, so an export keeps them in float."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.Conv2d)) or _is_conv1d(m)]


# Projections vLLM runs as one fused layer (qkv_proj, gate_up_proj): one scheme for all of them.
FUSED_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _warn_split_fusions(model: nn.Module, quantized: list[str]) -> None:
    """Warn (once) where a set vLLM fuses holds different specs, or float and quantized layers:
    transformers reads such a checkpoint, vLLM gives the fused layer one scheme."""
    import warnings

    modules = dict(model.named_modules())
    chosen = set(quantized)
    for name in quantized:
        parent, _, leaf = name.rpartition(".")
        for fused in FUSED_SETS:
            if leaf != fused[0]:
                continue
            members = [f"{parent}.{m}" for m in fused if f"{parent}.{m}" in modules]
            specs = {str(modules[m].spec) if m in chosen else "float" for m in members}
            if len(specs) > 1:
                warnings.warn(f"{', '.join(members)} are saved as {' / '.join(sorted(specs))}: "
                              "vLLM fuses them into one layer with one scheme and would not "
                              "load this checkpoint (transformers and lowbit.load do)",
                              stacklevel=3)
                return


def _strategy(name: str | None, spec: QuantSpec, what: str) -> tuple[str, int | None]:
    if spec.granularity not in _CT_GRANULARITY:
        raise _refuse(name, spec, f"{what} granularity {spec.granularity!r}; allowed: "
                      "tensor, channel (output rows), group (along the input)")
    if spec.granularity == "channel" and spec.axis != 0:
        raise _refuse(name, spec, f"per-channel scales along axis {spec.axis}; "
                      "compressed-tensors has one scale per output row (axis 0)")
    return _CT_GRANULARITY[spec.granularity], spec.group_size


def weight_args(name: str | None, spec: QuantSpec) -> tuple[dict[str, Any], str]:
    """compressed-tensors' ``weights`` args of a lowbit weight spec, and the group's format."""
    strategy, group_size = _strategy(name, spec, "weight")
    if spec.double_quantized:
        raise _refuse(name, spec, "double-quantized scales (k-quants); compressed-tensors "
                      "stores float scales (use a spec without -dq, or --format gguf)")
    if spec.kind == "affine":
        if spec.has_zero_point and spec.zero_point != "int":
            raise _refuse(name, spec, "fractional (HQQ-style) zero-points; compressed-tensors "
                          "stores integer zero-points (use zero_point='int', or rtn / gptq / awq)")
        # W8A8 runtimes (vLLM's int8 GEMMs) read an int8 ``weight``; the rest is packed
        fmt = ("int-quantized" if spec.bits == 8 and spec.signed and spec.act is not None
               and not spec.has_zero_point else "pack-quantized")
        args = {"num_bits": spec.bits, "type": "int", "symmetric": not spec.has_zero_point}
    elif spec.format == "fp8_e4m3fn" and strategy in ("tensor", "channel"):
        fmt = "float-quantized"
        args = {"num_bits": 8, "type": "float", "symmetric": True}
    else:
        raise _refuse(name, spec, "compressed-tensors stores integer grids (1..8 bits, per "
                      "tensor / channel / group) and fp8 e4m3 (per tensor / channel)")
    args.update(strategy=strategy, group_size=group_size, dynamic=False, actorder=None,
                block_structure=None, observer="minmax", observer_kwargs={})
    return args, fmt


def activation_args(name: str | None, spec: QuantSpec) -> dict[str, Any] | None:
    """compressed-tensors' ``input_activations`` args of a W*A* spec (None: weight-only)."""
    act = spec.act
    if act is None:
        return None
    strategy, group_size = _strategy(name, act, "activation")
    if act.kind == "affine" and act.signed and not act.has_zero_point:
        kind = "int"
    elif act.format == "fp8_e4m3fn":
        kind = "float"
    else:
        raise _refuse(name, spec, f"activations {act}; compressed-tensors runs signed symmetric "
                      "integer or fp8 e4m3 activations")
    if strategy == "token" and not act.dynamic or strategy != "token" and act.dynamic:
        raise _refuse(name, spec, "activations must be dynamic per token or static per tensor")
    return {"num_bits": act.bits, "type": kind, "symmetric": True, "strategy": strategy,
            "group_size": group_size, "dynamic": act.dynamic, "actorder": None,
            "block_structure": None, "observer": None if act.dynamic else "minmax",
            "observer_kwargs": {}}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 ``[R, C]`` -> int32 ``[R, ceil(C*bits/32)]``: each row one
    little-endian bit stream (code i at bits ``[i*b, (i+1)*b)``), as compressed-tensors'
    ``pack_to_int32`` lays out its offset values."""
    from lowbit.formats.packing import pack

    packed = pack(codes, bits)  # the same stream in bytes
    words = -(-codes.shape[-1] * bits // 32)
    padded = torch.zeros(packed.shape[0], words * 4, dtype=torch.int64)
    padded[:, : packed.shape[1]] = packed.to(torch.int64)
    b = padded.view(packed.shape[0], words, 4)
    value = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return torch.where(value >= 1 << 31, value - (1 << 32), value).to(torch.int32)


def module_tensors(name: str, module: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized Linear (names without the prefix)."""
    qt = module.qweight
    spec = qt.spec
    if qt.g_idx is not None:
        raise _refuse(name, spec, "GPTQ act-order groups (g_idx), which compressed-tensors' "
                      "own dequantization ignores; quantize with GPTQ(act_order=False) or "
                      "GPTQ(act_order=True, static_groups=True)")
    n, k = qt.shape
    if spec.granularity == "group" and k % spec.group_size:
        raise _refuse(name, spec, f"in_features {k} is not a multiple of the group size")
    scale = qt.scale if spec.granularity != "tensor" else qt.scale.reshape(1)
    out: dict[str, torch.Tensor] = {}
    if fmt == "float-quantized":
        out["weight"] = qt.codes().view(torch.float8_e4m3fn).reshape(n, k)
    elif fmt == "int-quantized":
        out["weight"] = qt.int_repr()
    else:
        qmin = qrange(spec)[0]
        # compressed-tensors stores signed value + 2**(b-1); lowbit stores q - qmin: for uintN
        # the two are equal, for intN (qmin = -2**(b-1)) as well
        out["weight_packed"] = pack_int32(qt.codes(), spec.bits)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if spec.has_zero_point:
            zero = qt.zero_point.float()
            lo, hi = qrange(spec)
            if not bool(((zero == zero.round()) & (zero >= lo) & (zero <= hi)).all()):
                raise _refuse(name, spec, f"zero-points outside the integers {lo}..{hi}")
            if spec.granularity == "tensor":  # stored as the signed value, unpacked
                out["weight_zero_point"] = (zero.reshape(1) - qmin
                                            - (1 << (spec.bits - 1))).to(torch.int8)
            else:
                stored = (zero - qmin).to(torch.uint8)
                out["weight_zero_point"] = pack_int32(stored.T.contiguous(), spec.bits).T
    out["weight_scale"] = scale
    if spec.act is not None and not spec.act.dynamic:
        out["input_scale"] = module.input_scale.reshape(1)
    if module.bias is not None:
        out["bias"] = module.bias
    return out


def _float_skeleton(model: nn.Module) -> nn.Module | None:
    """The model's class built from its config on the meta device: the modules a loader builds."""
    try:
        with torch.device("meta"):
            return type(model)(model.config)
    except Exception:  # noqa: BLE001 - a class that needs more than its config: skip the check
        return None


def export_tensors(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """``state`` (the model's state dict) with every quantized module's tensors in
    compressed-tensors' form, config.json's ``quantization_config``, and the bytes of the
    quantized weights as stored (codes, scales, zero-points)."""
    skeleton = _float_skeleton(model)
    floats = dict(skeleton.named_modules()) if skeleton is not None else None
    groups: dict[str, dict[str, Any]] = {}
    out = dict(state)
    quantized_bytes = 0
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (QuantLinear, QuantConv2d, QuantEmbedding)):
            continue
        spec = module.spec
        if not isinstance(module, QuantLinear):
            raise _refuse(name, spec, f"{type(module).__name__[5:]} layers; compressed-tensors "
                          "runtimes quantize Linear layers only (keep it in float: "
                          f"exclude={name!r}, CLI --exclude {name})")
        if floats is not None and not isinstance(floats.get(name), nn.Linear):
            what = type(floats[name]).__name__ if name in floats else "no module"
            raise _refuse(name, spec, f"the float model has {what} there, not a Linear "
                          "(GPT-2 Conv1D, or MoE experts split by lowbit), so a loader "
                          "would not find this layer")
        wargs, fmt = weight_args(name, spec)
        aargs = activation_args(name, spec)
        tensors = module_tensors(name, module, fmt)
        for key in [k for k in out if k.startswith(name + ".")
                    and k.count(".") == name.count(".") + 1]:
            del out[key]
        out.update({f"{name}.{key}": t for key, t in tensors.items()})
        quantized_bytes += sum(t.numel() * t.element_size() for key, t in tensors.items()
                               if key not in ("bias", "weight_shape", "input_scale"))
        key = repr((sorted(wargs.items()), sorted((aargs or {}).items()), fmt))
        group = groups.setdefault(key, {"targets": [], "weights": wargs,
                                        "input_activations": aargs,
                                        "output_activations": None, "format": fmt})
        group["targets"].append(name)
        names.append(name)
    if not names:
        raise ValueError("model has no quantized layers to export; quantize it first "
                         "(lowbit.quantize) or save it in float with model.save_pretrained")
    quantized = set(names)
    # every float Linear-like layer: vLLM builds GPT-2's Conv1D as Linear layers too
    linears = [n for n, m in (floats or dict(model.named_modules())).items()
               if (isinstance(m, nn.Linear) or _is_conv1d(m)) and n not in quantized]
    _warn_split_fusions(model, names)
    if len(groups) == 1:  # the usual llm-compressor shape: every Linear but the ignored ones
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": FORMAT_NAME,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": linears,
        "kv_cache_scheme": None,
        "version": CT_VERSION,
    }
    return out, config, quantized_bytes


# ---- reading compressed-tensors checkpoints (llm-compressor's, vLLM's, lowbit's) -----------

# compressed-tensors formats lowbit reads: integer codes (packed in int32 words, or one int8 per
# weight), fp8 e4m3 weights
_READ_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


def _match_rank(name: str, module: nn.Module, targets: list[str]) -> int | None:
    """How specifically ``targets`` name the module, as compressed-tensors and vLLM rank them:
    0 the exact name, 1 a ``re:`` regex, 2 a class name in the module's MRO; None: no match."""
    ranks = [0 if t == name else 1 if t.startswith("re:") and re.match(t[3:], name)
             else 2 if not t.startswith("re:") and any(c.__name__ == t
                                                       for c in type(module).__mro__)
             else None for t in targets]
    return min((r for r in ranks if r is not None), default=None)


def _spec_from_args(group: str, body: dict[str, Any], default_format: str,
                    scale_dtype: torch.dtype) -> QuantSpec:
    """The lowbit spec of a compressed-tensors config group (weights + input activations)."""
    fmt = body.get("format") or default_format
    w, a = body.get("weights"), body.get("input_activations")
    if fmt not in _READ_FORMATS:
        raise ValueError(f"group {group!r}: format {fmt!r}; lowbit reads "
                         f"{', '.join(_READ_FORMATS)}")
    if not isinstance(w, dict):
        raise ValueError(f"group {group!r}: no weights args (activation-only schemes are not "
                         "read)")
    if body.get("output_activations"):
        raise ValueError(f"group {group!r}: output activation quantization is not supported")
    strategy, group_size = w.get("strategy"), w.get("group_size")
    if strategy is None:  # inferred as compressed-tensors' validator does
        strategy = ("tensor" if group_size is None else "channel" if group_size == -1
                    else "group")
    fields: dict[str, Any] = {"scale_dtype": str(scale_dtype).removeprefix("torch.")}
    if strategy == "group":
        fields.update(granularity="group", group_size=group_size)
    elif strategy in ("channel", "tensor"):
        fields.update(granularity=strategy)
    elif strategy == "block" and w.get("type") == "float":
        fields.update(granularity="block", block=tuple(w.get("block_structure") or ()))
    else:
        raise ValueError(f"group {group!r}: weight strategy {strategy!r} is not supported")
    bits = w.get("num_bits")
    if w.get("type") == "float":
        if bits != 8 or fmt != "float-quantized":
            raise ValueError(f"group {group!r}: float weights of {bits} bits ({fmt}); lowbit "
                             "reads fp8 e4m3 (float-quantized)")
        fields.update(format="fp8_e4m3fn", symmetric=True)
    elif w.get("symmetric", True):
        fields.update(format=f"int{bits}", symmetric=True)
    else:
        fields.update(format=f"uint{bits}", symmetric=False, zero_point="int")
    if isinstance(a, dict):
        if not a.get("symmetric", True):
            raise ValueError(f"group {group!r}: asymmetric activations are not supported")
        act_format = "fp8_e4m3fn" if a.get("type") == "float" else f"int{a.get('num_bits')}"
        fields["act"] = QuantSpec(format=act_format, granularity=a.get("strategy") or "tensor",
                                  symmetric=True, scale_dtype="float32",
                                  dynamic=bool(a.get("dynamic")), group_size=a.get("group_size"))
    try:
        return QuantSpec(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"group {group!r}: {e}") from None


def _bytes_of_words(words: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """int32 ``[R, W]`` -> uint8 ``[R, n_bytes]``: each word's bytes, least significant first."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    return parts.reshape(w.shape[0], -1)[:, :n_bytes].to(torch.uint8).contiguous()


def _quantized_tensor(name: str, spec: QuantSpec, fmt: str, shape: tuple[int, int],
                      t: dict[str, torch.Tensor], dtype: torch.dtype):
    """A lowbit QuantizedTensor from one module's compressed-tensors tensors ``t``."""
    from lowbit.formats.packing import pack, packed_length, unpack
    from lowbit.tensor import QuantizedTensor, stored_shapes

    n, k = shape
    bits = spec.bits
    if fmt == "pack-quantized":
        packed = t.get("weight_packed")
        if packed is None or packed.dtype != torch.int32 or packed.dim() != 2 or \
                tuple(packed.shape) != (n, -(-k * bits // 32)):
            raise ValueError(f"{name}.weight_packed: expected int32 [{n}, "
                             f"{-(-k * bits // 32)}] for {spec}")
        qdata = _bytes_of_words(packed, packed_length(k, bits))
    else:
        w = t.get("weight")
        want = torch.float8_e4m3fn if fmt == "float-quantized" else torch.int8
        if w is None or w.dtype != want or tuple(w.shape) != shape:
            raise ValueError(f"{name}.weight: expected {want} {list(shape)} for {spec}")
        codes = (w.view(torch.uint8) if fmt == "float-quantized"
                 else (w.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8))
        qdata = pack(codes, bits)
    expected = stored_shapes(spec, shape)
    scale = t.get("weight_scale")
    scale_shape = expected["scale"][0]
    if scale is None or scale.numel() != math.prod(scale_shape):
        raise ValueError(f"{name}.weight_scale: expected {math.prod(scale_shape)} values "
                         f"{list(scale_shape)} for {spec}")
    zero = None
    if spec.has_zero_point:
        zp = t.get("weight_zero_point")
        zero_shape = expected["zero_point"][0]
        if zp is None:
            raise ValueError(f"{name}.weight_zero_point is missing (asymmetric {spec})")
        if zp.dtype == torch.int32 and fmt == "pack-quantized":  # packed along the output dim
            cols = unpack(_bytes_of_words(zp.T.contiguous(), packed_length(n, bits)), bits, n)
            zero = cols.T
        else:  # one signed int8 per (row, group)
            zero = zp.to(torch.int16) + (1 << (bits - 1))
        if zero.numel() != math.prod(zero_shape):
            raise ValueError(f"{name}.weight_zero_point: expected {list(zero_shape)} values")
        zero = zero.reshape(zero_shape).to(expected["zero_point"][1])
    g_idx = t.get("weight_g_idx")
    return QuantizedTensor(qdata=qdata, spec=spec, shape=shape, dtype=dtype,
                           scale=scale.reshape(scale_shape).contiguous(), zero_point=zero,
                           g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous())


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder} has no model.safetensors(.index.json)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {key: single.name for key in f.keys()}


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A compressed-tensors checkpoint as a lowbit model: every quantized Linear becomes a
    QuantLinear holding the same codes (so lowbit's CPU kernels run it), the rest loads as
    float ``dtype``. Called by ``lowbit.load`` for such folders."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from lowbit.api import ModuleReport, QuantizeSummary
    from lowbit.io.load import rebuild_meta_buffers
    from lowbit.models.hf import build_on_meta, model_kind

    config_dict = json.loads((path / "config.json").read_text())
    qc = config_dict["quantization_config"]
    where = f"{path}/config.json: quantization_config"
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"{where} status {qc.get('quantization_status')!r}; lowbit reads "
                         "'compressed' checkpoints")
    for field in ("transform_config", "kv_cache_scheme"):
        if qc.get(field):
            raise ValueError(f"{where} has a {field} (rotations / KV-cache quantization), "
                             "which lowbit does not run")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"{where}: sparse format {sparsity.get('format')!r} is not supported")
    weight_map = _weight_map(path)
    config = AutoConfig.from_pretrained(path)
    model = build_on_meta(config, model_kind(config), dtype)
    groups = qc.get("config_groups") or {}
    ignore = list(qc.get("ignore") or [])
    files: dict[str, Any] = {}

    def tensor(key: str) -> torch.Tensor:
        file = weight_map[key]
        if file not in files:
            files[file] = safe_open(str(path / file), "pt")
        return files[file].get_tensor(key)

    summary = QuantizeSummary()
    quantized: set[str] = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _match_rank(name, module, ignore) is not None:
            continue
        ranked = [(rank, g) for g, body in groups.items()
                  if (rank := _match_rank(name, module, list(body.get("targets") or [])))
                  is not None]
        if not ranked:
            continue
        group = min(ranked, key=lambda r: r[0])[1]  # the most specific target wins
        body = groups[group]
        t = {key[len(name) + 1:]: tensor(key) for key in weight_map
             if key.startswith(name + ".") and "." not in key[len(name) + 1:]}
        if "weight_scale" not in t:
            raise ValueError(f"{path}: {name!r} is a target of group {group!r} but has no "
                             "weight_scale in the checkpoint")
        spec = _spec_from_args(group, body, qc.get("format"), t["weight_scale"].dtype)
        fmt = body.get("format") or qc.get("format")
        shape = (module.out_features, module.in_features)
        if "weight_shape" in t and tuple(int(s) for s in t["weight_shape"].tolist()) != shape:
            raise ValueError(f"{path}: {name}.weight_shape is {t['weight_shape'].tolist()}; "
                             f"the model's layer is {list(shape)}")
        new = QuantLinear(module.in_features, module.out_features, spec, module.bias is not None,
                          dtype, device="meta")
        try:
            new.set_weight(_quantized_tensor(name, spec, fmt, shape, t, dtype))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        for key, present in (("bias", module.bias is not None),
                             ("input_scale", hasattr(new, "input_scale"))):
            if present and key not in t:
                raise ValueError(f"{path}: tensor {name}.{key} is missing")
        if module.bias is not None:
            new.bias = t["bias"].to(dtype)
        if hasattr(new, "input_scale"):
            new.input_scale = t["input_scale"].float().reshape(1)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        quantized.add(name)
        summary.modules.append(ModuleReport(name, "Linear", str(spec), "quantized", "",
                                            module.weight.numel() * dtype.itemsize, 0))
    if not quantized:
        raise ValueError(f"{where}: no Linear of {type(model).__name__} matches a group's "
                         "targets")
    owned = {key for key in weight_map if key.rpartition(".")[0] in quantized}
    state = {key: tensor(key) for key in weight_map if key not in owned}
    expected = model.state_dict()
    for key in state:
        if key not in expected:
            if ".experts." in key:
                raise ValueError(f"{path}: tensor {key!r}: mixture-of-experts compressed-tensors "
                                 "checkpoints (one tensor set per expert) are not read yet")
            raise ValueError(f"{path}: tensor {key!r} is not part of {type(model).__name__}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {list(state[key].shape)}; the "
                             f"model expects {list(expected[key].shape)}")
        if state[key].is_floating_point():
            state[key] = state[key].to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "tie_word_embeddings", False) and not isinstance(head, QuantLinear):
        model.tie_weights()  # a quantized head is its own (transformers loads it untied too)
    rebuild_meta_buffers(model)
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"{path}: tensors {meta[:3]} are missing from the checkpoint")
    for report in summary.quantized:
        module = model.get_submodule(report.name)
        try:
            module.qweight.validate()
        except ValueError as e:
            raise ValueError(f"{path}: module {report.name!r}: {e}") from None
        report.bytes_after = module.weight_nbytes
    model.lowbit_summary = summary
    model.lowbit_quantization_config = qc
    model._lowbit_source = str(path.resolve())
    return model.eval()
