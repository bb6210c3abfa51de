"""W8A8 on CUDA: int8 tensor cores through ``torch._int_mm``, fp8 e4m3 through ``torch._scaled_mm``.

``cuda_w8a8`` runs the integer W*A* specs of :mod:`lowbit.kernels.int8` whose weight and activation
codes are signed symmetric (``w8a8``, ``w8a8-static``, ``w7a8``, ``w8a7``). Activation codes are
lowbit's Q computed with the reference's float32 operations, the integer sum runs in int32 on the
tensor cores (exact while ``K * 128 * 128 < 2**31``), and the epilogue is the reference's::

    y = (float32(acc) * sx) * sw + bias                     dynamic
    y = (float32(acc + bias_q) * sx) * sw                   static, bias_q = quantize_bias(...)

so the output equals the ``int8-reference`` oracle bit for bit. ``torch._int_mm`` needs ``M > 16``
and ``K``, ``N`` multiples of 8: x is padded with zero rows/columns per call and the weight once
(zero rows/columns add nothing to the integer sums).

``cuda_fp8`` runs an fp8 e4m3fn weight (per output channel or per tensor) with fp8 e4m3fn
activations (per token or per tensor, dynamic; or static per tensor), e.g. the ``fp8a8`` preset,
on GPUs of compute capability >= 8.9. ``torch._scaled_mm`` with unit scales gives the float32 sum
of the fp8 products; the epilogue above scales it. The sum order of the tensor cores is not the
oracle's, so it matches ``fp8-reference`` to float32 accumulation error, not bit for bit.

``fp8-reference`` (the oracle for fp8 W*A* specs, any device): activation codes by lowbit's Q, the
products of the decoded fp8 values summed in float64 (exact for e4m3 while ``K < 2**17``), rounded
once to float32, then the same epilogue.

On CUDA with Triton importable a call is three launches: the activation quantizer of
:mod:`lowbit.kernels.triton_act` (codes and scales bit for bit as :func:`quantize_act_int8` /
:func:`quantize_act_fp8`), the int8 or fp8 GEMM, and the Triton epilogue (the same float32
operations); without Triton the same arithmetic runs as ~20 torch ops. On CUDA the activation
quantization has no host synchronisation (no finiteness check): a row holding NaN or Inf gives
a NaN output row where the oracles raise ValueError. On other devices
the check runs as in the oracles. The registered kernels support CUDA tensors only; tests call
the kernel functions directly on CPU tensors to check the arithmetic.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowbit.formats.registry import get_format
from lowbit.kernels import triton_act
from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.kernels.int8 import (
    _centered_weight,
    _empty_out,
    _flatten,
    _int_act_mode,
    _scale_out,
    _signed_symmetric,
    _static_act_qparams,
    _weight_scale,
    quantize_bias,
)
from lowbit.kernels.triton_int4 import triton_available
from lowbit.quant.maps import check_finite, qrange, quantize, symmetric_zero
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

NAME = "cuda_w8a8"
FP8_NAME = "cuda_fp8"
FP8_REFERENCE_NAME = "fp8-reference"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: M > 16, K and N multiples of 8
INT_MM_MULTIPLE = 8
SCALED_MM_MULTIPLE = 16  # torch._scaled_mm: K and N multiples of 16
MAX_K_INT32 = (2**31 - 1) // (128 * 128)  # int32 sums of int8 products stay exact up to here
_TINY = float(torch.nextafter(torch.zeros(()), torch.ones(())))  # smallest float32 scale


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


# ---- availability --------------------------------------------------------------------------
def int_mm_available() -> bool:
    return hasattr(torch, "_int_mm")


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_available(device: torch.device) -> bool:
    """``torch._scaled_mm`` and float8 dtypes exist, and a CUDA device is sm_89 or newer."""
    if not (hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")):
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


# ---- spec checks ---------------------------------------------------------------------------
def int8_spec_supported(qt: QuantizedTensor) -> bool:
    """Integer W*A* specs the reference handles, both sides signed symmetric (codes fit int8),
    activations rounded to nearest with float32 scales, K small enough for exact int32 sums."""
    act = qt.spec.act
    return (
        _int_act_mode(qt) is not None
        and _signed_symmetric(qt.spec)
        and _signed_symmetric(act)
        and act.rounding == "nearest"
        and act.scale_dtype == "float32"
        and qt.shape[1] <= MAX_K_INT32
    )


def _float8(spec: QuantSpec, formats: tuple[str, ...]) -> bool:
    return spec.kind == "float" and spec.format in formats


def _weight_per_row(spec: QuantSpec) -> bool:
    return spec.granularity == "tensor" or (
        spec.granularity == "channel" and spec.axis in (0, -2)
    )


def _act_float_mode(act: QuantSpec | None, formats: tuple[str, ...]) -> bool:
    if act is None or not _float8(act, formats) or act.rounding != "nearest":
        return False
    return act.granularity in ("token", "tensor") if act.dynamic else True


def fp8_reference_spec_supported(qt: QuantizedTensor) -> bool:
    """Float-grid (fp8/fp6/fp4) weights per channel or per tensor with float-grid activations
    (dynamic per token or per tensor, or static per tensor)."""
    fmts = ("fp8_e4m3fn", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")
    spec = qt.spec
    return (
        len(qt.shape) == 2 and _float8(spec, fmts) and _weight_per_row(spec)
        and _act_float_mode(spec.act, fmts)
    )


def fp8_spec_supported(qt: QuantizedTensor) -> bool:
    """e4m3fn weights per channel or per tensor with e4m3fn activations (float32 scales)."""
    spec = qt.spec
    return (
        fp8_reference_spec_supported(qt)
        and spec.format == "fp8_e4m3fn"
        and spec.act.format == "fp8_e4m3fn"
        and spec.act.scale_dtype == "float32"
    )


def _fits(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return x.dtype in ACT_DTYPES and x.dim() >= 1 and x.shape[-1] == qt.shape[1]


# ---- activation quantization (no host sync on CUDA) ----------------------------------------
def _act_scale(x2d: torch.Tensor, act: QuantSpec, top: float) -> torch.Tensor:
    """Dynamic scale ``[M, 1]`` (per token) or ``[1, 1]``: the float32 operations of
    :func:`lowbit.quant.maps.qparams_from_range` for a symmetric spec with float32 scales
    (``top`` = largest grid value), written without its host-side check; NaN where the range is
    not finite.

    ``absmax / top`` divides by a tensor: with a Python number as divisor torch on CUDA
    multiplies by its reciprocal, which can differ from the division in the last bit.
    """
    if act.scale_dtype != "float32":
        raise ValueError(f"activation spec {act}: the CUDA W8A8 kernels need float32 scales")
    if act.granularity == "token":
        lo, hi = torch.aminmax(x2d, dim=1, keepdim=True)
    else:
        lo, hi = (t.reshape(1, 1) for t in torch.aminmax(x2d))
    absmax = torch.maximum((lo.float() * act.clip_ratio).abs(), (hi.float() * act.clip_ratio).abs())
    scale = absmax / torch.full_like(absmax, top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=_TINY, max=torch.finfo(torch.float32).max)
    return torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, float("nan")))


def _check_finite_off_cuda(x2d: torch.Tensor) -> None:
    if x2d.device.type != "cuda":
        check_finite(x2d, "activation")


def quantize_act_int8(x2d: torch.Tensor, qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed symmetric activation codes as int8 ``[M, K]`` and ``sx`` float32 (``[M, 1]`` or
    ``[1, 1]``): lowbit's Q under ``qt.spec.act``, bit for bit."""
    act = qt.spec.act
    _check_finite_off_cuda(x2d)
    qmin, qmax = qrange(act)
    if act.dynamic:
        sx = _act_scale(x2d, act, float(qmax - symmetric_zero(act)))
    else:
        sx = _static_act_qparams(qt)[1].scale.to(x2d.device)
    v = x2d.float() / sx
    return v.round_().clamp_(qmin, qmax).to(torch.int8), sx


