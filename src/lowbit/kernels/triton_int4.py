"""Triton weight-only kernels (CUDA): fused dequantize + matmul for 4- and 8-bit affine codes
(and, with ``TABLE``, codes that index a table: :mod:`lowbit.kernels.triton_lut`).

Registers ``triton_int4``; ``triton_int8`` (:mod:`lowbit.kernels.triton_int8`) registers the same
machinery for 8-bit codes. Both read lowbit's canonical bytes directly: row n of the weight is
``K * bits / 8`` bytes; for 4 bits code ``2j`` is the low nibble of byte ``j`` and code ``2j+1``
the high nibble, for 8 bits byte ``j`` is code ``j``. Scales (and zero-points) stay in their stored
dtype, ``[N, G]`` for ``G`` groups of ``group_size`` along K, ``[N, 1]`` per channel, ``[1, 1]``
per tensor. The weights are::

    w = (code - zc) * s       zc = z - qmin (z: the stored zero-point, or the symmetric one)

Codes become floats from their bits (``2**23 + code`` as float32 bits, minus ``2**23``; in the
GEMM ``1024 + code`` as fp16 bits, ``128 + code`` as bf16), never through int->float converts,
which run at a quarter of the FMA rate and bounded the first version of these kernels. Kinds
(:class:`Config`):

- ``gemv`` (M <= ``GEMV_MAX_M``): CUDA cores, one program per ``BLOCK_N`` outputs and row of x.
  A step loads ``[BLOCK_N, runs, bytes]`` codes, each run inside one group; per run
  ``s * (sum(code * x) - zc * sum(x))`` in float32. 16-bit x is read as int32 pairs that match
  the bytes of 4-bit codes.
- ``gemv2`` (M <= ``GEMV_MAX_M``, rows of whole int32 words: K * bits % 32 == 0): CUDA cores,
  one program per ``BLOCK_N`` outputs and row of x; the codes read as int32 words (8 or 4 codes
  each). A step reads a ``[BLOCK_N, runs, run_words]`` tile of words, one run of ``run_words``
  words (inside one group) per thread and row, so the thread loads x of its run once (16-byte
  loads) and converts it to float32 once for all ``BLOCK_N`` rows. A code c becomes
  ``f = 1 + c / 2**bits`` from its bits (c shifted into the top mantissa bits of 1.0: one shift
  and one LOP3 per weight, no subtract), then one FFMA: ``sum(c * x) = 2**bits * (sum(f * x) -
  sum(x))`` per run, ``s * (2**bits * sum(f * x) - (2**bits + zc) * sum(x))`` its weights'
  share. Its inner loop is 3.8-4.7 SASS instructions per weight for fp16 x, w4g128 on sm_90
  (triton 3.6 and 3.9; ``gemv``: 7.2-10.2), counted offline, not timed: the autotuner decides
  on the device. Each ``f * x`` is rounded once in float32 like ``c * x``, but the sums run over
  ``(2**bits + c) * x`` before the cancellation, so the float32 error bound is a few times
  wider than ``gemv``'s (well inside the tests' tolerance).
- ``gemm``: ``[BLOCK_M, BLOCK_N]`` tiles; a step (one group) puts the integer codes, exact in x's
  dtype, through ``tl.dot`` (float32 accumulation; IEEE for fp32 x) and applies the group's map
  to the partial sums. ``split_k`` > 1 cuts K into slices whose float32 partial sums are added
  atomically (small M; the sum order varies run to run, so the autotuner skips it under
  ``torch.use_deterministic_algorithms``).
- ``dequant``: writes the weights in x's dtype, then ``F.linear`` (large M: the vendor GEMM).

Numerics: ``gemv``, ``gemv2`` and ``gemm`` use the exact float32 weights (not rounded to x's dtype;
with a table, ``gemm`` rounds each entry to x's dtype); ``dequant`` rounds each weight to x's
dtype, so it equals ``qt.dequantize(x.dtype)``. Sums are in
float32 and the output is rounded once to x's dtype (the bias added before). Tests compare with
a float64 oracle allowing float32 sums and one rounding of each weight.

Launch configs: on CUDA :func:`wo_matmul` autotunes each shape at its first call (rows rounded up
to a power of two, N, K, bits, dtypes): it times :func:`candidate_configs` from CUDA-graph
replays over weight copies larger than the L2 cache and keeps the fastest (``tuned_configs()``
lists the picks; ``LOWBIT_TRITON_AUTOTUNE=0`` or a graph capture uses :func:`pick_config`).
:func:`compile_offline` builds a variant for ``sm_90`` without a GPU (tests compile every
candidate and check that ptxas spills no registers).

Triton is optional: it is imported on first use only. The kernels register for CUDA devices;
under ``TRITON_INTERPRET=1`` :func:`wo_matmul` also runs on CPU tensors (that is how CI checks
them against the reference).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.quant.maps import code_values, qrange, symmetric_zero
from lowbit.tensor import QuantizedTensor

NAME = "triton_int4"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 4  # rows of x up to which GEMV is a candidate (it re-reads W per row)
_ONE_GROUP = 1 << 30  # the kernels' GROUP_B for one group per row (kb // GROUP_B == 0)
KINDS = ("gemv", "gemv2", "gemm", "dequant")
_ONE_BITS = 0x3F800000  # 1.0f: gemv2 gets it as an argument (ptxas then keeps it in a register)


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
    """Launch parameters: ``kind`` is "gemv", "gemv2", "gemm" or "dequant"; block sizes in codes
    (powers of two); ``split_k`` > 1 (gemm): K is cut into that many slices whose float32
    partial sums are added atomically (more programs for small M; the sum order then varies run
    to run); ``run_words`` (gemv2: 4, 8 or 16): int32 words of a row per thread and step, a run
    inside one group (``block_k / (run_words * 32 / bits)`` runs per step)."""

    kind: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    run_words: int = 4


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
    # 4-bit codes that index a table (nf4, fp4): float32 [16], w = table[code] * s (no zc)
    table: torch.Tensor | None = None

    def to(self, device: torch.device) -> WeightLayout:
        move = {name: None if t is None else t.to(device) for name, t in
                (("packed", self.packed), ("scale", self.scale), ("zero", self.zero),
                 ("table", self.table))}
        return WeightLayout(**{**self.__dict__, **move})

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes + scales + zero-points + table)."""
        parts = [t for t in (self.packed, self.scale, self.zero, self.table) if t is not None]
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
        GB: tl.constexpr, X_PAIRS: tl.constexpr, TABLE: tl.constexpr,
    ):
        # codes become floats from their bits, (2**23 + code) - 2**23, exact: an int->float
        # convert runs at a quarter of the FMA rate and bounded this kernel.
        # KB bytes per weight row; each step reads NG runs of GB bytes (one group each) of
        # BLOCK_N rows: a [BLOCK_N, NG, GB] tile. Per run: s * (sum(code * x) - zc * sum(x))
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        runs = tl.arange(0, NG) * GB
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
        for kb0 in range(0, KB, NG * GB):
            g = (kb0 + runs) // GROUP_B  # [NG] group of each run (GROUP_B = 2**30: one group)
            sz_off = offs_n[:, None] * stride_sn + g[None, :]
            sz_ok = n_ok[:, None] & (kb0 + runs < KB)[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            offs_b = kb0 + runs[:, None] + tl.arange(0, GB)[None, :]  # [NG, GB]
            b_ok = offs_b < KB
            byte = tl.load(
                p_ptr + offs_n[:, None, None] * stride_pn + offs_b[None, :, :],
                mask=n_ok[:, None, None] & b_ok[None, :, :], other=0,
            ).to(tl.int32)
            if BITS == 4:  # x_lo, x_hi [NG, GB]: the x of codes 2j (low nibble), 2j+1
                if X_PAIRS == 0:  # float32 x
                    x_lo = tl.load(x_row + 2 * offs_b, mask=b_ok, other=0.0)
                    x_hi = tl.load(x_row + 2 * offs_b + 1, mask=b_ok, other=0.0)
                else:  # 16-bit x read as int32 pairs: element 2j in the low half
                    pair = tl.load(x_row + offs_b, mask=b_ok, other=0)
                    if X_PAIRS == 2:  # bf16 -> float32 is a 16-bit shift
                        x_lo = (pair << 16).to(tl.float32, bitcast=True)
                        x_hi = (pair & -65536).to(tl.float32, bitcast=True)
                    else:
                        x_lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
                        x_hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
                        x_lo = x_lo.to(tl.float32)
                        x_hi = x_hi.to(tl.float32)
                if TABLE:  # the codes' table entries (z_ptr: float32 [16])
                    lo = tl.load(z_ptr + (byte & 0xF))
                    hi = tl.load(z_ptr + (byte >> 4))
                else:
                    lo = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                cx = lo * x_lo[None, :, :] + hi * x_hi[None, :, :]
                xs = tl.sum(x_lo + x_hi, axis=1)
            else:
                xv = tl.load(x_row + offs_b, mask=b_ok, other=0.0).to(tl.float32)
                if TABLE:  # 256 entries (fp8)
                    code = tl.load(z_ptr + byte)
                else:
                    code = (byte | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                cx = code * xv[None, :, :]
                xs = tl.sum(xv, axis=1)
            if TABLE:
                acc += tl.sum(cx, axis=2) * s
            else:
                if HAS_ZERO:
                    zc = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32) - QMIN
                else:
                    zc = ZC
                acc += (tl.sum(cx, axis=2) - zc * xs[None, :]) * s
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def wo_gemm_kernel(
        x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, KB, KB_SPLIT, stride_xm, stride_pn, stride_sn, stride_ym,
        BITS: tl.constexpr, GROUP_B: tl.constexpr, QMIN: tl.constexpr, HAS_ZERO: tl.constexpr,
        ZC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr, TABLE: tl.constexpr,
    ):
        # a step reads BLOCK_B bytes of each of BLOCK_N rows, inside one group: the integer
        # codes (exact in x's dtype) go through tl.dot, the group's affine map after it.
        # Program (i, j, k) covers bytes [k * KB_SPLIT, (k + 1) * KB_SPLIT) of the rows
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        kb_start = tl.program_id(2) * KB_SPLIT
        kb_end = tl.minimum(KB, kb_start + KB_SPLIT)
        XDT = x_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb0 in range(kb_start, kb_end, BLOCK_B):
            g = kb0 // GROUP_B
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zc = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0)
                zc = zc.to(tl.float32) - QMIN
            else:
                zc = tl.zeros_like(s) + ZC
            offs_b = kb0 + tl.arange(0, BLOCK_B)
            b_ok = offs_b < KB
            byte = tl.load(  # [BLOCK_N, BLOCK_B] bytes, contiguous along K
                p_ptr + offs_n[:, None] * stride_pn + offs_b[None, :],
                mask=n_ok[:, None] & b_ok[None, :], other=0,
            ).to(tl.int32)
            if BITS == 4:  # codes 2j, 2j+1 from the low, high nibbles, joined into K order
                code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, 2 * BLOCK_B))
                offs_k = 2 * kb0 + tl.arange(0, 2 * BLOCK_B)
                k_ok = offs_k < 2 * KB
            else:
                code = byte
                offs_k = offs_b
                k_ok = b_ok
            # the code as a value of x's dtype, exact, from its bits (no int->float convert);
            # a table's entry rounded to x's dtype
            if TABLE:
                w = tl.load(z_ptr + code).to(XDT)
            elif XDT == tl.float16:
                w = (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                w = w - tl.full((), 1024.0, tl.float16)
            elif XDT == tl.bfloat16 and BITS == 4:
                w = (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                w = w - tl.full((), 128.0, tl.bfloat16)
            else:
                w = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                w = w.to(XDT)
            xv = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                part = tl.dot(xv, tl.trans(w), input_precision="ieee")
            else:
                part = tl.dot(xv, tl.trans(w))
            xs = tl.sum(xv.to(tl.float32), axis=1)
            acc += (part - xs[:, None] * zc[None, :]) * s[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K > 1:  # y is float32, holding the bias (or zeros) already
            tl.atomic_add(y_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def wo_dequant_kernel(
        p_ptr, s_ptr, z_ptr, w_ptr, N, KB, stride_pn, stride_sn, stride_wn,
        BITS: tl.constexpr, GROUP_B: tl.constexpr, QMIN: tl.constexpr, HAS_ZERO: tl.constexpr,
        ZC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, W_PAIRS: tl.constexpr,
        TABLE: tl.constexpr,
    ):
        # the weights (code - zc) * s in float32, rounded to W's dtype, for a [BLOCK_N, BLOCK_B]
        # -byte tile of the codes inside one group. W_PAIRS (4 bits, 16-bit W): W is written
        # as int32 words, the two weights of a byte in one word (1: fp16, 2: bf16)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        n_ok = offs_n < N
        ok = n_ok[:, None] & (offs_b < KB)[None, :]
        byte = tl.load(p_ptr + offs_n[:, None] * stride_pn + offs_b[None, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        sz_off = offs_n * stride_sn + (tl.program_id(1) * BLOCK_B) // GROUP_B
        s = tl.load(s_ptr + sz_off, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            zc = tl.load(z_ptr + sz_off, mask=n_ok, other=0.0).to(tl.float32)[:, None] - QMIN
        else:
            zc = ZC
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        if BITS == 4:
            if TABLE:  # the codes' table entries (z_ptr: float32 [16]); ZC is 0
                lo = tl.load(z_ptr + (byte & 0xF))
                hi = tl.load(z_ptr + (byte >> 4))
            else:
                lo = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            lo = (lo - zc) * s
            hi = (hi - zc) * s
            if W_PAIRS == 0:  # float32 W: interleave into K order
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_B))
                offs_k = 2 * tl.program_id(1) * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
                tl.store(w_rows + offs_k[None, :], w, mask=n_ok[:, None] & (offs_k < 2 * KB))
            else:
                HDT: tl.constexpr = tl.float16 if W_PAIRS == 1 else tl.bfloat16
                lo16 = lo.to(HDT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                hi16 = hi.to(HDT).to(tl.int16, bitcast=True).to(tl.int32)
                tl.store(w_rows + offs_b[None, :], lo16 | (hi16 << 16), mask=ok)
        else:
            if TABLE:  # 256 entries (fp8)
                code = tl.load(z_ptr + byte)
            else:
                code = (byte | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w = (code - zc) * s
            tl.store(w_rows + offs_b[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _code_float(word, IDX: tl.constexpr, BITS: tl.constexpr, one):
        # code IDX of each int32 word as the float 1 + code / 2**BITS: the code shifted into the
        # top mantissa bits of 1.0 (``one``: 1.0's bits, an argument so that ptxas keeps it in a
        # register; a shift and one LOP3, no subtract, no int->float convert)
        SH: tl.constexpr = 23 - BITS * (IDX + 1)
        if SH >= 0:
            bits = word << SH
        else:
            bits = word >> -SH
        return ((bits & (((1 << BITS) - 1) << (23 - BITS))) | one).to(
            tl.float32, bitcast=True)

    @triton.jit
    def _word_dot(word, xp, ok, part, x_sum, BITS: tl.constexpr, one):
        # part += f * x over the codes of ``word`` [ROWS, RUNS] (f = 1 + code / 2**BITS), the x
        # of its codes at xp [RUNS] + (0 .. 32 / BITS - 1); x_sum [1, RUNS] += x
        CPW: tl.constexpr = 32 // BITS
        xv = tl.load(xp[None, :, None] + tl.arange(0, CPW)[None, None, :], mask=ok[None, :, None],
                     other=0.0).to(tl.float32)  # [1, RUNS, CPW]: one vector load per word
        if BITS == 4:
            ev, od = tl.split(tl.reshape(xv, (1, xv.shape[1], 4, 2)))  # codes 0 2 4 6 | 1 3 5 7
            e0, e1 = tl.split(tl.reshape(ev, (1, xv.shape[1], 2, 2)))  # 0 4 | 2 6
            o0, o1 = tl.split(tl.reshape(od, (1, xv.shape[1], 2, 2)))  # 1 5 | 3 7
            x0, x4 = tl.split(e0)
            x2, x6 = tl.split(e1)
            x1, x5 = tl.split(o0)
            x3, x7 = tl.split(o1)
        else:
            ev, od = tl.split(tl.reshape(xv, (1, xv.shape[1], 2, 2)))  # codes 0 2 | 1 3
            x0, x2 = tl.split(ev)
            x1, x3 = tl.split(od)
        part += _code_float(word, 0, BITS, one) * x0
        part += _code_float(word, 1, BITS, one) * x1
        part += _code_float(word, 2, BITS, one) * x2
        part += _code_float(word, 3, BITS, one) * x3
        x_sum += (x0 + x1) + (x2 + x3)
        if BITS == 4:
            part += _code_float(word, 4, BITS, one) * x4
            part += _code_float(word, 5, BITS, one) * x5
            part += _code_float(word, 6, BITS, one) * x6
            part += _code_float(word, 7, BITS, one) * x7
            x_sum += (x4 + x5) + (x6 + x7)
        return part, x_sum

    @triton.jit
    def wo_gemv2_kernel(
        x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        N, KW, stride_xm, stride_pn, stride_sn, stride_ym, one,
        BITS: tl.constexpr, GROUP_W: tl.constexpr, QMIN: tl.constexpr, HAS_ZERO: tl.constexpr,
        ZC: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, RUNS: tl.constexpr,
        VW: tl.constexpr,
    ):
        # the codes as int32 words (32 / BITS codes each). A step reads a [ROWS, RUNS, VW] tile
        # of words: RUNS runs of VW words (VW / 4 16-byte loads, inside one group) of ROWS rows;
        # a thread holds one run of every row, so the x of its run is loaded and made float32
        # once for all ROWS rows. With f = 1 + code / 2**BITS (exact), per run and row:
        #   sum(code * x) = 2**BITS * (sum(f * x) - sum(x))
        #   sum(w * x) = s * (2**BITS * sum(f * x) - (2**BITS + zc) * sum(x))
        CPW: tl.constexpr = 32 // BITS
        MUL: tl.constexpr = float(1 << BITS)
        tl.static_assert(VW % 4 == 0)
        pid = tl.program_id(0)
        m = tl.program_id(1)
        offs_r = pid * ROWS + tl.arange(0, ROWS)
        r_ok = offs_r < N
        runs = tl.arange(0, RUNS) * VW  # first word of each run in a step
        # the words of the first quad of each run (a run is VW / 4 quads of 4 words)
        offs_f = tl.max_contiguous(tl.multiple_of(
            (tl.arange(0, RUNS * 4) // 4) * VW + tl.arange(0, RUNS * 4) % 4, 4), 4)
        x_row = x_ptr + m * stride_xm
        acc = tl.zeros((ROWS, RUNS), dtype=tl.float32)
        for kw0 in range(0, KW, RUNS * VW):
            part = tl.zeros((ROWS, RUNS), dtype=tl.float32)
            x_sum = tl.zeros((1, RUNS), dtype=tl.float32)
            v = kw0 + runs
            for q in tl.static_range(0, VW, 4):
                # [ROWS, RUNS * 4] words, 4 contiguous ones per thread (one 16-byte load)
                offs_q = kw0 + q + offs_f
                words = tl.load(p_ptr + offs_r[:, None] * stride_pn + offs_q[None, :],
                                mask=r_ok[:, None] & (offs_q < KW)[None, :], other=0)
                w02, w13 = tl.split(tl.reshape(words, (ROWS, RUNS, 2, 2)))
                w0, w2 = tl.split(w02)
                w1, w3 = tl.split(w13)
                for j in tl.static_range(4):
                    wj = w0 if j == 0 else (w1 if j == 1 else (w2 if j == 2 else w3))
                    part, x_sum = _word_dot(wj, x_row + (v + q + j) * CPW, v + q + j < KW,
                                            part, x_sum, BITS, one)
            sz_off = offs_r[:, None] * stride_sn + (v // GROUP_W)[None, :]
            sz_ok = r_ok[:, None] & (v < KW)[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                t = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32) + (MUL - QMIN)
            else:
                t = MUL + ZC
            acc += (MUL * part - t * x_sum) * s
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_r, y.to(y_ptr.dtype.element_ty), mask=r_ok)

    # the interpreter resolves a kernel's callees in the module's globals, not in this closure
    globals().update(_code_float=_code_float, _word_dot=_word_dot)
    return triton, wo_gemv_kernel, wo_gemm_kernel, wo_dequant_kernel, wo_gemv2_kernel


def _fit_block_k(block_k: int, group_size: int) -> int:
    """The largest power of two <= block_k that divides the group (tiles stay in one group)."""
    while group_size and group_size % block_k:
        block_k //= 2
    return block_k


def pick_config(
    m: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype = torch.float16,
    table: bool = False,
) -> Config:
    """Default launch parameters for ``[m, k] @ W^T``, W ``[n, k]``, x of ``dtype``, used where
    the autotuner does not run (CPU interpreter, CUDA graph capture, LOWBIT_TRITON_AUTOTUNE=0):
    the first candidate of :func:`candidate_configs`."""
    return candidate_configs(m, bits, dtype, table)[0]


def candidate_configs(m: int, bits: int, dtype: torch.dtype, table: bool = False) -> list[Config]:
    """Launch configs the autotuner times for ``m`` rows of x, the default first (``table``:
    codes that index a table, which the gemv2 kind's bit trick cannot read). The fused tiles
    compile for sm_90 without register spills (tests/kernels/test_triton.py)."""
    configs = _candidates(m, bits, dtype)
    if not table:
        return configs
    return [c for c in configs
            if c.kind != "gemv2" and (c.kind != "gemm" or _table_gemm_fits(c))]


def _table_gemm_fits(cfg: Config) -> bool:
    """A table lookup gathers through one address per code: in gemm tiles of more than 32 codes
    or 16 accumulators per thread ptxas spilled registers (sm_90, triton 3.9)."""
    threads = 32 * cfg.num_warps
    return cfg.block_n * cfg.block_k <= 32 * threads and cfg.block_m * cfg.block_n <= 16 * threads


def _candidates(m: int, bits: int, dtype: torch.dtype) -> list[Config]:
    dequant = Config("dequant", block_n=32, block_k=128, num_warps=4)  # a tile: <= one group
    if dtype == torch.float32:  # the IEEE dot runs on FMA units: small tiles
        if m <= 16:
            return [Config("gemm", 16, 32, 32, num_warps=4, num_stages=2)]
        if m <= 64:
            return [Config("gemm", 32, 64, 32, num_warps=4, num_stages=2), dequant]
        return [dequant, Config("gemm", 64, 64, 32, num_warps=8, num_stages=2)]
    if m > 256:
        return [dequant, Config("gemm", 128, 64, 128, num_warps=8, num_stages=3),
                Config("gemm", 64, 256, 64, num_warps=8, num_stages=3),
                Config("gemm", 64, 128, 128, num_warps=8, num_stages=3)]
    if m > 64:
        return [Config("gemm", 64, 128, 64, num_warps=8, num_stages=3),
                Config("gemm", 64, 64, 128, num_warps=4, num_stages=3),
                Config("gemm", 128, 64, 64, num_warps=8, num_stages=3),
                Config("gemm", 64, 128, 128, num_warps=8, num_stages=3),
                Config("gemm", 64, 64, 128, num_warps=4, num_stages=3, split_k=4), dequant]
    if m > 16:
        return [Config("gemm", 32, 64, 128, num_warps=4, num_stages=4),
                Config("gemm", 32, 32, 128, num_warps=4, num_stages=4),
                Config("gemm", 64, 64, 128, num_warps=4, num_stages=3),
                Config("gemm", 32, 64, 128, num_warps=4, num_stages=4, split_k=4), dequant]
    gemm = [Config("gemm", 16, 32, 128, num_warps=4, num_stages=4),
            Config("gemm", 16, 64, 128, num_warps=4, num_stages=4),
            Config("gemm", 16, 16, 128, num_warps=4, num_stages=6),
            Config("gemm", 16, 32, 128, num_warps=4, num_stages=8),
            Config("gemm", 16, 64, 128, num_warps=4, num_stages=6),
            Config("gemm", 16, 128, 128, num_warps=4, num_stages=3),
            Config("gemm", 16, 64, 128, num_warps=4, num_stages=4, split_k=4),
            Config("gemm", 16, 32, 128, num_warps=4, num_stages=4, split_k=8),
            Config("gemm", 16, 128, 128, num_warps=4, num_stages=3, split_k=8)]
    if m > GEMV_MAX_M:
        return gemm
    # GEMV: block_k codes of block_n rows per step (bytes: block_k * bits / 8)
    per_row = 1024 if bits == 4 else 512
    gemv = [Config("gemv", block_n=4, block_k=per_row, num_warps=4),
            Config("gemv", block_n=2, block_k=2 * per_row, num_warps=4),
            Config("gemv", block_n=4, block_k=2 * per_row, num_warps=4),
            Config("gemv", block_n=8, block_k=per_row, num_warps=4),
            Config("gemv", block_n=8, block_k=per_row // 2, num_warps=4),
            Config("gemv", block_n=16, block_k=per_row // 2, num_warps=8),
            Config("gemv", block_n=8, block_k=2 * per_row, num_warps=8)]
    # gemv2: one run of run_words int32 words per thread and step (block_k = threads * run)
    cpw = 32 // bits
    gemv += [Config("gemv2", block_n=rows, block_k=32 * warps * words * cpw, num_warps=warps,
                    run_words=words)
             for rows, warps, words in ((8, 4, 4), (8, 2, 8), (16, 2, 4), (4, 4, 4), (16, 4, 4),
                                        (8, 1, 8), (8, 4, 8))
             if bits == 4 or (warps, words) != (2, 8)]  # 8 bits: ptxas (triton 3.6) spilled
    return gemv + gemm[:2] + gemm[-3:-1]


_TUNED: dict[tuple, Config] = {}


def tuned_configs() -> dict[tuple, Config]:
    """What the autotuner chose so far: ``(rows bucket, N, K, bits, group, x dtype, zero-point,
    bias, deterministic mode, table) -> Config``."""
    return dict(_TUNED)


def _tuned_config(x: torch.Tensor, layout: WeightLayout, bias: torch.Tensor | None) -> Config:
    """The fastest candidate for this call's shape on CUDA, timed once per (rows rounded up to
    a power of two, N, K, bits, group, dtypes) by :func:`_graph_time`.
    Not timed while a CUDA graph is being captured or with LOWBIT_TRITON_AUTOTUNE=0: then an
    earlier pick or the default."""
    m, n = x.shape[0], layout.packed.shape[0]
    bucket = 1 << max(0, m - 1).bit_length()
    table = layout.table is not None
    key = (bucket, n, layout.k, layout.bits, layout.group_size, x.dtype,
           layout.zero is not None, bias is not None, torch.are_deterministic_algorithms_enabled(),
           table)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    candidates = candidate_configs(bucket, layout.bits, x.dtype, table)
    default = candidates[0]  # pick_config's
    if (not x.is_cuda or m == 0 or n == 0 or torch.cuda.is_current_stream_capturing()
            or os.environ.get("LOWBIT_TRITON_AUTOTUNE", "1") == "0"):
        return default
    if len(candidates) == 1:  # nothing to choose (e.g. table codes at large M: dequant)
        _TUNED[key] = default
        return default
    # timed as a model runs them: weight copies totalling > 2x the L2 cache, rotated (each call
    # reads its weight from device memory), replayed from a CUDA graph (no launch overhead,
    # which otherwise dominates a 10 us kernel)
    l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 50 << 20)
    copies = [layout] + [
        WeightLayout(**{**layout.__dict__, "packed": layout.packed.clone()})
        for _ in range(min(15, -(-2 * l2 // max(1, layout.nbytes)) - 1))
    ]
    best = None
    for cand in candidates:
        if cand.split_k > 1 and torch.are_deterministic_algorithms_enabled():
            continue  # atomic float adds: the sum order varies run to run
        try:
            t = _graph_time([lambda lay=lay, c=cand: _launch(x, lay, bias, c) for lay in copies])
        except Exception:  # e.g. a tile that needs more shared memory than this GPU has
            continue
        if best is None or t < best[0]:
            best = (t, cand)
    del copies
    _TUNED[key] = best[1] if best else default
    return _TUNED[key]


def _graph_time(calls: list, loops: int = 8, trials: int = 5) -> float:
    """Median seconds per call of ``calls`` replayed ``loops`` times from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(loops):
            for fn in calls:
                fn()
    graph.replay()
    times = []
    for _ in range(trials):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (loops * len(calls)))
    return sorted(times)[len(times) // 2]


def wo_matmul(
    x: torch.Tensor,
    layout: WeightLayout,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` -> ``[M, N]`` in x's dtype, W given by ``layout``; ``config``
    None: autotuned on CUDA (see :func:`_tuned_config`), else :func:`pick_config`."""
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
    x = x.contiguous()
    return _launch(x, layout, bias, config or _tuned_config(x, layout, bias))


def _launch(
    x: torch.Tensor, layout: WeightLayout, bias: torch.Tensor | None, cfg: Config
) -> torch.Tensor:
    """One config's kernels for checked inputs (x contiguous ``[M, K]``)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"config kind={cfg.kind!r}; allowed: {', '.join(KINDS)}")
    if any(b < 1 or b & (b - 1) for b in (cfg.block_m, cfg.block_n, cfg.block_k)):
        raise ValueError(f"block sizes must be powers of two, got {cfg}")
    triton, gemv, gemm, dequant, gemv2 = _jit_kernels()
    packed, bits, group = layout.packed, layout.bits, layout.group_size
    m, n, kb = x.shape[0], packed.shape[0], packed.shape[1]
    table = layout.table is not None
    if table and (layout.table.numel() != 1 << bits or layout.zero is not None
                  or cfg.kind == "gemv2"):
        raise ValueError(f"a table layout needs a table of 2**bits entries, no zero-point and a "
                         f"gemv, gemm or dequant config; got bits={bits}, {cfg}")
    if cfg.kind == "gemv2":
        return _launch_gemv2(triton, gemv2, x, layout, bias, cfg)
    run_k = _fit_block_k(cfg.block_k, group)  # codes per run of a row that lie in one group
    if run_k < (32 if bits == 4 and cfg.kind == "gemm" else 16):
        raise ValueError(f"group_size={group} leaves BLOCK_K={run_k}; need a multiple of 32")
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    scale = layout.scale
    stride_sn = 0 if scale.shape[0] == 1 else scale.stride(0)
    # z_ptr: the zero-points, or the table (a layout never has both), or a placeholder
    zero = layout.table if table else (layout.zero if layout.zero is not None else scale)
    consts = dict(
        BITS=bits, GROUP_B=group * bits // 8 if group else _ONE_GROUP, QMIN=layout.qmin,
        HAS_ZERO=layout.zero is not None, ZC=float(layout.sym_zero_code), TABLE=table,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.kind == "dequant":  # the weight in x's dtype, then the vendor matmul
        w = torch.empty((n, layout.k), dtype=x.dtype, device=x.device)
        pairs = 0 if bits == 8 or x.dtype == torch.float32 else (
            1 if x.dtype == torch.float16 else 2)
        wk = w.view(torch.int32) if pairs else w
        bb = run_k * bits // 8
        dequant[(triton.cdiv(n, cfg.block_n), triton.cdiv(kb, bb))](
            packed, scale, zero, wk, n, kb, packed.stride(0), stride_sn, wk.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_B=bb, W_PAIRS=pairs, **consts,
        )
        return torch.nn.functional.linear(x, w, bias)
    b = bias if bias is not None else scale  # a placeholder pointer without a bias
    consts["HAS_BIAS"] = bias is not None
    if cfg.kind == "gemv":  # a step: block_k codes of a row in runs of run_k (one scale each)
        pairs = 0 if bits == 8 or x.dtype == torch.float32 else (
            1 if x.dtype == torch.float16 else 2)
        if pairs and x.storage_offset() % 2:  # an int32 view needs 4-byte alignment
            x = x.clone()
        xk = x.view(torch.int32) if pairs else x  # 4 bits: one int32 of x per byte of codes
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        gemv[(triton.cdiv(n, cfg.block_n), m)](
            xk, packed, scale, zero, b, y, n, kb, xk.stride(0), packed.stride(0), stride_sn,
            y.stride(0), BLOCK_N=cfg.block_n, NG=cfg.block_k // run_k, GB=run_k * bits // 8,
            X_PAIRS=pairs, **consts,
        )
        return y
    bb = run_k * bits // 8
    kb_split = triton.cdiv(triton.cdiv(kb, cfg.split_k), bb) * bb
    split = triton.cdiv(kb, kb_split)
    if split > 1:  # float32 partial sums added atomically onto the bias
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device) if bias is None \
            else bias.float().expand(m, n).contiguous()
        consts["HAS_BIAS"] = False
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    gemm[(triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)](
        x, packed, scale, zero, b, y, m, n, kb, kb_split, x.stride(0), packed.stride(0),
        stride_sn, y.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_B=bb,
        IEEE=x.dtype == torch.float32, SPLIT_K=split, **consts,
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _gemv2_words(cfg: Config, bits: int, group_size: int) -> tuple[int, int]:
    """(RUNS, GROUP_W) of a gemv2 config: a step reads ``block_k`` codes of a row as RUNS runs
    of ``run_words`` int32 words; a group of ``group_size`` codes is GROUP_W words."""
    cpw = 32 // bits
    run = cfg.run_words * cpw  # codes per run
    if cfg.run_words not in (4, 8, 16) or cfg.block_k % run or (group_size and group_size % run):
        raise ValueError(f"gemv2 needs run_words 4, 8 or 16 and block_k and group_size multiples "
                         f"of run_words * {cpw} codes, got {cfg} with group_size={group_size}")
    return cfg.block_k // run, group_size // cpw if group_size else _ONE_GROUP


def _launch_gemv2(triton, kernel, x: torch.Tensor, layout: WeightLayout,
                  bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """The gemv2 kind: codes read as int32 words (rows of whole words, 4-byte aligned)."""
    packed, bits = layout.packed, layout.bits
    m, n, kb = x.shape[0], packed.shape[0], packed.shape[1]
    runs, group_w = _gemv2_words(cfg, bits, layout.group_size)
    if kb % 4 or packed.stride(0) % 4 or packed.stride(1) != 1 or packed.data_ptr() % 4:
        raise ValueError(f"gemv2 reads rows of whole int32 words: packed {tuple(packed.shape)} "
                         f"stride {packed.stride()} needs 4-byte rows and alignment")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    words = packed.view(torch.int32)
    scale = layout.scale
    zero = layout.zero if layout.zero is not None else scale
    kernel[(triton.cdiv(n, cfg.block_n), m)](
        x, words, scale, zero, bias if bias is not None else scale, y, n, kb // 4, x.stride(0),
        words.stride(0), 0 if scale.shape[0] == 1 else scale.stride(0), y.stride(0), _ONE_BITS,
        BITS=bits, GROUP_W=group_w, QMIN=layout.qmin, HAS_ZERO=layout.zero is not None,
        ZC=float(layout.sym_zero_code), HAS_BIAS=bias is not None, ROWS=cfg.block_n, RUNS=runs,
        VW=cfg.run_words, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
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
    table: bool = False,
):
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (Triton's own ptxas), as a
    launch with 16-byte-aligned pointers and strides would; returns Triton's compiled kernel
    (``.asm["cubin"]``, ``.asm["ptx"]``). A check of the frontend and of register use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, gemv, gemm, dequant, gemv2 = _jit_kernels()
    fn = {"gemv": gemv, "gemm": gemm, "dequant": dequant, "gemv2": gemv2}[kind]
    run_k = _fit_block_k(config.block_k, group_size)
    has_zero = has_zero and not table
    consts = dict(BITS=bits, GROUP_B=group_size * bits // 8 if group_size else _ONE_GROUP,
                  QMIN=0, HAS_ZERO=has_zero, ZC=0.0 if table else float(1 << (bits - 1)),
                  BLOCK_N=config.block_n, TABLE=table)
    if kind == "gemv2":
        runs, group_w = _gemv2_words(config, bits, group_size)
        consts = dict(BITS=bits, GROUP_W=group_w, QMIN=0, HAS_ZERO=has_zero,
                      ZC=float(1 << (bits - 1)), HAS_BIAS=True, ROWS=config.block_n, RUNS=runs,
                      VW=config.run_words)
    elif kind == "dequant":
        consts.update(BLOCK_B=run_k * bits // 8, W_PAIRS=0 if bits == 8 or x_dtype ==
                      torch.float32 else (1 if x_dtype == torch.float16 else 2))
    elif kind == "gemv":
        pairs = 0 if bits == 8 or x_dtype == torch.float32 else (
            1 if x_dtype == torch.float16 else 2)
        consts.update(NG=config.block_k // run_k, GB=run_k * bits // 8, HAS_BIAS=True,
                      X_PAIRS=pairs)
    else:
        consts.update(BLOCK_M=config.block_m, BLOCK_B=run_k * bits // 8,
                      IEEE=x_dtype == torch.float32, HAS_BIAS=True, SPLIT_K=config.split_k)
    xt, st = _TL_TYPES[x_dtype], _TL_TYPES[scale_dtype]
    ptrs = {"x_ptr": "i32" if consts.get("X_PAIRS") else xt,
            "p_ptr": "i32" if kind == "gemv2" else "u8", "s_ptr": st,
            "z_ptr": "fp32" if table else st, "b_ptr": xt,
            "w_ptr": "i32" if consts.get("W_PAIRS") else xt,
            "y_ptr": "fp32" if config.split_k > 1 and kind == "gemm" else xt}
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
    """The kernels' view of a 4- or 8-bit affine ``qt``, or of 4-bit codes indexing one table
    (nf4, fp4: :func:`table_spec_supported`); no copy but the table's: the stored tensors."""
    spec = qt.spec
    if spec.kind != "affine":
        return WeightLayout(
            packed=qt.qdata.contiguous().view(torch.uint8),  # fp8 codes: their bytes
            scale=qt.scale.contiguous(),
            zero=None,
            bits=spec.bits,
            k=qt.shape[1],
            group_size=spec.group_size if spec.granularity == "group" else 0,
            qmin=0,
            sym_zero_code=0.0,
            table=code_values(spec).float().contiguous(),
        )
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


def table_spec_supported(qt: QuantizedTensor, bits: int = 4) -> bool:
    """Weight-only 2-D specs whose codes index one table for the whole tensor: 4 bits (nf4's
    codebook, fp4's float grid; not k-means' per-row tables; even K) or 8 bits (fp8 e4m3fn /
    e5m2, 256 entries), times a scale per group (a multiple of 32 for 4 bits, 16 for 8), per
    output channel or per tensor."""
    spec = qt.spec
    if spec.act is not None or spec.kind not in ("codebook", "float") or spec.bits != bits:
        return False
    if bits not in (4, 8) or len(qt.shape) != 2 or qt.g_idx is not None or qt.scale is None:
        return False
    if bits == 4 and qt.shape[1] % 2:
        return False
    if spec.granularity == "group":
        return spec.group_size % (32 if bits == 4 else 16) == 0
    return spec.granularity == "tensor" or (spec.granularity == "channel" and spec.axis in (0, -2))


def supports_call(qt: QuantizedTensor, x: torch.Tensor, bits: int, table: bool = False) -> bool:
    """CUDA input of a float dtype, no autograd, a supported spec (affine ``bits``-bit codes,
    or with ``table`` 4-bit codes indexing a table), Triton importable."""
    return (
        x.device.type == "cuda"
        and x.dtype in ACT_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through Triton
        and (table_spec_supported(qt, bits) if table else spec_supported(qt, bits))
        and triton_available()
    )


def cached_linear(
    name: str, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype; the layout cached as ``name``."""
    entry = cache.get(name)
    version = weight_version(qt)
    if entry is None or entry[0] != version or entry[1].packed.device != x.device:
        entry = (version, execution_layout(qt).to(x.device), qt)
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
