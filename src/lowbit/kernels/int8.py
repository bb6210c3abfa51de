"""W8A8 integer kernels on CPU: exact integer references and an fbgemm-backed fast path.

Both compute ``y = x @ W^T + b`` for a QuantizedTensor ``W [N, K]`` whose spec carries an integer
activation spec (``spec.act``). Notation: ``qx`` are the activation codes of lowbit's own Q
(:func:`lowbit.quant.quantize` with ``spec.act``), ``zx`` their zero-point, ``sx`` their scale
(``[M, 1]`` per token for dynamic specs, the calibrated per-tensor ``qt.act_scale`` for static
ones); ``qw``, ``zw``, ``sw [N, 1]`` the same for the weight.

Dynamic (``act.dynamic``)::

    acc[m, n] = sum_k (qx - zx)[m, k] * (qw - zw)[n, k]          exact integer (int32 range)
    y = float32(acc) * sx[m]  then  * sw[n]  then  + bias        float32, in this order

Static (``not act.dynamic``), as integer-only runtimes do it::

    bias_q[n] = round_half_even(bias[n] / float32(sx * sw[n]))   int32 (see quantize_bias)
    acc[m, n] = sum_k (qx - zx)[m, k] * (qw - zw)[n, k] + bias_q[n]
    y = float32(acc) * sx  then  * sw[n]                         float32, in this order

``float32(acc)`` is exact while ``|acc| < 2**24``. The output is cast to ``x.dtype``.

The fast kernel (``int8-fbgemm``) runs the integer matmul through ``quantized::linear_dynamic``
(fbgemm on x86) on inputs that already are lowbit codes. The weight is prepacked once per layer
with scale 1 and zero-point 0 (cached in the module's kernel cache, never saved). Fbgemm's own
per-tensor activation quantization is made the identity: the input holds only integers in
``[0, 128]`` plus one extra row ``[255, 0, ...]``, so its range is exactly ``[0, 255]``, its
scale exactly 1 and its zero-point 0. Without VNNI, fbgemm multiplies uint8 x int8 pairs with
``vpmaddubsw``, which saturates pair sums at int16: ``a0*w0 + a1*w1`` with ``a`` up to 255 can
overflow (about 2% of outputs wrong on Gaussian data; benchmarks/int8_linear.py measures
it). Keeping ``a <= 128`` bounds
every pair sum by ``2 * 128 * 128 = 32768`` in magnitude (``-32768`` fits, and ``+`` needs
``w <= 127``), so the kernel splits signed codes into ``qx = pos - neg`` with
``pos, neg in [0, 128]`` and runs both halves in one call of ``2M + 1`` rows: exact, at twice the
integer work of a single (saturating) pass. Where one side has 7-bit codes (presets ``w7a8``:
int7 weights, ``w8a7``: int7 activations) no pair sum can saturate, so a single pass on the
shifted codes ``qx + c >= 0`` is exact; ``c * sum_k qw`` is subtracted after (see
:func:`one_pass_shift`). The float32 operations after the integer sum are the
reference's, so the two agree bit for bit while each half's ``|acc|`` (and a static
``|bias_q|``) stays below ``2**24``.
"""

from __future__ import annotations

import warnings

import torch

from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.quant.maps import QParams, check_finite, qparams_from_range, qrange, quantize
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_HALF_MAX = 128  # largest code fed to fbgemm per half; keeps vpmaddubsw pair sums in int16


# ---- spec checks ---------------------------------------------------------------------------
def _is_int_affine(spec: QuantSpec) -> bool:
    return spec.kind == "affine" and spec.bits <= 8 and (spec.symmetric or spec.zero_point == "int")


def _weight_ok(spec: QuantSpec, qt: QuantizedTensor) -> bool:
    per_channel = spec.granularity == "channel" and spec.axis in (0, -2)
    layout_ok = per_channel or spec.granularity == "tensor"
    return len(qt.shape) == 2 and _is_int_affine(spec) and layout_ok


def _int_act_mode(qt: QuantizedTensor) -> str | None:
    """'dynamic' / 'static' for an integer W*A* spec the reference handles, else None."""
    act = qt.spec.act
    if act is None or not _is_int_affine(act) or not _weight_ok(qt.spec, qt):
        return None
    if act.dynamic:
        return "dynamic" if act.granularity in ("token", "tensor") else None
    return "static"


