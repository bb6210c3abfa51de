"""Quantization-aware training: fake-quant modules with STE and learned step sizes (LSQ / LSQ+).

``prepare(model, spec)`` swaps Linear / GPT-2 Conv1D / Embedding modules for QAT modules that hold
the float weight plus the quantization parameters and fake-quantize the weight in every forward:

    v = w/s_st + z_st;  q = clamp(round_ste(v), qmin, qmax);  w~ = (q - qmin + (qmin - z_st))*s_st

with exactly the float32 operations of ``lowbit.quant.maps.affine_codes`` / ``affine_values``, and
``s_st``/``z_st`` the *stored* values (scale cast to ``spec.scale_dtype``, an integer zero-point
rounded and cast to ``spec.zero_dtype``) with straight-through gradients through those casts. So
``convert(model)`` -> packed ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding`` modules whose
outputs equal the fake-quant model's bit for bit (on the reference kernel).

learn: "lsq" (learned step size, LSQ gradient scale ``g = 1/sqrt(N * Q_p)``, N weights per scale,
Q_p = qmax), "lsq+" (also a learned offset, MSE-searched initial range), "fixed" (qparams frozen
at their initial values; only the weights learn, plain STE QAT).
init: "rtn" (min-max), "hqq" (HQQ-refined); a model already quantized by ``lowbit.quantize``
(e.g. with GPTQ) can be passed to ``prepare``: its dequantized weights and qparams are the start.

Activations (W*A* specs such as ``w8a8`` / ``w8a8-static``, Linear and Conv1D only): the input is
fake-quantized too, per token from its min-max for dynamic specs, with one learned per-tensor
step (and, for asymmetric specs under "lsq+", offset) for static ones, initialised from the
observed range of calibration data (``prepare(..., calib=...)``). Weight and activation codes
equal the converted module's, but the float matmul of the fake-quant values sums in another
order than the integer kernel: a converted layer matches its fake-quant layer to float32
rounding, and a later layer, whose input then differs by that rounding, can flip an activation
code at a rounding tie (not bit for bit).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.calib.training import DivergedError, check_stream, qat_loss, sample_batch, train
from lowbit.quant.layout import Layout, layout_for
from lowbit.quant.maps import (
    QParams,
    choose_qparams,
    keep_better,
    qparams_from_range,
    qrange,
    symmetric_zero,
)
from lowbit.spec import QuantSpec, as_spec, torch_dtype
from lowbit.tensor import QuantizedTensor

LEARN_MODES = ("lsq", "lsq+", "fixed")
INITS = ("rtn", "hqq")


# ---- straight-through pieces (custom Functions: forward values are exact, no a + (b - a)) ------
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


class _CastSTE(torch.autograd.Function):
    """Round-trip through a storage dtype in the forward; identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: D102
        return x.to(dtype).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class _GradScale(torch.autograd.Function):
    """Identity in the forward; gradient times ``g`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:  # noqa: D102
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even, as the maps) with gradient 1."""
    return _RoundSTE.apply(x)


def lsq_grad_scale(spec: QuantSpec, layout: Layout) -> float:
    """LSQ's ``g = 1 / sqrt(N * Q_p)``: N weights share a scale, Q_p = qmax of the spec."""
    n = layout.block_rows * layout.block_cols
    return 1.0 / math.sqrt(n * max(qrange(spec)[1], 1))


def _check_spec(spec: QuantSpec) -> None:
    if spec.kind != "affine":
        raise ValueError(
            f"spec {spec} ({spec.format}) is a {spec.kind} grid; QAT learns the step size of "
            "integer (intN/uintN) affine grids only, a fixed codebook or k-means palette has no "
            "step to learn"
        )
    if spec.rounding != "nearest":
        raise ValueError(f"spec {spec}: QAT needs rounding='nearest'")
    if spec.double_quantized:
        raise ValueError(f"spec {spec}: QAT learns float scales; double-quantized scale codes "
                         f"(scale_bits) are not learned: train {spec.plain_scales()} and "
                         "quantize the result")
    act = spec.act
    if act is None:
        return
    if act.kind != "affine" or act.bits > 8 or act.rounding != "nearest":
        raise ValueError(
            f"activation spec {act}: QAT fake-quantizes integer (intN/uintN, <= 8 bits) "
            "activations with rounding='nearest'"
        )
    allowed = ("token", "tensor") if act.dynamic else ("tensor",)
    if act.granularity not in allowed:
        raise ValueError(
            f"activation spec {act}: granularity={act.granularity!r}; allowed for "
            f"{'dynamic' if act.dynamic else 'static'} activations: {', '.join(allowed)}"
        )


