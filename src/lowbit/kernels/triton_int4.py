"""Triton weight-only kernels (CUDA): fused dequantize + matmul for 4- and 8-bit affine codes.

Registers ``triton_int4``; ``triton_int8`` (:mod:`lowbit.kernels.triton_int8`) registers the same
machinery for 8-bit codes. Both read lowbit's canonical bytes directly: row n of the weight is
``K * bits / 8`` bytes; for 4 bits code ``2j`` is the low nibble of byte ``j`` and code ``2j+1``
the high nibble, for 8 bits byte ``j`` is code ``j``. Scales (and zero-points) stay in their stored
dtype, ``[N, G]`` for ``G`` groups of ``group_size`` along K, ``[N, 1]`` per channel, ``[1, 1]``
per tensor. In registers each weight becomes, with the reference's float32 operations::

    w = (code - (z - qmin)) * s            (z: the stored zero-point, or the symmetric one)

rounded to the activation dtype (so the weight values equal ``qt.dequantize(x.dtype)`` bit for
bit), and is multiplied in float32. Weights never exist in float in global memory. Two kernels:

- GEMV (``M <= GEMV_MAX_M``): one program per ``BLOCK_N`` output columns and row of x, no tensor
  cores. Each step loads ``BLOCK_K`` codes of each of its rows as runs that lie in one group
  (a ``[BLOCK_N, runs, bytes]`` tile, contiguous 16-byte loads), one scale per run, and
  accumulates ``w * x`` elementwise in float32; one reduction over K at the end.
- GEMM: ``[BLOCK_M, BLOCK_N]`` output tiles with ``tl.dot`` (fp32 accumulation; IEEE for fp32
  inputs). ``BLOCK_K`` divides the group size, so a step's scales are one ``[BLOCK_N]`` vector;
  for 4 bits the low and high nibbles are joined into K order in registers.

The bias, if any, is added to the float32 accumulator before the one rounding to x's dtype.
Launch configs: :func:`pick_config` (benchmarks/gpu.py sweeps GEMV candidates on a GPU);
:func:`compile_offline` builds a variant for ``sm_90`` without a GPU (tests use it to run
Triton's frontend and ptxas on the configs dispatch picks).

Triton is optional: it is imported on first use only. The kernels register for CUDA devices;
under ``TRITON_INTERPRET=1`` :func:`wo_matmul` also runs on CPU tensors (that is how CI checks
them against the reference).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.quant.maps import qrange, symmetric_zero
from lowbit.tensor import QuantizedTensor

NAME = "triton_int4"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 2  # rows of x up to which the GEMV kernel runs (it re-reads W per row)
_ONE_GROUP = 1 << 30  # the kernels' GROUP_B for one group per row (kb // GROUP_B == 0)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Config:
    """Launch parameters: ``kind`` is "gemv" or "gemm"; block sizes in codes (powers of two)."""

    kind: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class WeightLayout:
    """What the kernels read: packed codes ``[N, K*bits/8]`` (uint8), scale ``[N|1, G]``, optional
    zero-point ``[N|1, G]`` (stored dtypes), and the constants of ``w = (code - zc) * s``."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    k: int
    group_size: int  # 0: one group per row (per channel or per tensor)
    qmin: int  # zc = zero - qmin with a stored zero-point
    sym_zero_code: float  # zc without one

    def to(self, device: torch.device) -> WeightLayout:
        move = {"packed": self.packed.to(device), "scale": self.scale.to(device),
                "zero": None if self.zero is None else self.zero.to(device)}
        return WeightLayout(**{**self.__dict__, **move})

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes + scales + zero-points)."""
        parts = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


@functools.lru_cache(maxsize=1)
def _jit_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def wo_gemv_kernel(
        x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        N, KB, stride_xm, stride_pn, stride_sn, stride_ym,
        BITS: tl.constexpr, GROUP_B: tl.constexpr, QMIN: tl.constexpr, HAS_ZERO: tl.constexpr,
        ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
        GB: tl.constexpr,
    ):
        # KB bytes per weight row; each step reads NG runs of GB bytes (one scale per run) of
        # BLOCK_N rows: a [BLOCK_N, NG, GB] tile
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        XDT = x_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        runs = tl.arange(0, NG) * GB
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros((BLOCK_N, NG, GB), dtype=tl.float32)
        for kb0 in range(0, KB, NG * GB):
            g = (kb0 + runs) // GROUP_B  # [NG] group of each run (GROUP_B = 2**30: one group)
            sz_off = offs_n[:, None] * stride_sn + g[None, :]
            sz_ok = n_ok[:, None] & (kb0 + runs < KB)[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
            if HAS_ZERO:
                zc = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32) - QMIN
                zc = zc[:, :, None]
            else:
                zc = ZC
            offs_b = kb0 + runs[:, None] + tl.arange(0, GB)[None, :]  # [NG, GB]
            b_ok = offs_b < KB
            byte = tl.load(
                p_ptr + offs_n[:, None, None] * stride_pn + offs_b[None, :, :],
                mask=n_ok[:, None, None] & b_ok[None, :, :], other=0,
            ).to(tl.int32)
            # w = (code - zc) * s in float32, rounded to x's dtype as in qt.dequantize(x.dtype)
            if BITS == 4:
                x_lo = tl.load(x_row + 2 * offs_b, mask=b_ok, other=0.0).to(tl.float32)
                x_hi = tl.load(x_row + 2 * offs_b + 1, mask=b_ok, other=0.0).to(tl.float32)
                w_lo = (((byte & 0xF).to(tl.float32) - zc) * s).to(XDT).to(tl.float32)
                w_hi = (((byte >> 4).to(tl.float32) - zc) * s).to(XDT).to(tl.float32)
                acc += w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :]
            else:
                xv = tl.load(x_row + offs_b, mask=b_ok, other=0.0).to(tl.float32)
                w = ((byte.to(tl.float32) - zc) * s).to(XDT).to(tl.float32)
                acc += w * xv[None, :, :]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def wo_gemm_kernel(
        x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, KB, stride_xm, stride_pn, stride_sn, stride_ym,
        BITS: tl.constexpr, GROUP_B: tl.constexpr, QMIN: tl.constexpr, HAS_ZERO: tl.constexpr,
        ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        XDT = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb0 in range(0, KB, BLOCK_B):
            g = kb0 // GROUP_B
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zc = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0)
                zc = zc.to(tl.float32) - QMIN
            else:
                zc = tl.zeros_like(s) + ZC
            s = s[:, None]
            zc = zc[:, None]
            offs_b = kb0 + tl.arange(0, BLOCK_B)
            b_ok = offs_b < KB
            byte = tl.load(  # [BLOCK_N, BLOCK_B] bytes, contiguous along K
                p_ptr + offs_n[:, None] * stride_pn + offs_b[None, :],
                mask=n_ok[:, None] & b_ok[None, :], other=0,
            ).to(tl.int32)
            if BITS == 4:  # codes 2j, 2j+1 from the low, high nibbles: join, then flatten
                lo = (((byte & 0xF).to(tl.float32) - zc) * s).to(XDT)
                hi = (((byte >> 4).to(tl.float32) - zc) * s).to(XDT)
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_B))
                offs_k = 2 * kb0 + tl.arange(0, 2 * BLOCK_B)
                k_ok = offs_k < 2 * KB
            else:
                w = ((byte.to(tl.float32) - zc) * s).to(XDT)
                offs_k = offs_b
                k_ok = b_ok
            xv = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xv, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    return triton, wo_gemv_kernel, wo_gemm_kernel


def _fit_block_k(block_k: int, group_size: int) -> int:
    """The largest power of two <= block_k that divides the group (tiles stay in one group)."""
    while group_size and group_size % block_k:
        block_k //= 2
    return block_k


def pick_config(
    m: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype = torch.float16
) -> Config:
    """Default launch parameters for ``[m, k] @ W^T``, W ``[n, k]``, x of ``dtype``. Not tuned
    on a GPU yet (benchmarks/gpu.py sweeps the GEMV candidates); chosen so that ptxas reports
    no register spills for sm_90 (fp32's IEEE dot runs on FMA units: smaller tiles)."""
    if m <= GEMV_MAX_M:  # 4 KiB of codes per program and step
        return Config("gemv", block_n=8, block_k=1024 if bits == 4 else 512, num_warps=4)
    if dtype == torch.float32:
        if m <= 16:
            return Config("gemm", 16, 32, 32, num_warps=4, num_stages=2)
        if m <= 64:
            return Config("gemm", 32, 64, 32, num_warps=4, num_stages=2)
        return Config("gemm", 64, 64, 32, num_warps=8, num_stages=2)
    if m <= 16:
        return Config("gemm", 16, 64, 128, num_warps=4, num_stages=4)
    if m <= 64:
        return Config("gemm", 32, 64, 128, num_warps=4, num_stages=4)
    if m <= 256:
        return Config("gemm", 64, 128, 64, num_warps=4, num_stages=3)
    return Config("gemm", 128, 128, 64, num_warps=8, num_stages=3)


def wo_matmul(
    x: torch.Tensor,
    layout: WeightLayout,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` -> ``[M, N]`` in x's dtype, W given by ``layout``."""
    packed = layout.packed
    bits, k = layout.bits, layout.k
    if bits not in (4, 8):
        raise ValueError(f"wo_matmul handles 4- and 8-bit codes, got bits={bits}")
    if (
        x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8
        or x.shape[1] != k or packed.shape[1] * 8 != k * bits
    ):
        raise ValueError(
            f"wo_matmul needs x [M, K={k}] and packed uint8 [N, K*{bits}/8]; got x "
            f"{tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype}"
        )
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"wo_matmul needs {', '.join(map(str, ACT_DTYPES))} x, got {x.dtype}")
    triton, gemv, gemm = _jit_kernels()
    m = x.shape[0]
    n = packed.shape[0]
    group = layout.group_size
    cfg = config or pick_config(m, n, k, bits, group, x.dtype)
    blocks = (cfg.block_m, cfg.block_n, cfg.block_k)
    if any(b < 1 or b & (b - 1) for b in blocks):
        raise ValueError(f"block sizes must be powers of two, got {cfg}")
    run_k = _fit_block_k(cfg.block_k, group)  # codes per run of a row that lie in one group
    if run_k < (32 if bits == 4 and cfg.kind == "gemm" else 16):
        raise ValueError(f"group_size={group} leaves BLOCK_K={run_k}; need a multiple of 32")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    scale = layout.scale
    stride_sn = 0 if scale.shape[0] == 1 else scale.stride(0)
    zero = layout.zero if layout.zero is not None else scale
    args = (x, packed, scale, zero, bias if bias is not None else scale, y)
    consts = dict(
        BITS=bits, GROUP_B=group * bits // 8 if group else _ONE_GROUP, QMIN=layout.qmin,
        HAS_ZERO=layout.zero is not None, ZC=float(layout.sym_zero_code),
        HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    kb = packed.shape[1]
    if cfg.kind == "gemv":  # a step: block_k codes of a row in runs of run_k (one scale each)
        gemv[(triton.cdiv(n, cfg.block_n), m)](
            *args, n, kb, x.stride(0), packed.stride(0), stride_sn, y.stride(0),
            BLOCK_N=cfg.block_n, NG=cfg.block_k // run_k, GB=run_k * bits // 8, **consts,
        )
    elif cfg.kind == "gemm":
        gemm[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))](
            *args, m, n, kb, x.stride(0), packed.stride(0), stride_sn, y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_B=run_k * bits // 8,
            IEEE=x.dtype == torch.float32, **consts,
        )
    else:
        raise ValueError(f"config kind={cfg.kind!r}; allowed: gemv, gemm")
    return y


_TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_offline(
    kind: str,
    bits: int,
    x_dtype: torch.dtype,
    config: Config,
    *,
    group_size: int = 128,
    has_zero: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    arch: int = 90,
):
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (Triton's own ptxas), as a
    launch with 16-byte-aligned pointers and strides would; returns Triton's compiled kernel
    (``.asm["cubin"]``, ``.asm["ptx"]``). A check of the frontend and of register use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, gemv, gemm = _jit_kernels()
    fn = gemv if kind == "gemv" else gemm
    run_k = _fit_block_k(config.block_k, group_size)
    consts = dict(BITS=bits, GROUP_B=group_size * bits // 8 if group_size else _ONE_GROUP,
                  QMIN=0, HAS_ZERO=has_zero, ZC=float(1 << (bits - 1)), HAS_BIAS=True,
                  BLOCK_N=config.block_n)
    if kind == "gemv":
        consts.update(NG=config.block_k // run_k, GB=run_k * bits // 8)
    else:
        consts.update(BLOCK_M=config.block_m, BLOCK_B=run_k * bits // 8,
                      IEEE=x_dtype == torch.float32)
    xt, st = _TL_TYPES[x_dtype], _TL_TYPES[scale_dtype]
    ptrs = {"x_ptr": xt, "p_ptr": "u8", "s_ptr": st, "z_ptr": st, "b_ptr": xt, "y_ptr": xt}
    names = fn.arg_names
    signature = {a: "constexpr" if a in consts else ("*" + ptrs[a] if a in ptrs else "i32")
                 for a in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
               if a not in consts and a != "M"}
    source = ASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()}, aligned)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
               "enable_fp_fusion": True}  # as a launch does by default
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def execution_layout(qt: QuantizedTensor) -> WeightLayout:
    """The kernels' view of a 4- or 8-bit affine ``qt`` (no copy: the stored tensors)."""
    spec = qt.spec
    qmin, _ = qrange(spec)
    return WeightLayout(
        packed=qt.qdata.contiguous(),
        scale=qt.scale.contiguous(),
        zero=qt.zero_point.contiguous() if spec.has_zero_point else None,
        bits=spec.bits,
        k=qt.shape[1],
        group_size=spec.group_size if spec.granularity == "group" else 0,
        qmin=qmin,
        sym_zero_code=float(symmetric_zero(spec) - qmin),
    )


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_code: torch.Tensor,
    group_size: int,
    config: Config | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T`` -> ``[M, N]`` with W as packed uint8 ``[N, K/2]``, ``scale`` and
    ``zero_code`` ``[N, K/group_size]`` (w = (code - zero_code) * scale)."""
    if packed.dim() != 2 or x.dim() != 2:
        raise ValueError(
            f"int4_matmul needs x [M, K] and packed uint8 [N, K/2]; got x {tuple(x.shape)}, "
            f"packed {tuple(packed.shape)}"
        )
    layout = WeightLayout(packed, scale, zero_code, 4, packed.shape[1] * 2, group_size, 0, 0.0)
    return wo_matmul(x, layout, None, config)


def spec_supported(qt: QuantizedTensor, bits: int = 4) -> bool:
    """``bits``-bit affine weight-only 2-D specs: per tensor, per output channel, or groups
    (a multiple of 32 for 4 bits, 16 for 8 bits) along K; even K for 4 bits."""
    spec = qt.spec
    if spec.act is not None or spec.kind != "affine" or spec.bits != bits:
        return False
    if len(qt.shape) != 2 or qt.g_idx is not None or (bits == 4 and qt.shape[1] % 2):
        return False
    if spec.granularity == "group":
        return spec.group_size % (32 if bits == 4 else 16) == 0
    return spec.granularity == "tensor" or (spec.granularity == "channel" and spec.axis in (0, -2))


def supports_call(qt: QuantizedTensor, x: torch.Tensor, bits: int) -> bool:
    """CUDA input of a float dtype, no autograd, a supported spec, Triton importable."""
    return (
        x.device.type == "cuda"
        and x.dtype in ACT_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through Triton
        and spec_supported(qt, bits)
        and triton_available()
    )


def cached_linear(
    name: str, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype; the layout cached as ``name``."""
    entry = cache.get(name)
    if entry is None or entry[0] is not qt.qdata or entry[1].packed.device != x.device:
        entry = (qt.qdata, execution_layout(qt).to(x.device))
        cache[name] = entry
    n_out, k_in = qt.shape
    b = None if bias is None else bias.to(device=x.device, dtype=x.dtype)  # as the reference
    y = wo_matmul(x.reshape(-1, k_in), entry[1], b)
    return y.reshape(*x.shape[:-1], n_out)


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return supports_call(qt, x, 4)


def triton_int4_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype (CUDA; 4-bit codes)."""
    return cached_linear(NAME, x, qt, bias, cache)


KERNEL = register_kernel(Kernel(NAME, triton_int4_linear, _supports, priority=20))
