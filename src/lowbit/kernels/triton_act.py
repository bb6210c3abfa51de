"""Triton kernels (CUDA) around the W8A8 matmuls of :mod:`lowbit.kernels.cuda_w8a8`: one launch
quantizes the activations, one applies the epilogue, instead of ~20 small torch ops per call.

:func:`quantize_act` computes lowbit's Q for a signed symmetric activation spec with float32
scales, bit for bit as :func:`lowbit.kernels.cuda_w8a8.quantize_act_int8` /
``quantize_act_fp8`` do with torch ops: per token (one program per row) or per tensor (static
scale, or a dynamic per-tensor scale computed first), ``scale = absmax / top`` with IEEE
division, codes ``round_half_even(clamp(x / scale, qmin, qmax))`` (int8) or
``e4m3fn(clamp(x / scale, -top, top))`` (fp8, round to nearest even). A row holding NaN or Inf
gets a NaN scale, so its output row is NaN (no host synchronisation).

:func:`epilogue` computes ``((float32(acc) * sx) * sw) + bias`` in that order, each step rounded
to float32 (no fused multiply-add), then rounds once to the output dtype; for static W8A8 the
integer bias ``bias_q`` joins the integer sum first. These are the reference's operations.

Triton is imported on first use; under ``TRITON_INTERPRET=1`` the functions also run on CPU
tensors (tests/kernels/test_triton_act.py).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _jit():
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, clip, top, lo_code, hi_code,
        DYNAMIC: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # one program per row of x; s_ptr holds the row's scale (DYNAMIC) or the one scale
        m = tl.program_id(0)
        x_row = x_ptr + m * stride_xm
        offs = tl.arange(0, BLOCK_K)
        if DYNAMIC:
            lo = tl.full((BLOCK_K,), float("inf"), tl.float32)
            hi = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            nans = tl.zeros((BLOCK_K,), tl.int32)
            for k0 in range(0, K, BLOCK_K):
                ok = k0 + offs < K
                v = tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32)
                nans += (v != v).to(tl.int32)
                lo = tl.minimum(lo, tl.where(ok, v, float("inf")))
                hi = tl.maximum(hi, tl.where(ok, v, float("-inf")))
            lo = tl.min(lo, axis=0)
            hi = tl.max(hi, axis=0)
            absmax = tl.maximum(tl.abs(lo * clip), tl.abs(hi * clip))
            scale = tl.math.div_rn(absmax, top)  # IEEE division, as torch's
            scale = tl.where(scale > 0, scale, tl.full((), 1.0, tl.float32))
            # clamp to [smallest float32 subnormal, largest float32] (typed: as Python floats
            # these constants would be float64 to Triton)
            tiny = tl.full((), 1.401298464324817e-45, tl.float32)
            big = tl.full((), 3.4028234663852886e38, tl.float32)
            scale = tl.minimum(tl.maximum(scale, tiny), big)
            finite = (tl.sum(nans, axis=0) == 0) & (absmax < float("inf"))
            scale = tl.where(finite, scale, tl.full((), float("nan"), tl.float32))
            tl.store(s_ptr + m, scale)
        else:
            scale = tl.load(s_ptr)
        q_row = q_ptr + m * stride_qm
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32)
            v = tl.math.div_rn(v, scale)
            v = tl.minimum(tl.maximum(v, lo_code), hi_code)
            if FP8:
                tl.store(q_row + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=ok)
            else:  # round half to even by adding and removing 1.5 * 2**23 (|v| <= 128 here;
                # integer bounds: rounding after the clamp equals rounding before it)
                v = (v + 12582912.0) - 12582912.0
                tl.store(q_row + k0 + offs, v.to(tl.int8), mask=ok)

    @triton.jit
    def epilogue_kernel(
        acc_ptr, sx_ptr, sw_ptr, b_ptr, bq_ptr, y_ptr, M, N, stride_am, stride_ym,
        SX_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_BIAS_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        ok = m_ok[:, None] & n_ok[None, :]
        acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=ok, other=0)
        if HAS_BIAS_Q:
            acc = acc.to(tl.int64) + tl.load(bq_ptr + offs_n, mask=n_ok, other=0)[None, :]
        y = acc.to(tl.float32)
        if SX_ROWS:
            y = y * tl.load(sx_ptr + offs_m, mask=m_ok, other=1.0)[:, None]
        else:
            y = y * tl.load(sx_ptr)
        if SW_COLS:
            y = y * tl.load(sw_ptr + offs_n, mask=n_ok, other=1.0)[None, :]
        else:
            y = y * tl.load(sw_ptr)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=ok)

    return triton, act_quant_kernel, epilogue_kernel


def quantize_act(
    x2d: torch.Tensor,
    out: torch.Tensor,
    *,
    top: float,
    bounds: tuple[float, float],
    clip: float = 1.0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the codes of ``x2d [M, K]`` into ``out[:M, :K]`` (int8 or float8_e4m3fn, at least
    ``[M, K]``; the rest of ``out`` is left as it is) and return the float32 scale: per token
    ``[M, 1]`` computed here (``absmax * clip / top``), or the given one-element ``scale``
    (static, or a per-tensor dynamic scale). ``bounds`` are the codes' (min, max)."""
    if x2d.dim() != 2 or out.dim() != 2 or out.shape[0] < x2d.shape[0] or (
        out.shape[1] < x2d.shape[1]
    ):
        raise ValueError(f"quantize_act needs x [M, K] and out of at least that shape; got x "
                         f"{tuple(x2d.shape)}, out {tuple(out.shape)}")
    fp8 = out.dtype != torch.int8
    if fp8 and out.dtype != getattr(torch, "float8_e4m3fn", None):
        raise TypeError(f"quantize_act writes int8 or float8_e4m3fn codes, got {out.dtype}")
    triton, kernel, _ = _jit()
    x2d = x2d.contiguous()
    m, k = x2d.shape
    dynamic = scale is None
    if dynamic:
        scale = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    else:
        scale = scale.to(device=x2d.device, dtype=torch.float32).reshape(1, 1)
    if m:
        kernel[(m,)](
            x2d, out, scale, k, x2d.stride(0), out.stride(0), float(clip), float(top),
            float(bounds[0]), float(bounds[1]), DYNAMIC=dynamic, FP8=fp8,
            BLOCK_K=min(1024, triton.next_power_of_2(max(k, 16))), num_warps=4,
        )
    return scale