def _mse_range_init(wb: torch.Tensor, spec: QuantSpec, grid: int = 20) -> QParams:
    """LSQ+ style init: per block, the shrunk min-max range (ratio 0.5..1) with least MSE."""
    lo, hi = wb.amin(-1), wb.amax(-1)
    best: QParams | None = None
    best_err = None
    for ratio in torch.linspace(0.5, 1.0, grid).tolist():
        qp = qparams_from_range(lo * ratio, hi * ratio, spec)
        err = (fake_quant_blocked(wb, spec, qp.scale.float(), _zero_of(spec, qp)) - wb).pow(2)
        err = err.mean(-1)
        if best is None:
            best, best_err = qp, err
            continue
        best_err = keep_better(best, best_err, qp, err)
    return best


def _zero_of(spec: QuantSpec, qp: QParams) -> torch.Tensor | int:
    return qp.zero_point.float() if spec.has_zero_point else symmetric_zero(spec)


def fake_quant_blocked(
    wb: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | int
) -> torch.Tensor:
    """Affine fake-quant of a blocked view ``[nr, nc, n]`` with float32 stored-value qparams
    ``[nr, nc]``; differentiable (STE on the rounding). Same float ops as affine_codes/values."""
    qmin, qmax = qrange(spec)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1) if isinstance(zero, torch.Tensor) else zero
    v = wb / s
    if not isinstance(z, int) or z:
        v = v + z
    codes = round_ste(v).clamp(qmin, qmax) - qmin
    return (codes + (qmin - z)) * s


def stored_scale(scale: torch.Tensor, spec: QuantSpec, learn: str, grad_scale: float
                 ) -> torch.Tensor:
    """A learned scale as it will be stored (``spec.scale_dtype``; positive, or of either sign
    for symmetric specs), as float32; LSQ gradient scaling unless ``learn == 'fixed'``,
    straight-through through the cast."""
    dtype = torch_dtype(spec.scale_dtype)
    s = _GradScale.apply(scale, grad_scale) if learn != "fixed" else scale
    # the smallest subnormal, as PTQ's scales (finfo.tiny, the smallest normal, is ~1000x
    # larger for fp16 and clamped small weights' scales)
    smallest = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    if spec.symmetric:  # a negative scale (full range, or one read from a checkpoint made
        # with it) keeps its sign: only the magnitude is bounded
        s = torch.where(s < 0, -(-s).clamp(min=smallest), s.clamp(min=smallest))
    else:
        s = s.clamp(min=smallest)
    return _CastSTE.apply(s, dtype)


def stored_zero(zero: torch.Tensor | None, spec: QuantSpec, learn: str, grad_scale: float
                ) -> torch.Tensor | int:
    """A zero-point as stored (integer-valued for zero_point='int'), float32, STE grads; the
    fixed mid-grid offset for symmetric specs (``zero is None``)."""
    if zero is None:
        return symmetric_zero(spec)
    if learn == "lsq+":
        zero = _GradScale.apply(zero, grad_scale)
    if spec.zero_point == "int":
        qmin, qmax = qrange(spec)
        zero = round_ste(zero).clamp(qmin, qmax)
    return _CastSTE.apply(zero, torch_dtype(spec.zero_dtype))


