"""The one-call API: quantize (save and load come with the io module). Thin: no algorithm code."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms import Algorithm, get_algorithm
from lowbit.calib import as_batches, calibrate_static, set_input_qparams
from lowbit.models.experts import (
    LinearExperts,
    calibrating_experts,
    expert_linear_names,
    fuse_experts,
    fused_experts,
    unfuse_experts,
)
from lowbit.models.select import check_specs, choose_spec, patterns
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear, linear_weight
from lowbit.quant.layout import layout_for
from lowbit.spec import QuantSpec


@dataclass
class ModuleReport:
    name: str
    kind: str  # Linear, Conv1D, Conv2d, Embedding
    spec: str | None
    status: str  # "quantized" | "skipped"
    reason: str
    bytes_before: int
    bytes_after: int
    error: float | None = None  # relative output error on calibration inputs (sequential runs)


@dataclass
class QuantizeSummary:
    """What ``quantize`` did, module by module (attached to the model as ``lowbit_summary``)."""

    modules: list[ModuleReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status == "quantized"]

    @property
    def skipped(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status == "skipped"]

    @property
    def bytes_before(self) -> int:
        return sum(m.bytes_before for m in self.modules)

    @property
    def bytes_after(self) -> int:
        return sum(m.bytes_after for m in self.modules)

    def __str__(self) -> str:
        q, s = len(self.quantized), len(self.skipped)
        return (
            f"quantized {q} modules, skipped {s}; weights {self.bytes_before:,} -> "
            f"{self.bytes_after:,} bytes"
        )


_KINDS = (nn.Linear, nn.Conv2d, nn.Embedding)


def _kept_in_float(model: nn.Module) -> dict[int, str]:
    """``{id(module): why}`` for modules a quantized replacement would get wrong:

    - Linears whose parent reads their ``weight`` instead of calling them (torch's own attention
      layers: a QuantLinear there would fail, or be bypassed);
    - subclasses of Linear / Conv2d / Embedding with a ``forward`` of their own (Gemma's scaled
      word embeddings, OPT's offset position table): the quantized module would drop what it
      adds.
    """
    found: dict[int, str] = {}
    for parent in model.modules():
        if isinstance(parent, nn.MultiheadAttention):
            found[id(parent.out_proj)] = ("out_proj of nn.MultiheadAttention (which reads its "
                                          "weight, never calls it)")
        if isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn.batch_first:
            for child in (parent.linear1, parent.linear2):  # (batch_first=False: never fused)
                found[id(child)] = ("nn.TransformerEncoderLayer(batch_first=True) reads "
                                    "linear1 / linear2.weight (its fused inference path)")
        for base in _KINDS:
            if (isinstance(parent, base) and type(parent).forward is not base.forward
                    and not _computes_as(parent, base)):
                found[id(parent)] = (f"{type(parent).__name__} has a forward of its own (a "
                                     f"quantized {base.__name__} would not do what it adds)")
    return found


# Subclasses whose own forward computes what their base's does (Falcon's x @ W.T + b), for
# weights on the meta device, where _computes_as cannot run them.
_PLAIN_SUBCLASSES = {"FalconLinear"}


def _computes_as(module: nn.Module, base: type) -> bool:
    """Whether ``module`` (a subclass of ``base`` with its own forward) returns what ``base``'s
    forward returns: no parameters or buffers beyond weight and bias (a learned logit scale
    would be lost), and the same output on small probe inputs at two scales (a clamp or a
    soft cap shows at the large one). The forwards are called directly: no hooks run, nothing
    is changed. A subclass that takes other arguments is not plain."""
    weight = module.weight
    if weight.is_meta:
        return type(module).__name__ in _PLAIN_SUBCLASSES
    extra = [n for n, _ in (*module.named_parameters(), *module.named_buffers())
             if n not in ("weight", "bias")]
    if extra or getattr(module, "max_norm", None) is not None:  # max_norm renorms in place
        return False
    generator = torch.Generator(device=weight.device).manual_seed(0)
    if base is nn.Embedding:
        probes = [torch.arange(min(4, module.num_embeddings), device=weight.device)[None]]
    else:
        if base is nn.Linear:
            size = (2, module.in_features)
        else:  # wide enough for the dilated kernel and any (reflect) padding
            pad = module.padding if isinstance(module.padding, tuple) else module.kernel_size
            size = (1, module.in_channels, *(2 * (d * (k - 1) + 1) + 2 * p + 1 for k, d, p in
                                             zip(module.kernel_size, module.dilation, pad,
                                                 strict=True)))
        x = torch.randn(size, generator=generator, device=weight.device)
        probes = [(x * scale).to(weight.dtype) for scale in (1.0, 100.0)]
    # bf16 / fp16: the subclass may round where F.linear does not (x @ W.T, then + b)
    rtol = max(1e-3, 2 * torch.finfo(weight.dtype).eps) if weight.is_floating_point() else 1e-3
    try:
        with torch.no_grad():
            for x in probes:
                own, plain = type(module).forward(module, x), base.forward(module, x)
                if not (isinstance(own, torch.Tensor) and own.shape == plain.shape
                        and bool(torch.allclose(own.float(), plain.float(), rtol=rtol,
                                                atol=rtol * float(plain.abs().max()) + 1e-6))):
                    return False
    except Exception:  # other arguments, other shapes: not a plain module
        return False
    return True


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (QuantLinear, QuantConv2d, QuantEmbedding)):
        return None
    if isinstance(module, _KINDS):
        return type(module).__name__ if not isinstance(module, nn.Linear) else "Linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "Conv1D"
    return None


def _weight_bytes(module: nn.Module, stored: torch.dtype | None = None) -> int:
    """Bytes of the module's weight: as it is, or as the source checkpoint stores it."""
    return sum(p.numel() * (p.element_size() if stored is None else stored.itemsize)
               for n, p in module.named_parameters() if n == "weight")


def quantize(
    model: nn.Module | str | os.PathLike,
    spec: str | QuantSpec | Mapping[str, Any],
    algorithm: str | Algorithm = "rtn",
    calib: Any = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    observer: str = "minmax",
    tokenizer: Any = None,
    calib_samples: int = 128,
    calib_seq_len: int = 512,
    calib_batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    show_progress: bool = False,
    moe_calibration: str = "all",
) -> nn.Module:
    """Replace Linear / GPT-2 Conv1D / Conv2d / Embedding modules with quantized ones, in place.

    spec: a preset name, a QuantSpec, or ``{pattern: spec}`` (glob or ``re:`` patterns, first
        match wins; ``None`` keeps matching modules in float) for mixed precision.
    include / exclude: name patterns selecting which modules are considered.
    calib, observer, tokenizer: required when a Linear's spec quantizes activations statically
        (``act.dynamic=False``): the float model runs on ``calib`` (texts with ``tokenizer``,
        token ids, or a DataLoader; see ``lowbit.calib.as_batches``) and the ``observer``'s
        per-tensor range of each layer's input sets its ``input_scale`` / ``input_zero_point``.
        Ignored (and noted in the summary) for weight-only and dynamic specs.
    calib_samples, calib_seq_len: at most this many calibration sequences; texts are cut into
        windows of ``calib_seq_len`` tokens.
    calib_batch_size: sequences per calibration forward; lower it to bound activation memory
        (attention scores and MLP activations grow with it) at some cost in speed.
    progress: called with each module name as it is quantized (CLI progress bars).
    algorithm: a name ("rtn", "gptq", "gptq-act-order", "hqq", ...; see
        ``lowbit.algorithms.ALGORITHMS``) or an object such as ``GPTQ(act_order=True)``.
        Calibration-free algorithms quantize module by module; algorithms that need calibration
        (``calib`` required) run layer by layer (``lowbit.calib.sequential``): each block's
        statistics come from the outputs of the blocks already quantized.
    model: a module, or a Hugging Face model folder: then the model is built on the meta device
        and only one block at a time is read from disk in full precision (memory bounded).
    show_progress: a progress bar over blocks with each layer's error (layer-by-layer runs).
    moe_calibration: what the experts of mixture-of-experts layers see while calibrating:
        ``"all"`` every calibration token (every expert gets statistics, however rarely the
        text routes to it), ``"routed"`` the tokens routed to them (their true inputs: on
        benchmarks/results/moe_accuracy.md 0-9% lower KL and half the time, but an expert the
        text never reaches has no statistics and GPTQ / static activations fail on it).
    Returns the model; ``model.lowbit_summary`` says what was quantized, what was skipped and why.
    """
    alg = get_algorithm(algorithm)
    check_specs(spec)
    if moe_calibration not in ("all", "routed"):
        raise ValueError(f"moe_calibration={moe_calibration!r}; allowed: 'all', 'routed'")
    reader = None
    if isinstance(model, (str, os.PathLike)):
        from lowbit.calib.sequential import open_pretrained
        from lowbit.models.hf import load_tokenizer

        source = os.fspath(model)
        model, reader = open_pretrained(source)
        if tokenizer is None:
            tokenizer = load_tokenizer(Path(source))
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module or a model folder, got {type(model).__name__}"
        )
    if reader is None:
        on_meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers())
                        if t.is_meta), None)
        if on_meta is not None:
            raise ValueError(f"model tensor {on_meta!r} is on the meta device (no data): load "
                             "the weights first, or pass the model folder to quantize")
    if alg.needs_calibration and calib is None:
        raise ValueError(
            f"algorithm {alg.name!r} needs calibration data; pass calib=... (texts with "
            "tokenizer=..., token ids [N, T] or a DataLoader)"
        )
    sequential = alg.needs_calibration or reader is not None
    chosen: dict[str, QuantSpec] = {}  # sequential runs: module name -> spec
    before_bytes: dict[str, int] = {}
    include, exclude = patterns(include), patterns(exclude) or []

    def selected(name: str) -> bool:
        return choose_spec(name, spec, include, exclude)[0] is not None

    unfuse_experts(model, selected=selected)
    split = {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}
    unfused = [n for n, m in split.items() if any(map(selected, expert_linear_names(n, m)))]
    # split by open_pretrained to read them per expert, selected by no pattern: fused back
    fuse_back = [n for n in split if n not in unfused] if reader is not None else []
    kept_in_float = _kept_in_float(model)
    _check_selection(model, spec, include, exclude, kept_in_float)
    summary = QuantizeSummary()
    replacements: list[tuple[str, nn.Module]] = []
    static_acts: dict[str, QuantSpec] = {}  # module name -> activation spec to calibrate
    # "before" counts the weights as the source checkpoint stores them (fp16 loaded as fp32)
    stored_dtype = getattr(model, "_lowbit_stored_dtype", None)
    first_name: dict[int, str] = {}  # a module reachable under several names: quantized once
    aliases: list[tuple[str, str]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        kind = _kind(module)
        if kind is None:
            continue
        if id(module) in first_name:
            aliases.append((name, first_name[id(module)]))
            continue
        first_name[id(module)] = name
        before = _weight_bytes(module, stored_dtype)

        def skip(reason: str, spec_text: str | None = None, _n=name, _k=kind, _b=before) -> None:
            summary.modules.append(ModuleReport(_n, _k, spec_text, "skipped", reason, _b, _b))

        if id(module) in kept_in_float:
            skip(kept_in_float[id(module)])
            continue
        layer_spec, why = choose_spec(name, spec, include, exclude)
        if layer_spec is None:
            skip(why)
            continue
        act = layer_spec.act
        note = ""
        if act is not None and kind in ("Embedding", "Conv2d"):
            layer_spec, note = layer_spec.replace(act=None), f"{kind}: weight part of the spec only"
        if act is not None and not act.dynamic and kind in ("Linear", "Conv1D"):
            if calib is None:
                raise ValueError(
                    f"spec {layer_spec} quantizes activations statically (layer {name!r}); "
                    "pass calib=..."
                )
            static_acts[name] = act
        if sequential:  # shapes checked now, not after calibrating the blocks before
            shape = tuple(module.weight.shape)
            try:
                layout_for(shape[::-1] if kind == "Conv1D" else shape, layer_spec)
            except ValueError as e:
                raise ValueError(f"layer {name!r} ({kind}): {e}") from None
            chosen[name], before_bytes[name] = layer_spec, before
            continue
        if progress is not None:
            progress(name)
        try:
            new = _quantize_module(module, kind, layer_spec, alg)
        except (ValueError, TypeError) as e:
            raise ValueError(f"layer {name!r} ({kind}): {e}") from None
        replacements.append((name, new))
        summary.modules.append(ModuleReport(
            name, kind, str(layer_spec), "quantized",
            "weight transposed from Conv1D [in, out]" if kind == "Conv1D" else note,
            before, new.weight_nbytes,
        ))
    try:
        if sequential:
            _run_sequential(model, chosen, before_bytes, alg, calib, reader, summary,
                            static_acts, tokenizer=tokenizer, observer=observer,
                            calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                            calib_batch_size=calib_batch_size, progress=progress,
                            show_progress=show_progress, moe_calibration=moe_calibration)
        elif static_acts:  # observe the float model before any module is swapped
            with calibrating_experts(model, moe_calibration):
                calibration = calibrate_static(
                    model, static_acts, calib, tokenizer=tokenizer, observer=observer,
                    n_samples=calib_samples, seq_len=calib_seq_len, batch_size=calib_batch_size,
                )
    except ValueError as e:
        starved = any(w in str(e) for w in ("statistics", "no data", "no calibration tokens"))
        if moe_calibration == "routed" and ".experts." in str(e) and starved:
            raise ValueError(f"{e} (with moe_calibration='routed' an expert the calibration "
                             "text routes no token to has no statistics: pass more text, or "
                             "moe_calibration='all')") from None
        raise
    if not sequential and static_acts:
        for name, new in replacements:
            if name in calibration.qparams:
                set_input_qparams(new, calibration.qparams[name])
        summary.notes.append(calibration.describe())
    elif not sequential and calib is not None:
        summary.notes.append("calib ignored: no spec quantizes activations statically")
    for name, new in replacements:
        _set_submodule(model, name, new)
    fuse_experts(model, fuse_back)  # as the model loaded whole keeps them
    aliases = [(alias, name) for alias, name in aliases  # of a module quantized above
               if isinstance(model.get_submodule(name), (QuantLinear, QuantConv2d, QuantEmbedding))]
    for alias, name in aliases:
        _set_submodule(model, alias, model.get_submodule(name))
    if aliases:
        summary.notes.append("one module under several names, quantized once: " + ", ".join(
            f"{alias!r} is {name!r}" for alias, name in aliases))
    if unfused:
        calibrated = ""
        if alg.needs_calibration or static_acts:
            calibrated = (" and calibrated on every calibration token, not only those routed "
                          "to them" if moe_calibration == "all" else
                          " and calibrated on the tokens routed to them")
        summary.notes.append(
            f"{len(unfused)} fused MoE experts modules split into one Linear per expert "
            f"projection (names like {unfused[0]}.0.down_proj){calibrated}")
    if any(m.kind in ("Linear", "Conv1D", "Conv2d") for m in summary.quantized):
        summary.notes.append("biases are kept in float")
    left = _float_stacks(model)
    if left:
        from lowbit.eval.size import human_bytes

        total = sum(nbytes for _, nbytes in left)
        names = ", ".join(name for name, _ in left[:3]) + (
            f" and {len(left) - 3} more" if len(left) > 3 else "")
        summary.notes.append(
            f"{len(left)} float tensors of 3+ dims outside any Linear / Conv2d / Embedding stay "
            f"float, {human_bytes(total)}: {names} (lowbit has no quantized module for them)")
    model.lowbit_summary = summary
    return model


def _float_stacks(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, bytes)`` of float parameters with 3+ dims (2+ of them above 1) that no module
    lowbit quantizes holds (e.g. fused experts of a class models/experts.py cannot split, an
    nn.Conv1d), largest first: the summary says they stay float."""
    found = []
    for name, module in model.named_modules():
        if _kind(module) is not None or isinstance(module, (QuantLinear, QuantConv2d,
                                                            QuantEmbedding)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dim() >= 3 and sum(d > 1 for d in p.shape) >= 2:
                found.append((f"{name}.{pname}" if name else pname,
                              p.numel() * p.element_size()))
    return sorted(found, key=lambda item: -item[1])


def _run_sequential(
    model: nn.Module, chosen: dict[str, QuantSpec], before_bytes: dict[str, int],
    alg: Algorithm, calib: Any, reader: Any, summary: QuantizeSummary,
    static_acts: dict[str, QuantSpec], *, tokenizer: Any, observer: str, calib_samples: int,
    calib_seq_len: int, calib_batch_size: int, progress: Callable[[str], None] | None,
    show_progress: bool, moe_calibration: str = "all",
) -> None:
    """Layer-by-layer quantization of ``chosen`` (lowbit.calib.sequential); fills ``summary``."""
    from lowbit.calib.sequential import quantize_sequential

    uses_calib = alg.needs_calibration or bool(static_acts)
    batches = (as_batches(calib, tokenizer, calib_samples, calib_seq_len,
                          batch_size=calib_batch_size) if uses_calib else None)
    with calibrating_experts(model, moe_calibration):
        result = quantize_sequential(
            model, chosen, alg, batches, reader=reader, observer=observer,
            show_progress=show_progress,
            on_layer=None if progress is None else (lambda layer: progress(layer.name)),
        )
    for layer in result.layers:
        new = model.get_submodule(layer.name)
        reason = layer.note or ("weight transposed from Conv1D [in, out]"
                                if layer.kind == "Conv1D" else "")
        summary.modules.append(ModuleReport(
            layer.name, layer.kind, str(layer.spec), "quantized", reason,
            before_bytes[layer.name], new.weight_nbytes, layer.error,
        ))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    summary.modules.sort(key=lambda m: order.get(m.name, len(order)))
    if batches is not None:
        n_seq = sum(int(b.shape[0]) for b in batches)
        n_tok = sum(b.numel() if not b.dtype.is_floating_point else b.numel() // b.shape[-1]
                    for b in batches)
        summary.notes.append(
            f"algorithm {alg!r} run layer by layer over {result.blocks} blocks on {n_seq} "
            f"calibration sequences ({n_tok:,} tokens)"
        )
    elif calib is not None:
        summary.notes.append("calib ignored: no spec quantizes activations statically")
    if reader is not None:
        summary.notes.append("memory bounded: blocks were read from disk one at a time")
    summary.notes.extend(result.notes)


def _check_selection(
    model: nn.Module, spec: Any, include: list[str] | None, exclude: list[str],
    kept_in_float: dict[int, str],
) -> None:
    """Raise ValueError when include / exclude / spec patterns leave no module to quantize
    although the model has some (a mistyped pattern would otherwise write a float copy). Not
    when the patterns select modules quantized already (a call repeated on its own output).
    kept_in_float: ``_kept_in_float(model)``."""
    names, reasons = [], Counter()
    for name, module in model.named_modules():
        chosen, why = choose_spec(name, spec, include, exclude)
        if isinstance(module, (QuantLinear, QuantConv2d, QuantEmbedding)):
            if chosen is not None:
                return
            continue
        if _kind(module) is None:
            continue
        names.append(name)
        if chosen is not None and id(module) not in kept_in_float:
            return
        reasons[why if chosen is None else kept_in_float[id(module)]] += 1
    if not names:
        return
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    examples = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))
    experts = {**fused_experts(model), **{n: m for n, m in model.named_modules()
                                          if isinstance(m, LinearExperts)}}
    moe = ""
    if experts:
        example = expert_linear_names(*next(iter(experts.items())))[0]
        moe = f"; MoE experts are selected by the names of their split Linears, like {example!r}"
    raise ValueError(
        f"no module left to quantize: {len(names)} candidates ({why}); module names look "
        f"like {', '.join(map(repr, examples))}{moe}"
    )


def _quantize_module(
    module: nn.Module, kind: str, spec: QuantSpec, alg: Algorithm | None = None
) -> nn.Module:
    if kind in ("Linear", "Conv1D"):
        weight, _ = linear_weight(module)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"weight has {bad} NaN/Inf values")
        if alg is None or alg.name == "rtn":
            return QuantLinear.from_float(module, spec)
        return QuantLinear.from_float(module, spec, qweight=alg.quantize_weight(
            weight.detach(), spec, None))
    if kind == "Conv2d":
        return QuantConv2d(module, spec)
    return QuantEmbedding(module, spec)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
