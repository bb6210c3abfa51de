"""Q and Q^-1: choose_qparams, quantize, dequantize and fake_quantize from one source.

Every map works on the canonical blocked view (see :mod:`lowbit.quant.layout`) in float32:

- affine (intN/uintN): ``q = clamp(round(x/s + z), qmin, qmax)``, ``x~ = (q - z) * s``;
  stored code ``q - qmin`` (so signed formats are stored offset-binary).
- float grids (fp8/fp6/fp4): ``q = encode(x/s)`` (round to nearest even, saturating),
  ``x~ = decode(q) * s``; the stored code is the format's bit pattern.
- fixed codebooks (nf4, pow2): ``q = argmin |x/s - v|``, ``x~ = v[q] * s``, ``s = absmax``.
- k-means codebooks: ``q = argmin |x - c|`` with a learned codebook ``c`` per block, ``x~ = c[q]``.

Scale and zero-point are cast to their stored dtypes *before* the codes are computed, so that
``fake_quantize(x) == dequantize(quantize(x))`` bit for bit, and the stored tensors are the
ones used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.quant.layout import Layout, layout_for
from lowbit.spec import QuantSpec, torch_dtype


@dataclass
class ScaleCodes:
    """Double-quantized group parameters of a ``[R, G]``-group spec (``spec.scale_bits``).

    scale: uint8 ``[R, G]`` stored codes (offset by ``2**(scale_bits-1)`` where the spec's
        scales are signed, full range); never the code of a zero scale.
    super_scale: ``[R, ceil(G / super_group)]`` in ``spec.scale_dtype``: group ``g``'s scale is
        ``super_scale[:, g // super_group] * (code - offset)``.
    minimum, super_min: the same for asymmetric specs' minimums (value units, >= 0, unsigned
        codes; ``zero_dtype``), None for symmetric ones.
    """

    scale: torch.Tensor
    super_scale: torch.Tensor
    minimum: torch.Tensor | None = None
    super_min: torch.Tensor | None = None


@dataclass
class QParams:
    """Quantization parameters, oriented ``[R/bh, C/bw]`` (a codebook: ``[R/bh, C/bw, 2**b]``).

    For double-quantized specs ``scale`` / ``zero_point`` hold the effective float32 values the
    maps use (decoded from ``scale_codes``, which is what is stored).
    """

    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    scale_codes: ScaleCodes | None = field(default=None, repr=False)


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` of an affine spec."""
    b = spec.bits
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if spec.signed else (0, (1 << b) - 1)


def symmetric_zero(spec: QuantSpec) -> int:
    """Zero-point implied by a symmetric affine spec: 0 (signed) or 2**(b-1) (unsigned)."""
    return 0 if spec.signed else 1 << (spec.bits - 1)


def _grid(spec: QuantSpec):
    from lowbit.formats.registry import get_format

    return get_format(spec.format)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a one-line ValueError if ``x`` holds NaN or Inf (naming how many and where)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} has {int(bad.sum())} NaN/Inf values (first at "
            f"index {first}); quantization needs finite values"
        )