def quantize_act_fp8(x2d: torch.Tensor, qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn activation values ``[M, K]`` (float8) and ``sx`` float32: lowbit's Q, bit for bit
    (round to nearest even, saturating at the grid's largest value)."""
    act = qt.spec.act
    _check_finite_off_cuda(x2d)
    top = get_format(act.format).max
    if act.dynamic:
        sx = _act_scale(x2d, act, top)
    else:
        sx = _static_act_qparams(qt)[1].scale.to(x2d.device)
    v = (x2d.float() / sx).clamp_(-top, top)
    return v.to(torch.float8_e4m3fn), sx


# ---- int8 x int8 -> int32 ------------------------------------------------------------------
def int8_weight_layout(
    qt: QuantizedTensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``qw - zw`` int8 ``[N8, K8]`` zero-padded to multiples of 8, ``sw`` fp32 ``[1, N|1]``)."""
    w = _centered_weight(qt).to(torch.int8)
    n, k = w.shape
    w = F.pad(w, (0, _round_up(k, INT_MM_MULTIPLE) - k, 0, _round_up(n, INT_MM_MULTIPLE) - n))
    return w.to(device).contiguous(), _weight_scale(qt).to(device)


def int_mm_padded(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``qx [M, K] @ w[:, :K]^T`` in int32 -> ``[M, N8]`` through ``torch._int_mm``, with qx
    zero-padded to ``M > 16`` rows and ``w``'s (padded) K; w is int8 ``[N8, K8]``."""
    if qx.dtype != torch.int8 or w.dtype != torch.int8 or qx.dim() != 2 or w.dim() != 2:
        raise ValueError(
            f"int_mm_padded needs int8 qx [M, K] and w [N, K]; got {qx.dtype} "
            f"{tuple(qx.shape)} and {w.dtype} {tuple(w.shape)}"
        )
    m, k = qx.shape
    if k > w.shape[1] or w.shape[1] % INT_MM_MULTIPLE or w.shape[0] % INT_MM_MULTIPLE:
        raise ValueError(f"w {tuple(w.shape)} must be padded to multiples of 8 covering K={k}")
    rows = max(m, INT_MM_MIN_ROWS)
    if rows != m or w.shape[1] != k:
        qx = F.pad(qx, (0, w.shape[1] - k, 0, rows - m))
    return torch._int_mm(qx, w.t())[:m]


def _fused(x2d: torch.Tensor) -> bool:
    """The Triton activation quantizer and epilogue run (CUDA with triton importable)."""
    return x2d.is_cuda and triton_available()


def _given_act_scale(x2d: torch.Tensor, qt: QuantizedTensor, top: float) -> torch.Tensor | None:
    """The activation scale the fused quantizer takes: None per token (it computes it), the
    static scale, or a per-tensor dynamic scale computed here."""
    act = qt.spec.act
    if not act.dynamic:
        return _static_act_qparams(qt)[1].scale
    return None if act.granularity == "token" else _act_scale(x2d, act, top)


def _static_bias_q(qt: QuantizedTensor, bias: torch.Tensor, sw: torch.Tensor, cache: dict):
    """The static spec's integer bias, cached per bias tensor."""
    entry = cache.get(NAME + ".bias_q")
    if entry is None or entry[0] is not bias:
        entry = (bias, quantize_bias(bias, qt.act_scale.to(bias.device), sw))
        cache[NAME + ".bias_q"] = entry
    return entry[1]


def cuda_w8a8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Exact W8A8 (see the module docstring): ``x [..., K] -> [..., N]`` in x's dtype."""
    x2d = _flatten(x)
    if x2d.shape[0] == 0:
        return _empty_out(x, qt, bias)
    entry = cache.get(NAME)
    version = weight_version(qt)
    if entry is None or entry[0] != version or entry[1].device != x.device:
        entry = (version, *int8_weight_layout(qt, x.device), qt)
        cache[NAME] = entry
    _, w, sw, _ = entry
    m, n = x2d.shape[0], qt.shape[0]
    static = not qt.spec.act.dynamic
    if bias is not None:
        bias = bias.to(x.device)
    if _fused(x2d):  # 3 launches: quantize x, int8 GEMM, epilogue
        act = qt.spec.act
        qmin, qmax = qrange(act)
        top = float(qmax - symmetric_zero(act))
        # rows beyond M and columns beyond K may hold anything: they meet zero weight columns
        # or give output rows that are dropped
        qx = torch.empty((max(m, INT_MM_MIN_ROWS), w.shape[1]), dtype=torch.int8,
                         device=x.device)
        sx = triton_act.quantize_act(x2d, qx, top=top, bounds=(qmin, qmax),
                                     clip=act.clip_ratio, scale=_given_act_scale(x2d, qt, top))
        acc = torch._int_mm(qx, w.t())
        bias_q = None
        if static and bias is not None:
            bias_q, bias = _static_bias_q(qt, bias, sw, cache), None
        y = triton_act.epilogue(acc, sx, sw, bias, x.dtype, m, n, bias_q)
        return y.reshape(*x.shape[:-1], n)
    qx, sx = quantize_act_int8(x2d, qt)
    acc = int_mm_padded(qx, w)[:, :n]
    if bias is not None and static:  # static: the integer bias joins the exact sum
        acc = acc.to(torch.int64) + _static_bias_q(qt, bias, sw, cache)
        bias = None
    y = _scale_out(acc.float(), sx, sw, bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# ---- fp8 x fp8 -> float32 ------------------------------------------------------------------
def fp8_weight_layout(
    qt: QuantizedTensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn weight ``[N16, K16]`` zero-padded to multiples of 16, ``sw`` fp32 ``[1, N|1]``)."""
    n, k = qt.shape
    codes = qt.codes()  # the e4m3fn bit patterns, uint8 [N, K]
    codes = F.pad(codes, (0, _round_up(k, SCALED_MM_MULTIPLE) - k,
                          0, _round_up(n, SCALED_MM_MULTIPLE) - n))
    w = codes.to(device).contiguous().view(torch.float8_e4m3fn)
    return w, _weight_scale(qt).to(device)


def fp8_mm_padded(xq: torch.Tensor, w: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """float32 ``xq [M, K] @ w[:, :K]^T`` -> ``[M, N16]`` through ``torch._scaled_mm`` with unit
    scales ``one`` (a float32 scalar tensor); xq is zero-padded to w's K."""
    m, k = xq.shape
    if w.shape[1] != k:
        xq = F.pad(xq.view(torch.uint8), (0, w.shape[1] - k)).view(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return out[0] if isinstance(out, tuple) else out  # torch < 2.5 also returned an amax


def cuda_fp8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """fp8 W8A8 (see the module docstring): ``x [..., K] -> [..., N]`` in x's dtype."""
    x2d = _flatten(x)
    if x2d.shape[0] == 0:
        return _empty_out(x, qt, bias)
    entry = cache.get(FP8_NAME)
    version = weight_version(qt)
    if entry is None or entry[0] != version or entry[1].device != x.device:
        w, sw = fp8_weight_layout(qt, x.device)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        entry = (version, w, sw, one, qt)
        cache[FP8_NAME] = entry
    _, w, sw, one, _ = entry
    (m, k), n = x2d.shape, qt.shape[0]
    if bias is not None:
        bias = bias.to(x.device)
    if _fused(x2d):  # 3 launches: quantize x, fp8 GEMM, epilogue
        top = get_format(qt.spec.act.format).max
        # padding columns meet zero weight columns, but must not be NaN codes: zeroed
        alloc = torch.empty if w.shape[1] == k else torch.zeros
        xq = alloc((m, w.shape[1]), dtype=torch.float8_e4m3fn, device=x.device)
        sx = triton_act.quantize_act(x2d, xq, top=top, bounds=(-top, top),
                                     clip=qt.spec.act.clip_ratio,
                                     scale=_given_act_scale(x2d, qt, top))
        acc = fp8_mm_padded(xq, w, one)
        y = triton_act.epilogue(acc, sx, sw, bias, x.dtype, m, n)
        return y.reshape(*x.shape[:-1], n)
    xq, sx = quantize_act_fp8(x2d, qt)
    acc = fp8_mm_padded(xq, w, one)[:, :n]
    y = _scale_out(acc, sx, sw, bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def fp8_reference_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """The float-grid W*A* oracle (see the module docstring): ``x [..., K] -> [..., N]``."""
    if not fp8_reference_spec_supported(qt):
        raise ValueError(f"fp8 reference kernel does not handle spec {qt.spec}")
    x2d = _flatten(x)
    if x2d.shape[0] == 0:
        return _empty_out(x, qt, bias)
    act = qt.spec.act
    spec, qparams = (act, None) if act.dynamic else _static_act_qparams(qt)
    codes, qp, _ = quantize(x2d, spec, qparams)
    xv = get_format(spec.format).decode(codes).double()
    wv = get_format(qt.spec.format).decode(qt.codes()).double()
    acc = (xv @ wv.T).float()  # each product exact in float64; the sum rounded once
    y = _scale_out(acc, qp.scale.float(), _weight_scale(qt), bias)
    return y.reshape(*x.shape[:-1], qt.shape[0]).to(x.dtype)


# ---- registration --------------------------------------------------------------------------
def _no_grad(x: torch.Tensor) -> bool:
    return not (x.requires_grad and torch.is_grad_enabled())


def _int8_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cuda" and _fits(qt, x) and _no_grad(x) and int_mm_available()
        and int8_spec_supported(qt)
    )


def _fp8_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cuda" and _fits(qt, x) and _no_grad(x) and fp8_spec_supported(qt)
        and fp8_available(x.device)
    )


def _fp8_reference_supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return x.dtype.is_floating_point and x.dim() >= 1 and x.shape[-1] == qt.shape[1] and (
        fp8_reference_spec_supported(qt)
    )


KERNEL = register_kernel(Kernel(NAME, cuda_w8a8_linear, _int8_supports, priority=20))
FP8_KERNEL = register_kernel(Kernel(FP8_NAME, cuda_fp8_linear, _fp8_supports, priority=20))
register_kernel(
    Kernel(FP8_REFERENCE_NAME, fp8_reference_linear, _fp8_reference_supports, oracle=True)
)