class _FakeQuantWeight(nn.Module):
    """A float weight plus its (learnable) scale / zero-point; ``fake_weight()`` is Q^-1(Q(w))."""

    def _init_fq(self, weight: torch.Tensor, spec: QuantSpec, learn: str, init: str,
                 qparams: QParams | None, train_weight: bool) -> None:
        if learn not in LEARN_MODES:
            raise ValueError(f"learn={learn!r}; allowed: {', '.join(LEARN_MODES)}")
        if init not in INITS:
            raise ValueError(
                f"init={init!r}; allowed: {', '.join(INITS)} (for GPTQ, quantize the model with "
                "lowbit.quantize(..., algorithm='gptq') and pass it to prepare)"
            )
        _check_spec(spec)
        self.spec, self.learn = spec, learn
        self.layout = layout_for(weight.shape, spec)
        w = weight.detach().float().clone()
        self.weight = nn.Parameter(w, requires_grad=train_weight)
        self.weight_dtype = weight.dtype
        wb = self.layout.blocked(self.layout.to_2d(w))
        if qparams is None:
            if learn == "lsq+":
                qparams = _mse_range_init(wb, spec)
            elif init == "hqq":
                from lowbit.algorithms.hqq import HQQ

                qparams = HQQ().refine(w, spec)
            else:
                qparams = choose_qparams(w, spec)
        learn_scale = learn in ("lsq", "lsq+")
        self.scale = nn.Parameter(qparams.scale.float().clone(), requires_grad=learn_scale)
        if spec.has_zero_point:
            self.zero_point = nn.Parameter(
                qparams.zero_point.float().clone(), requires_grad=learn == "lsq+"
            )
        else:
            self.zero_point = None
        self.grad_scale = lsq_grad_scale(spec, self.layout)

    def stored_scale(self) -> torch.Tensor:
        """The scale as it will be stored (spec.scale_dtype), as float32, STE grads."""
        return stored_scale(self.scale, self.spec, self.learn, self.grad_scale)

    def stored_zero(self) -> torch.Tensor | int:
        """The zero-point as stored (integer-valued for zero_point='int'), float32, STE grads."""
        return stored_zero(self.zero_point, self.spec, self.learn, self.grad_scale)

    def fake_weight(self) -> torch.Tensor:
        """Q^-1(Q(w)) in the logical shape, float32, differentiable in w, scale and zero."""
        w = self.weight
        if self.weight_dtype != torch.float32:  # convert() quantizes the weight in its dtype
            w = _CastSTE.apply(w, self.weight_dtype)
        wb = self.layout.blocked(self.layout.to_2d(w))
        out = fake_quant_blocked(wb, self.spec, self.stored_scale(), self.stored_zero())
        return self.layout.from_2d(self.layout.unblocked(out))

    def quantized_weight(self) -> QuantizedTensor:
        """The packed QuantizedTensor of the current weight with the stored qparams."""
        with torch.no_grad():
            scale = self.stored_scale().to(torch_dtype(self.spec.scale_dtype))
            zero = self.stored_zero()
            qp = QParams(
                scale=scale,
                zero_point=zero.to(torch_dtype(self.spec.zero_dtype))
                if self.zero_point is not None else None,
            )
            return QuantizedTensor.from_float(
                self.weight.detach().to(self.weight_dtype), self.spec, qp
            )