def epilogue(
    acc: torch.Tensor,
    sx: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    m: int,
    n: int,
    bias_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [m, n] = ((float32(acc[:m, :n] (+ bias_q)) * sx) * sw) + bias`` in ``out_dtype``;
    ``acc`` int32 or float32 of at least ``[m, n]`` (padding is not read), ``sx [m, 1]`` or
    ``[1, 1]``, ``sw [1, n]`` or ``[1, 1]`` float32, ``bias [n]``, ``bias_q [n]`` int64."""
    if acc.dim() != 2 or acc.shape[0] < m or acc.shape[1] < n:
        raise ValueError(f"epilogue needs acc of at least [{m}, {n}], got {tuple(acc.shape)}")
    triton, _, kernel = _jit()
    y = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return y
    sx = sx.contiguous()
    sw = sw.reshape(-1).contiguous()
    dummy = sw
    block_m, block_n = 16, 128
    kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, sx, sw, dummy if bias is None else bias.contiguous(),
        dummy if bias_q is None else bias_q.contiguous(), y, m, n, acc.stride(0), y.stride(0),
        SX_ROWS=sx.numel() > 1, SW_COLS=sw.numel() > 1, HAS_BIAS=bias is not None,
        HAS_BIAS_Q=bias_q is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        enable_fp_fusion=False,  # the reference rounds the product before adding the bias
    )
    return y