def _fits(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return x.dtype.is_floating_point and x.dim() >= 1 and x.shape[-1] == qt.shape[1]


def _reference_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return _int_act_mode(qt) is not None and _fits(qt, x)


def _signed_symmetric(spec: QuantSpec) -> bool:
    return spec.kind == "affine" and spec.signed and spec.symmetric and spec.bits <= 8


def _fast_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    mode = _int_act_mode(qt)
    act = qt.spec.act
    return (
        mode is not None
        and engine is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and _fits(qt, x)
        and _signed_symmetric(qt.spec)
        and _signed_symmetric(act)
        and act.rounding == "nearest"
    )


# ---- integer pieces shared by both kernels ------------------------------------------------
def _centered_weight(qt: QuantizedTensor) -> torch.Tensor:
    """``qw - zw`` as int16 ``[N, K]``."""
    spec = qt.spec
    qmin, _ = qrange(spec)
    codes = qt.codes().to(torch.int16) + qmin
    if spec.has_zero_point:
        return codes - qt.zero_point.float().round().to(torch.int16)
    return codes - (0 if spec.signed else 1 << (spec.bits - 1))


def _weight_scale(qt: QuantizedTensor) -> torch.Tensor:
    """``sw`` as float32 ``[1, N]`` (per channel) or ``[1, 1]`` (per tensor)."""
    return qt.scale.float().reshape(1, -1)


def _static_act_qparams(qt: QuantizedTensor) -> tuple[QuantSpec, QParams]:
    """The per-tensor activation spec and the calibrated qparams of a static spec."""
    act = qt.spec.act
    if qt.act_scale is None:
        raise ValueError(
            f"spec {qt.spec} has static activations but act_scale is unset; calibrate the model "
            "(lowbit.quantize(..., calib=...)) or use a dynamic activation spec"
        )
    if act.has_zero_point and qt.act_zero_point is None:
        raise ValueError(f"spec {qt.spec} needs act_zero_point (asymmetric static activations)")
    zero = qt.act_zero_point.float().reshape(1, 1) if act.has_zero_point else None
    return act.replace(granularity="tensor"), QParams(
        scale=qt.act_scale.float().reshape(1, 1), zero_point=zero
    )


def quantize_activation(
    x2d: torch.Tensor, qt: QuantizedTensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """lowbit's Q of activations ``x2d [M, K]`` under ``qt.spec.act``.

    Returns ``(qx - zx)`` as int16 ``[M, K]`` and ``sx`` as float32 ``[M, 1]`` (dynamic per
    token) or ``[1, 1]`` (per tensor, dynamic or static).
    """
    act = qt.spec.act
    if act.dynamic:
        spec, qparams = act, None
    else:
        spec, qparams = _static_act_qparams(qt)
    codes, qp, _ = quantize(x2d, spec, qparams)
    qmin, _ = qrange(spec)
    centered = codes.to(torch.int16) + qmin
    if spec.has_zero_point:
        centered = centered - qp.zero_point.float().round().to(torch.int16)
    elif not spec.signed:
        centered = centered - (1 << (spec.bits - 1))
    return centered, qp.scale.float()


def quantize_bias(
    bias: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Bias ``[N]`` -> int32 codes ``round_half_even(bias / float32(sx * sw))``, saturated.

    act_scale: float32 ``[1]`` (per tensor); weight_scale: ``[N, 1]``, ``[N]`` or ``[1, 1]``.
    The bias scale is the float32 product ``sx * sw``, as in integer-only runtimes.
    """
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        raise ValueError(f"bias must be a 1-D tensor [N], got {getattr(bias, 'shape', bias)}")
    if act_scale.numel() != 1:
        raise ValueError(f"act_scale must hold one per-tensor scale, got shape "
                         f"{tuple(act_scale.shape)}")
    bias_scale = act_scale.float().reshape(()) * weight_scale.float().reshape(-1)
    if bias_scale.numel() not in (1, bias.numel()):
        raise ValueError(
            f"weight_scale has {bias_scale.numel()} entries; bias [N={bias.numel()}] needs 1 or N"
        )
    q = torch.round(bias.float() / bias_scale).clamp(INT32_MIN, INT32_MAX)
    return q.to(torch.int64).clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def _scale_out(
    acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``(acc * sx) * sw (+ bias)`` in float32, the one order both kernels use."""
    y = acc * sx
    y.mul_(sw)
    if bias is not None:
        y.add_(bias.float())
    return y


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _empty_out(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_zeros(*x.shape[:-1], qt.shape[0])
    return out if bias is None else out + bias.to(x.dtype)


# ---- reference ----------------------------------------------------------------------------
def int8_reference_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Exact integer W*A* reference (see the module docstring); ``x [..., K] -> [..., N]``."""
    mode = _int_act_mode(qt)
    if mode is None:
        raise ValueError(f"int8 reference kernel does not handle spec {qt.spec}")
    x2d = _flatten(x)
    if x2d.shape[0] == 0:
        return _empty_out(x, qt, bias)
    xc, sx = quantize_activation(x2d, qt)
    # float64 products of integers stay exact while |acc| < 2**53.
    acc = (xc.double() @ _centered_weight(qt).double().T).round().to(torch.int64)
    sw = _weight_scale(qt)
    if mode == "static" and bias is not None:
        acc = acc + quantize_bias(bias, qt.act_scale, sw).to(torch.int64)
        bias = None
    y = _scale_out(acc.float(), sx, sw, bias)
    return y.reshape(*x.shape[:-1], qt.shape[0]).to(x.dtype)


def act_reference_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Oracle for integer activations (dynamic, or static with calibrated scales) with weights
    the integer reference does not take (group-wise, float zero-points, codebooks):
    ``Q^-1(Q(x)) @ dequantize(W)^T + b`` in float64, cast to ``x.dtype``; ``x [..., K] ->
    [..., N]``."""
    x2d = _flatten(x)
    if x2d.shape[0] == 0:
        return _empty_out(x, qt, bias)
    xc, sx = quantize_activation(x2d, qt)
    y = (xc.double() @ qt.dequantize(torch.float64).T) * sx.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], qt.shape[0]).to(x.dtype)


def _act_reference_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    act = qt.spec.act
    return (
        act is not None
        and _is_int_affine(act)
        and act.granularity in ("token", "tensor")  # a static act spec is per tensor
        and len(qt.shape) == 2
        and _fits(qt, x)
        and not _reference_supports(qt, x)
    )


# ---- fast CPU path through fbgemm ---------------------------------------------------------
def _pick_engine() -> str | None:
    supported = torch.backends.quantized.supported_engines
    for name in ("fbgemm", "x86", "onednn"):
        if name in supported:
            return name
    return None


# Quantized engine used to prepack weights (None: no int8 engine, the fast kernel is off).
# fbgemm measured fastest or tied with x86/onednn here (benchmarks/results/int8_linear.md).
engine: str | None = _pick_engine()


def prepack_weight(qt: QuantizedTensor, engine_name: str | None = None) -> torch.ScriptObject:
    """Integer weight ``qw [N, K]`` (int8, scale 1, zero 0) packed for ``quantized::linear_*``."""
    name = engine_name or engine
    if name is None:
        raise ValueError("no quantized engine (fbgemm/x86/onednn) in this torch build")
    w = _centered_weight(qt)
    if int(w.min()) < -128 or int(w.max()) > 127:
        raise ValueError(f"weight codes of spec {qt.spec} do not fit int8")
    n = w.shape[0]
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized-tensor creation is deprecated, still works
            wq = torch._make_per_channel_quantized_tensor(
                w.to(torch.int8), torch.ones(n, dtype=torch.float64),
                torch.zeros(n, dtype=torch.int64), 0,
            )
            return torch.ops.quantized.linear_prepack(wq, None)
    finally:
        torch.backends.quantized.engine = previous


def _cached_prepack(qt: QuantizedTensor, cache: dict) -> tuple[torch.ScriptObject, torch.Tensor]:
    """The prepacked weight and its row sums ``sum_k (qw - zw)[n, k]`` (float32 ``[N]``)."""
    key = (engine, qt.qdata.data_ptr(), qt.qdata._version, tuple(qt.shape))
    hit = cache.get("int8-fbgemm")
    if hit is None or hit[0] != key:
        row_sums = _centered_weight(qt).sum(1, dtype=torch.int64).float()
        hit = (key, (prepack_weight(qt), row_sums))
        cache["int8-fbgemm"] = hit
    return hit[1]


def one_pass_shift(spec: QuantSpec) -> int | None:
    """The offset ``c`` that makes activation codes ``qx + c`` non-negative when a single
    ``vpmaddubsw`` pass cannot saturate, else None (two passes needed).

    A pair sum is at most ``2 * (qmax_a - qmin_a) * max|qw|``; it must fit int16. True for int7
    weights with int8 activations (``2 * 255 * 64``) and int8 weights with int7 activations
    (``2 * 127 * 128``), false for int8 x int8.
    """
    a_lo, a_hi = qrange(spec.act)
    w_lo, w_hi = qrange(spec)
    span = a_hi - a_lo
    if span > 2 * _HALF_MAX - 1 or 2 * span * max(-w_lo, w_hi) > 2**15 - 1:
        return None
    return -a_lo


def _fast_act_codes(x2d: torch.Tensor, qt: QuantizedTensor, out: torch.Tensor) -> torch.Tensor:
    """Signed codes of lowbit's Q written into ``out [M, K]`` (float32); returns ``sx``.

    Same float32 ops as :func:`lowbit.quant.quantize` for a symmetric signed spec.
    """
    act = qt.spec.act
    if act.dynamic:
        if act.granularity == "token":
            lo, hi = torch.aminmax(x2d, dim=1, keepdim=True)
        else:
            lo, hi = (t.reshape(1, 1) for t in torch.aminmax(x2d))
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
            check_finite(x2d, "activation")
        scale = qparams_from_range(lo, hi, act).scale.float()
    else:
        check_finite(x2d, "activation")
        scale = _static_act_qparams(qt)[1].scale
    qmin, qmax = qrange(act)
    torch.div(x2d, scale, out=out)
    out.round_().clamp_(qmin, qmax)
    return scale


def int8_fbgemm_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Exact W8A8 on CPU through fbgemm's int8 GEMM (see the module docstring)."""
    x2d = _flatten(x)
    m = x2d.shape[0]
    if m == 0:
        return _empty_out(x, qt, bias)
    packed, row_sums = _cached_prepack(qt, cache)
    shift = one_pass_shift(qt.spec)
    rows = m if shift is not None else 2 * m
    inputs = torch.empty(rows + 1, x2d.shape[1], dtype=torch.float32)
    inputs[rows].zero_()
    inputs[rows, 0] = 2 * _HALF_MAX - 1  # the range [0, 255] makes fbgemm's scale exactly 1
    if shift is not None:  # one pass on qx + c, then subtract c * sum_k qw
        sx = _fast_act_codes(x2d, qt, inputs[:m])
        inputs[:m].add_(shift)
        out = torch.ops.quantized.linear_dynamic(inputs, packed, False)
        acc = out[:m].sub_(row_sums * shift)
    else:  # two passes on the halves qx = pos - neg, each in [0, 128]
        pos, neg = inputs[:m], inputs[m : 2 * m]
        sx = _fast_act_codes(x2d, qt, pos)
        torch.neg(pos, out=neg).clamp_(min=0)
        pos.clamp_(min=0)
        out = torch.ops.quantized.linear_dynamic(inputs, packed, False)
        acc = out[:m].sub_(out[m : 2 * m])
    sw = _weight_scale(qt)
    if not qt.spec.act.dynamic and bias is not None:
        acc.add_(quantize_bias(bias, qt.act_scale, sw).float())
        bias = None
    y = _scale_out(acc, sx, sw, bias)
    return y.reshape(*x.shape[:-1], qt.shape[0])


# ---- registration -------------------------------------------------------------------------
register_kernel(
    Kernel("int8-reference", int8_reference_linear, _reference_supports, oracle=True)
)
register_kernel(Kernel("act-reference", act_reference_linear, _act_reference_supports,
                       oracle=True))
register_kernel(Kernel("int8-fbgemm", int8_fbgemm_linear, _fast_supports, priority=10))