class QATLinear(_FakeQuantWeight):
    """``y = x @ fake_quant(W)^T + b`` with ``W [out, in]`` float32 (GPT-2 Conv1D transposed)."""

    def __init__(self, module: nn.Module, spec: QuantSpec, *, learn: str = "lsq",
                 init: str = "rtn", train_weight: bool = True) -> None:
        super().__init__()
        from lowbit.nn.modules import QuantLinear, linear_weight

        qparams = None
        if isinstance(module, QuantLinear):  # start from a PTQ result (GPTQ, HQQ, ...)
            qt = module.qweight
            if qt.g_idx is not None:
                raise ValueError("QAT cannot start from act-order (g_idx) GPTQ weights")
            if qt.spec != spec:
                raise ValueError(f"module is quantized with {qt.spec}, prepare asked for {spec}")
            weight, bias = qt.dequantize(torch.float32), module.bias
            qparams = qt.qparams
        else:
            weight, bias = linear_weight(module)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_fq(weight, spec, learn, init, qparams, train_weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                            requires_grad=train_weight)
        act = spec.act
        self.act_scale = self.act_zero_point = None
        if act is not None and not act.dynamic:
            # Static activations: one learned per-tensor scale (LSQ, gradient scale
            # 1/sqrt(in_features * Q_p)); prepare() sets it from calibration (set_act_qparams).
            learn_scale = learn in ("lsq", "lsq+")
            self.act_scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
            if act.has_zero_point:
                self.act_zero_point = nn.Parameter(torch.zeros(1), requires_grad=learn == "lsq+")
            self.act_grad_scale = 1.0 / math.sqrt(self.in_features * max(qrange(act)[1], 1))

    def set_act_qparams(self, qparams: QParams) -> None:
        """Start the static activation scale (and zero-point) from calibrated per-tensor qparams."""
        if self.act_scale is None:
            raise ValueError(f"spec {self.spec} has no static activations")
        with torch.no_grad():
            self.act_scale.copy_(qparams.scale.float().reshape(1))
            if self.act_zero_point is not None:
                self.act_zero_point.copy_(qparams.zero_point.float().reshape(1))

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q^-1(Q(x)) of the input ``[..., in_features]`` under ``spec.act``: per-token (or
        per-tensor) min-max qparams for dynamic specs, the learned per-tensor scale for static
        ones; straight-through gradients (zero where the static range clips)."""
        act = self.spec.act
        x2d = x.reshape(-1, x.shape[-1]).float()
        layout = layout_for(x2d.shape, act)
        if act.dynamic:
            qp = choose_qparams(x2d.detach(), act)
            scale, zero = qp.scale.float(), _zero_of(act, qp)
        else:
            scale = stored_scale(self.act_scale, act, self.learn, self.act_grad_scale)
            zero = stored_zero(self.act_zero_point, act, self.learn, self.act_grad_scale)
            scale = scale.reshape(1, 1)
            zero = zero.reshape(1, 1) if isinstance(zero, torch.Tensor) else zero
        out = fake_quant_blocked(layout.blocked(x2d), act, scale, zero)
        return layout.unblocked(out).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.spec.act is not None:
            x = self.fake_input(x)
        return F.linear(x, self.fake_weight().to(self.weight_dtype).to(x.dtype), b)

    def to_quantized(self) -> nn.Module:
        from lowbit.calib.observe import set_input_qparams
        from lowbit.nn.modules import QuantLinear

        q = QuantLinear(self.in_features, self.out_features, self.spec, self.bias is not None,
                        self.weight_dtype, self.weight.device)
        q.set_weight(self.quantized_weight())
        if self.bias is not None:
            q.bias = self.bias.detach().to(self.weight_dtype).clone()
        if self.act_scale is not None:
            act = self.spec.act
            with torch.no_grad():
                scale = stored_scale(self.act_scale, act, self.learn, self.act_grad_scale)
                zero = stored_zero(self.act_zero_point, act, self.learn, self.act_grad_scale)
            set_input_qparams(q, QParams(scale=scale, zero_point=zero
                                         if self.act_zero_point is not None else None))
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"spec={self.spec}, learn={self.learn}")


class QATEmbedding(_FakeQuantWeight):
    """``nn.Embedding`` whose table is fake-quantized (weight only)."""

    def __init__(self, emb: nn.Embedding, spec: QuantSpec, *, learn: str = "lsq",
                 init: str = "rtn", train_weight: bool = True) -> None:
        super().__init__()
        self.padding_idx = emb.padding_idx
        self._init_fq(emb.weight, spec, learn, init, None, train_weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.fake_weight().to(self.weight_dtype), self.padding_idx)

    def to_quantized(self) -> nn.Module:
        from lowbit.nn.modules import QuantEmbedding

        emb = nn.Embedding(*self.weight.shape, padding_idx=self.padding_idx,
                           dtype=self.weight_dtype, device=self.weight.device)
        with torch.no_grad():
            emb.weight.copy_(self.weight.detach())
        q = QuantEmbedding(emb, self.spec)
        q.set_weight(self.quantized_weight())
        return q


class QATConv2d(_FakeQuantWeight):
    """``nn.Conv2d`` whose weight ``[out, in/groups, kh, kw]`` is fake-quantized."""

    def __init__(self, conv: nn.Conv2d, spec: QuantSpec, *, learn: str = "lsq",
                 init: str = "rtn", train_weight: bool = True) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={conv.padding_mode!r}; supported: 'zeros'")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_fq(conv.weight, spec, learn, init, None, train_weight)
        self.bias = None if conv.bias is None else nn.Parameter(
            conv.bias.detach().float().clone(), requires_grad=train_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        w = self.fake_weight().to(self.weight_dtype).to(x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def to_quantized(self) -> nn.Module:
        from lowbit.nn.modules import QuantConv2d

        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         dtype=self.weight_dtype, device=self.weight.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight.detach())
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        q = QuantConv2d(conv, self.spec)
        q.set_weight(self.quantized_weight())
        return q

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"spec={self.spec}, learn={self.learn}")


QAT_MODULES = (QATLinear, QATEmbedding, QATConv2d)


def prepare(
    model: nn.Module,
    spec: str | QuantSpec | dict[str, Any],
    *,
    learn: str = "lsq",
    init: str = "rtn",
    train: str = "all",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    calib: Any = None,
    tokenizer: Any = None,
    observer: str = "minmax",
    calib_samples: int = 32,
    calib_seq_len: int = 512,
) -> nn.Module:
    """Swap Linear / Conv1D / Embedding (and PTQ QuantLinear) modules for QAT modules, in place.

    spec: a preset name, QuantSpec or ``{pattern: spec}`` (as ``lowbit.quantize``).
    learn: "lsq" | "lsq+" | "fixed"; init: "rtn" | "hqq" (ignored for QuantLinear inputs).
    train: "all" (weights and qparams learn; other float parameters too) or "scales" (only the
        quantization parameters learn, EfficientQAT's E2E-QP; every other parameter is frozen).
    Linear, GPT-2 Conv1D, Conv2d and Embedding layers are swapped for fake-quant modules.
    calib, tokenizer, observer, calib_samples, calib_seq_len: for specs with static activations
        only (as ``lowbit.quantize``): the observed input range of each layer is the initial
        learned activation step.
    """
    from lowbit.api import (
        ModuleReport,
        QuantizeSummary,
        _kept_in_float,
        _kind,
        _set_submodule,
        _weight_bytes,
    )
    from lowbit.models.select import choose_spec, patterns
    from lowbit.nn.modules import QuantLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if train not in ("all", "scales"):
        raise ValueError(f"train={train!r}; allowed: all, scales")
    if learn not in LEARN_MODES:
        raise ValueError(f"learn={learn!r}; allowed: {', '.join(LEARN_MODES)}")
    if learn == "fixed" and train == "scales":
        raise ValueError("learn='fixed' with train='scales' leaves nothing to train")
    if isinstance(spec, (str, QuantSpec)):
        spec = as_spec(spec)
    include, exclude = patterns(include), patterns(exclude) or []
    train_weight = train == "all"
    summary = QuantizeSummary()
    kept_in_float = _kept_in_float(model)
    stored_dtype = getattr(model, "_lowbit_stored_dtype", None)
    swaps: list[tuple[str, nn.Module]] = []
    static_acts: dict[str, QuantSpec] = {}
    for name, module in model.named_modules():
        kind = "Linear" if isinstance(module, QuantLinear) else _kind(module)
        if kind is None:
            continue
        before = _weight_bytes(module, stored_dtype) if kind != "Linear" or not isinstance(
            module, QuantLinear) else module.weight_nbytes

        def skip(reason: str, _n=name, _k=kind, _b=before) -> None:
            summary.modules.append(ModuleReport(_n, _k, None, "skipped", reason, _b, _b))

        if id(module) in kept_in_float:
            skip(kept_in_float[id(module)])
            continue
        layer_spec, why = choose_spec(name, spec, include, exclude)
        if layer_spec is None:
            skip(why)
            continue
        note = f"QAT ({learn})"
        if layer_spec.act is not None and kind in ("Embedding", "Conv2d"):
            layer_spec = layer_spec.replace(act=None)
            note += f"; {kind}: weight part of the spec only"
        try:
            if kind == "Conv2d":
                new = QATConv2d(module, layer_spec, learn=learn, init=init,
                                train_weight=train_weight)
            elif kind == "Embedding":
                new = QATEmbedding(module, layer_spec, learn=learn, init=init,
                                   train_weight=train_weight)
            else:
                new = QATLinear(module, layer_spec, learn=learn, init=init,
                                train_weight=train_weight)
        except (ValueError, TypeError) as e:
            raise ValueError(f"layer {name!r} ({kind}): {e}") from None
        swaps.append((name, new))
        if getattr(new, "act_scale", None) is not None:
            static_acts[name] = layer_spec.act
        summary.modules.append(ModuleReport(name, kind, str(layer_spec), "quantized", note,
                                            before, before))
    if not swaps and summary.modules:
        reasons = Counter(m.reason for m in summary.modules)
        raise ValueError(f"no module left to train: {len(summary.modules)} candidates ("
                         + ", ".join(f"{n} {why}" for why, n in reasons.most_common()) + ")")
    if train == "scales":  # only the new modules' qparams train
        for p in model.parameters():
            p.requires_grad_(False)
    if static_acts:
        if calib is None:
            raise ValueError(
                f"spec {static_acts[next(iter(static_acts))]} quantizes activations statically; "
                "pass calib=... (texts, token ids or batches) to set the initial activation steps"
            )
        from lowbit.calib import calibrate_static

        calibration = calibrate_static(model, static_acts, calib, tokenizer=tokenizer,
                                       observer=observer, n_samples=calib_samples,
                                       seq_len=calib_seq_len)
        new_modules = dict(swaps)
        for name, qp in calibration.qparams.items():
            new_modules[name].set_act_qparams(qp)
        summary.notes.append(calibration.describe())
    for name, new in swaps:
        _set_submodule(model, name, new)
    model.lowbit_summary = summary
    return model


def qat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The QAT modules of a prepared model, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QAT_MODULES)]


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable scales and zero-points of a prepared model."""
    out = []
    for _, m in qat_modules(model):
        params = (m.scale, m.zero_point, getattr(m, "act_scale", None),
                  getattr(m, "act_zero_point", None))
        out += [p for p in params if p is not None and p.requires_grad]
    return out


def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT module by its packed quantized module (QuantLinear / QuantEmbedding).

    The result's outputs equal the fake-quant model's bit for bit on the reference kernel.
    """
    from lowbit.api import _set_submodule

    mods = qat_modules(model)
    if not mods:
        raise ValueError("model has no QAT modules; call lowbit.qat.prepare(model, spec) first")
    summary = getattr(model, "lowbit_summary", None)
    for name, m in mods:
        new = m.to_quantized()
        _set_submodule(model, name, new)
        if summary is not None:
            for report in summary.modules:
                if report.name == name:
                    report.bytes_after = new.weight_nbytes
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_optimizer(model: nn.Module, lr: float = 0.02, weight_lr: float = 1e-4
                   ) -> torch.optim.Optimizer:
    """Adam for a prepared model.

    lr is relative for scales: each QAT module's learned weight (or activation) scales step by
    ``lr x`` their mean magnitude when the optimizer is made, so one lr suits a 2-bit grid and
    an 8-bit grid whose steps differ 100x (an absolute Adam step would flip an int8 scale's sign
    in one update). Zero-points are in code units, already scale-free: they take ``lr`` as is.
    Every other trainable parameter (weights, biases, norms) takes ``weight_lr``.
    """
    if lr <= 0 or weight_lr <= 0:
        raise ValueError(f"lr={lr}, weight_lr={weight_lr}; allowed: positive floats")
    groups: list[dict] = []
    taken: set[int] = set()
    for _, m in qat_modules(model):
        for scale, zero in ((m.scale, m.zero_point),
                            (getattr(m, "act_scale", None), getattr(m, "act_zero_point", None))):
            if scale is not None and scale.requires_grad:
                magnitude = float(scale.detach().abs().mean())
                groups.append({"params": [scale], "lr": lr * max(magnitude, 1e-12)})
                taken.add(id(scale))
            if zero is not None and zero.requires_grad:
                groups.append({"params": [zero], "lr": lr})
                taken.add(id(zero))
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    if others:
        groups.append({"params": others, "lr": weight_lr})
    if not groups:
        raise ValueError("the model has no trainable parameters (prepare it with lowbit.qat)")
    return torch.optim.Adam(groups)


__all__ = [
    "INITS", "LEARN_MODES", "DivergedError", "check_stream", "make_optimizer", "qat_loss",
    "sample_batch", "train", "QATEmbedding", "QATLinear", "convert", "fake_quant_blocked",
    "lsq_grad_scale", "prepare", "qat_modules", "quant_parameters", "round_ste",
]