def _check_input(x: torch.Tensor) -> None:
    """Type, dtype and emptiness; finiteness is checked on block statistics where they exist."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(x.shape)})")


def _store_scale(scale: torch.Tensor, dtype: torch.dtype,
                 field_name: str = "scale_dtype") -> torch.Tensor:
    """Cast a scale to its stored dtype (the spec's ``field_name``), rounding up (the grid must
    still span the range) and never producing 0 or inf; a zero range gets scale 1."""
    zero = torch.zeros((), dtype=dtype)
    smallest = float(torch.nextafter(zero, torch.ones((), dtype=dtype)))  # a subnormal
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    largest = torch.finfo(dtype).max
    if bool((scale > largest).any()):  # clamping would clip the block's values
        raise ValueError(
            f"a block needs scale {float(scale.max()):.4g}, beyond {dtype}'s largest value "
            f"{largest:.4g} ({field_name}): its values are too large; quantize with "
            f"{field_name}='float32' (spec.replace({field_name}='float32'))"
        )
    scale = scale.clamp(min=smallest)
    stored = scale.to(dtype)
    below = stored.float() < scale
    if bool(below.any()):
        up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
        stored = torch.where(below, up, stored)
    return stored


def keep_better(
    best: QParams, best_err: torch.Tensor, cand: QParams, err: torch.Tensor
) -> torch.Tensor:
    """Per block, adopt ``cand``'s scale/zero where ``err < best_err`` (in place on ``best``).

    The search step shared by HQQ, AWQ's clip search and LSQ+ init; returns the new best error.
    """
    better = err < best_err
    best.scale = torch.where(better, cand.scale, best.scale)
    if best.zero_point is not None:
        best.zero_point = torch.where(better, cand.zero_point, best.zero_point)
    return torch.where(better, err, best_err)


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> QParams:
    """Scale (and zero-point) from per-block ranges ``[R/bh, C/bw]`` (observers use this).

    Symmetric and fixed grids use ``absmax = max(|min|, |max|)`` (``full_range``: the signed
    value of larger magnitude over ``-2**(b-1)``); asymmetric integer zero-points widen the range to
    include 0 so that zero stays exactly representable.
    """
    if spec.kind == "kmeans":
        raise ValueError(f"format={spec.format!r} learns a codebook; it has no range-based qparams")
    lo = min_val.float() * spec.clip_ratio
    hi = max_val.float() * spec.clip_ratio
    scale_dtype = torch_dtype(spec.scale_dtype)
    if spec.double_quantized:
        return _double_quantized_range(lo, hi, spec)
    if spec.kind == "affine":
        qmin, qmax = qrange(spec)
        if spec.symmetric and spec.full_range:
            # the largest magnitude (the negative one on ties) lands on the lowest level;
            # a positive one makes the scale negative
            extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
            raw = extreme / (qmin - symmetric_zero(spec))
            scale = _store_scale(raw.abs(), scale_dtype)
            return QParams(scale=torch.where(raw < 0, -scale, scale))
        if spec.symmetric:
            absmax = torch.maximum(lo.abs(), hi.abs())
            scale = _store_scale(absmax / (qmax - symmetric_zero(spec)), scale_dtype)
            return QParams(scale=scale)
        if spec.zero_point == "int":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        raw = (hi - lo) / (qmax - qmin)
        if spec.zero_point == "float":
            # A float zero-point is stored in zero_dtype: a range far from 0 and narrow (a
            # near-constant row) would put it beyond that dtype's reach (fp16: inf). Widen the
            # step so |zero| stays where the dtype resolves it to half a code or better.
            # Never tighter than the grid's own span (signed grids with a coarse zero dtype,
            # e.g. int8 with bfloat16, keep their usual ranges).
            reach = max(0.5 / torch.finfo(torch_dtype(spec.zero_dtype)).eps - abs(qmin),
                        qmax - qmin)
            raw = torch.maximum(raw, torch.maximum(lo.abs(), hi.abs()) / reach)
        scale = _store_scale(raw, scale_dtype)
        zero = qmin - lo / scale.float()
        if spec.zero_point == "int":
            zero = zero.round().clamp(qmin, qmax)
        return QParams(scale=scale, zero_point=zero.to(torch_dtype(spec.zero_dtype)))
    absmax = torch.maximum(lo.abs(), hi.abs())
    top = _grid(spec).max if spec.kind == "float" else 1.0
    return QParams(scale=_store_scale(absmax / top, scale_dtype))


def _double_quantized_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """Double-quantized qparams of per-group ranges ``[..., G]`` (see :func:`double_quantize`)."""
    qmin, qmax = qrange(spec)
    if not spec.symmetric:  # x~ = s*q - m with m >= 0: the range includes 0
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        return double_quantize((hi - lo) / (qmax - qmin), -lo, spec)
    if spec.full_range:
        extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
        return double_quantize(extreme / (qmin - symmetric_zero(spec)), None, spec)
    absmax = torch.maximum(lo.abs(), hi.abs())
    return double_quantize(absmax / (qmax - symmetric_zero(spec)), None, spec)


def _code_groups(values: torch.Tensor, bits: int, signed: bool, nonzero: bool,
                 super_group: int, dtype: torch.dtype,
                 field_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [..., G]`` as stored codes uint8 ``[..., G]`` and one scale per ``super_group``
    consecutive entries ``[..., ceil(G / super_group)]`` (``dtype``; absmax / top code,
    rounded up). Codes round to nearest; ``nonzero`` keeps them off 0 (a scale must not
    vanish). Signed codes are stored offset by ``2**(bits-1)``."""
    n = values.shape[-1]
    n_super = -(-n // super_group)
    padded = torch.nn.functional.pad(values, (0, n_super * super_group - n))
    padded = padded.reshape(*values.shape[:-1], n_super, super_group)
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    sup = _store_scale(padded.abs().amax(-1) / top, dtype, field_name)
    codes = (padded / sup.float().unsqueeze(-1)).round_().clamp_(-top if signed else 0, top)
    if nonzero:
        codes = torch.where(codes == 0, torch.where(padded < 0, -1.0, 1.0), codes)
    codes = codes.reshape(*values.shape[:-1], n_super * super_group)[..., :n]
    offset = 1 << (bits - 1) if signed else 0
    return codes.add_(offset).to(torch.uint8), sup


def double_quantize(scale: torch.Tensor, minimum: torch.Tensor | None,
                    spec: QuantSpec) -> QParams:
    """Group scales ``[..., G]`` (and minimums ``m >= 0`` in value units, asymmetric) stored
    as ``spec.scale_bits``-bit codes under one scale per ``spec.super_group`` groups, as
    llama.cpp's k-quants; returns the effective qparams with their :class:`ScaleCodes`."""
    bits, group = spec.scale_bits, spec.super_group
    codes, sup = _code_groups(scale.float(), bits, spec.full_range, True, group,
                              torch_dtype(spec.scale_dtype), "scale_dtype")
    min_codes = super_min = None
    if minimum is not None:
        min_codes, super_min = _code_groups(minimum.float().clamp(min=0), bits, False, False,
                                            group, torch_dtype(spec.zero_dtype), "zero_dtype")
    return decode_scales(ScaleCodes(codes, sup, min_codes, super_min), spec)


def to_double_quantized(qparams: QParams, spec: QuantSpec) -> QParams:
    """Plain float qparams (scale, code-unit zero-point) of ``spec`` without its double
    quantization, double-quantized. Asymmetric: the grid's range ``[s (qmin - z), s (qmax -
    z)]`` is widened to include 0 where it does not (a k-quant's minimum is >= 0), the scale
    with it, and the minimum coded in value units. How algorithms that refine float qparams
    (HQQ, AWQ's clip search) end."""
    scale = qparams.scale.float()
    if not spec.has_zero_point:
        return double_quantize(scale, None, spec)
    qmin, qmax = qrange(spec)
    zero = qparams.zero_point.float()
    lo, hi = scale * (qmin - zero), scale * (qmax - zero)
    # the minimum must be >= 0: a grid lying above 0 is widened down to it (its top stays;
    # a grid below 0 is fine as it is)
    scale = torch.where(lo > 0, hi / (qmax - qmin), scale)
    return double_quantize(scale, -lo.clamp(max=0), spec)


def decode_scales(codes: ScaleCodes, spec: QuantSpec) -> QParams:
    """Effective float32 qparams ``[..., G]`` of double-quantized ``codes``:
    ``scale = super_scale * (code - offset)``, ``zero_point = qmin + minimum / scale`` (code
    units, so ``x~ = (q - zero_point) * scale = s * (q - qmin) - minimum``)."""
    n = codes.scale.shape[-1]

    def per_group(sup: torch.Tensor) -> torch.Tensor:
        return sup.float().repeat_interleave(spec.super_group, -1)[..., :n]

    offset = 1 << (spec.scale_bits - 1) if spec.full_range else 0
    scale = (codes.scale.float() - offset) * per_group(codes.super_scale)
    zero = None
    if codes.minimum is not None:
        zero = codes.minimum.float().mul(per_group(codes.super_min)).div_(scale)
        zero.add_(qrange(spec)[0])
    return QParams(scale=scale, zero_point=zero, scale_codes=codes)


def choose_qparams(
    x: torch.Tensor, spec: QuantSpec, *, generator: torch.Generator | None = None
) -> QParams:
    """Quantization parameters of ``x`` under ``spec`` (min-max / absmax; k-means for kmeansB)."""
    _check_input(x)
    layout = layout_for(x.shape, spec)
    xb = layout.blocked(layout.to_2d(x.detach()).float())
    if spec.kind == "kmeans":
        from lowbit.quant.kmeans import fit_codebooks

        check_finite(x)
        _check_float32_range(x, xb)
        codebook = fit_codebooks(xb, 1 << spec.bits)
        stored = codebook.to(torch_dtype(spec.scale_dtype))
        if not bool(torch.isfinite(stored).all()):
            raise ValueError(
                f"a k-means codebook entry ({float(codebook.abs().max()):.4g}) is beyond "
                f"{spec.scale_dtype}'s range (scale_dtype); quantize with scale_dtype='float32'"
            )
        return QParams(codebook=stored)
    lo, hi = xb.amin(-1), xb.amax(-1)  # NaN propagates, so checking the stats suffices
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        check_finite(x)
        _check_float32_range(x, xb)
    if spec.double_quantized and spec.clip_ratio == 1.0 and (
            not spec.symmetric or spec.full_range):
        return double_quantize(*_searched_scales(xb, spec), spec)
    return qparams_from_range(lo, hi, spec)


def _searched_scales(xb: torch.Tensor, spec: QuantSpec,
                     steps: int = 20) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float group scales (and minimums) of a k-quant spec as llama.cpp's own quantizer chooses
    them before coding them (``make_qkx2_quants`` / ``make_qx_quants``): for ``steps + 1``
    candidate step sizes around the min-max one, round, then refit the scale (and minimum) by
    least squares weighted as ggml weights (``|x| + rms`` asymmetric, ``x**2`` symmetric);
    keep the fit of least weighted error. ``xb``: ``[R, G, n]``; returns ``[R, G]`` each."""
    qmin, qmax = qrange(spec)
    levels = qmax - qmin
    # the search is scale-invariant: on each group divided by its absmax, float32 sums of
    # x**3 neither overflow nor underflow whatever the weights' magnitude
    norm = xb.abs().amax(-1, keepdim=True)
    norm = torch.where(norm > 0, norm, 1.0)
    xb = xb / norm
    norm = norm.squeeze(-1)
    if spec.symmetric:  # full range: the extreme value v on the lowest level, s = v / low
        low, high = qmin - symmetric_zero(spec), qmax - symmetric_zero(spec)  # -2**(b-1), ..
        extreme = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        w = xb * xb
        best_s = best_score = None
        for i in range(-(steps // 2), steps // 2 + 1):
            inv = (low - 0.1 * i) / torch.where(extreme == 0, 1.0, extreme)
            q = (xb * inv).round_().clamp_(low, high)
            sumlx, suml2 = (w * xb * q).sum(-1), (w * q * q).sum(-1)
            s = sumlx / suml2.clamp(min=1e-30)
            score = s * sumlx  # sum w x^2 minus the weighted error of the fit
            if best_s is None:
                best_s, best_score = s, score
            else:
                better = (suml2 > 0) & (score > best_score)
                best_s = torch.where(better, s, best_s)
                best_score = torch.where(better, score, best_score)
        return torch.where(best_s == 0, extreme.squeeze(-1) / low, best_s) * norm, None
    lo, hi = xb.amin(-1, keepdim=True).clamp(max=0), xb.amax(-1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, 1.0)
    w = xb.pow(2).mean(-1, keepdim=True).sqrt() + xb.abs()
    sum_w, sum_x = w.sum(-1), (w * xb).sum(-1)

    def fit(inv: torch.Tensor):
        u = ((xb - lo) * inv).round_().clamp_(0, levels)
        sum_l, sum_l2, sum_xl = (w * u).sum(-1), (w * u * u).sum(-1), (w * u * xb).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, 1.0)
        s = (sum_w * sum_xl - sum_x * sum_l) / safe
        m = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        # the offset may not exceed 0 (the grid keeps 0 in range): then a scale alone
        s = torch.where(m > 0, sum_xl / sum_l2.clamp(min=1e-30), s)
        m = m.clamp(max=0)
        err = (w * (s.unsqueeze(-1) * u + m.unsqueeze(-1) - xb).pow(2)).sum(-1)
        return s, m, err, det > 0

    # a constant group (max == min) gets scale 0, as llama.cpp's: its values sit on the
    # minimum, and it does not inflate its super-block's scale
    best_s = torch.where(hi > lo, span / levels, 0.0).squeeze(-1)
    best_m = lo.squeeze(-1)
    u0 = ((xb - lo) / (span / levels)).round_().clamp_(0, levels)
    best_err = (w * ((span / levels) * u0 + lo - xb).pow(2)).sum(-1)
    for i in range(steps + 1):
        s, m, err, ok = fit((levels - 1 + 0.1 * i) / span)
        better = ok & (err < best_err) & (s > 0)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s * norm, -best_m * norm


def _check_float32_range(x: torch.Tensor, as_float32: torch.Tensor) -> None:
    """Finite ``x`` whose float32 copy is not (float64 values beyond float32's range)."""
    if not bool(torch.isfinite(as_float32).all()):
        raise ValueError(
            f"x ({x.dtype}) holds values beyond float32's range (max |x| = "
            f"{float(x.abs().max()):.4g}); quantization computes in float32"
        )


def _nearest_index(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted ``grid`` (ties go to the lower entry).

    ``grid`` is ``[K]`` or batched ``[..., K]`` matching ``values``' leading dims.
    """
    mids = (grid[..., 1:] + grid[..., :-1]) / 2
    if grid.dim() == 1:
        return torch.bucketize(values, mids)
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def _round(v: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Round ``v`` in place: to nearest (half to even) or stochastically (floor(v + U[0,1)))."""
    if spec.rounding == "nearest":
        return v.round_()
    noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return v.add_(noise).floor_()


def _expand(p: torch.Tensor) -> torch.Tensor:
    """Block parameter ``[R/bh, C/bw]`` -> broadcastable against the blocked view."""
    return p.float().unsqueeze(-1)


def _codes_blocked(
    xb: torch.Tensor, spec: QuantSpec, qp: QParams, generator: torch.Generator | None
) -> torch.Tensor:
    kind = spec.kind
    if kind == "kmeans":
        return _nearest_index(xb, qp.codebook.float())
    if qp.scale is None:
        raise ValueError(f"spec {spec} needs a scale; QParams.scale is None")
    if kind == "affine":
        return affine_codes(xb, _expand(qp.scale), _affine_zero(spec, qp), spec, generator)
    v = xb / _expand(qp.scale)
    if spec.rounding != "nearest":
        raise ValueError(
            f"rounding='stochastic' is implemented for integer formats; {spec.format!r} "
            "rounds to nearest"
        )
    if kind == "float":
        return _grid(spec).encode(v, saturate=True)
    return _grid(spec).encode(v)  # the codebook's own rule (ties toward zero), as inspect shows


def _grid_values(spec: QuantSpec) -> torch.Tensor:
    return torch.tensor(_grid(spec).values, dtype=torch.float32)


def code_values(spec: QuantSpec) -> torch.Tensor:
    """float32 ``[2**bits]``: the unscaled value of every code of a codebook (nf4) or
    float-grid (fp4, fp8) spec; Q^-1 of code ``c`` in a block of scale ``s`` is
    ``code_values(spec)[c] * s``."""
    codes = torch.arange(1 << spec.bits)
    if spec.kind == "float":
        return _grid(spec).decode(codes).float()
    if spec.kind == "codebook":
        return _grid_values(spec)
    raise ValueError(f"spec {spec} has no fixed code values (kind {spec.kind!r})")


def _affine_zero(spec: QuantSpec, qp: QParams) -> torch.Tensor | int:
    return _expand(qp.zero_point) if spec.has_zero_point else symmetric_zero(spec)


def affine_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Affine Q with float32 ``scale``/``zero`` broadcast against ``x``: stored uint8 codes.

    The single elementwise definition of Q for integer grids (GPTQ's column loop calls it too).
    """
    qmin, qmax = qrange(spec)
    v = x / scale
    if not isinstance(zero, int) or zero:
        v.add_(zero)
    # In place: this runs on every weight (and once per column inside GPTQ).
    return _round(v, spec, generator).clamp_(qmin, qmax).sub_(qmin).to(torch.uint8)


def affine_values(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | int, spec: QuantSpec
) -> torch.Tensor:
    """Affine Q^-1: stored codes -> float32 ``(code + qmin - zero) * scale``."""
    qmin, _ = qrange(spec)
    return codes.float().add_(qmin - zero).mul_(scale)


def _values_blocked(codes: torch.Tensor, spec: QuantSpec, qp: QParams) -> torch.Tensor:
    """Q^-1 on the blocked view: integer codes ``[R/bh, C/bw, n]`` -> float32 values."""
    kind = spec.kind
    if kind == "kmeans":
        return torch.gather(qp.codebook.float(), -1, codes.long())
    scale = _expand(qp.scale)
    if kind == "affine":
        return affine_values(codes, scale, _affine_zero(spec, qp), spec)
    if kind == "float":
        return _grid(spec).decode(codes) * scale
    return _grid_values(spec).to(codes.device)[codes.long()] * scale


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    qparams: QParams | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, QParams, Layout]:
    """Q: ``x`` -> (stored codes uint8 ``[R, C]`` in the canonical view, qparams, layout)."""
    _check_input(x)
    layout = layout_for(x.shape, spec)
    qp = qparams if qparams is not None else choose_qparams(x, spec, generator=generator)
    xb = layout.blocked(layout.to_2d(x.detach()).float())
    if qparams is not None:
        check_finite(x)
    codes = _codes_blocked(xb, spec, qp, generator)
    return layout.unblocked(codes.to(torch.uint8)), qp, layout


def dequantize(
    codes: torch.Tensor,
    qparams: QParams,
    spec: QuantSpec,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Q^-1: stored codes ``[R, C]`` -> values of the logical shape, in ``dtype``."""
    values = _values_blocked(layout.blocked(codes), spec, qparams)
    return layout.from_2d(layout.unblocked(values)).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    qparams: QParams | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, without packing (bit-identical to it)."""
    codes, qp, layout = quantize(x, spec, qparams, generator=generator)
    return dequantize(codes, qp, spec, layout, x.dtype)
