"""Fast CPU weight-only kernels (AVX2 + FMA): ``cpu_int4`` for 4-bit group-wise affine specs
(w4g128, w4g64, w4g128-sym) and ``cpu_int8`` for 8-bit per-channel or group-wise ones (w8).

Why a small compiled kernel: on AVX2 CPUs without AVX-512 (this project's machines) torch's own
int4 CPU op ``_weight_int4pack_mm_for_cpu`` is several times *slower* than fp32 ``F.linear``
(measured in benchmarks/results/kernels.md), and ``_weight_int8pack_mm`` was 4-30x slower than
fp32 here; a ``torch.compile``d fused dequant-GEMV was also slower (tried, not kept).

Per output row and group the kernel unpacks codes to fp32 in AVX2 registers and accumulates
against the activations:

    y[m, n] = sum_g s[n, g] * sum_{k in g} c[n, k] x[m, k]  -  sum_g s[n, g] zc[n, g] xs[m, g]

where ``c`` are the codes as the kernel reads them (int4: the stored unsigned codes, ``code -
qmin``; int8: the stored byte - 128), ``zc`` the zero-point in those units (int4: ``z - qmin``,
8 for signed symmetric; int8: ``z - qmin - 128``, 0 for signed symmetric) and ``xs[m, g]`` the
activation sum of group g. Weights never exist as fp32, so M=1 moves 8x (int4) or 4x (int8)
fewer bytes than fp32. For M > ``GEMV_MAX_ROWS`` it dequantizes the weight (whole up to 16 MiB
of fp32, else blocks of rows; stored column order) into a reused fp32 buffer (C++) and
multiplies with torch's fp32 GEMM (compute-bound there; fp32 speed minus the dequant).

The kernels are plain C++ (AVX2 intrinsics + OpenMP) compiled on first use (a second or two)
and called through ctypes (:mod:`lowbit.kernels.native`). If they cannot be built, they report
themselves unsupported (the reason is in a RuntimeWarning) and dispatch falls back to the
reference.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.kernels.native import NativeLibrary
from lowbit.quant.maps import qrange, symmetric_zero
from lowbit.tensor import QuantizedTensor

GEMV_MAX_ROWS = 32  # above this many activation rows, dequantize + F.linear is faster here
# Above GEMV_MAX_ROWS the weight is dequantized this many rows at a time (4 MiB at K=4096)
# into one reused scratch buffer, each block multiplied by torch's fp32 GEMM: a whole fp32 copy
# of a 4096x4096 weight (64 MiB, page-faulted in on every call) cost more than the GEMM itself
# (one-off timings, 1 thread: M=128 111 ms vs 59 ms blocked, fp32 F.linear 67 ms); much smaller
# blocks starve the GEMM (K=11008, M=2048: 95 rows 3.8 s, 256 rows 2.8 s, fp32 2.8 s).
# benchmarks/weight_kernels.py measures the result.
DEQUANT_BLOCK_ROWS = 256
# A weight of at most this many elements (16 MiB in fp32) is dequantized whole: one GEMM with the
# bias fused (on MiniLM's 384/1536-wide layers at M=288 the split into a 256-row and a short
# block, the copies into the output and the separate bias add cost 10-15%, one-off timing;
# taller blocks for LLM-size layers were not better at M=128).
DEQUANT_WHOLE_MAX = 1 << 22
_scratch_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements, reused per thread."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch_local.buf = torch.empty(numel, dtype=torch.float32, device="cpu")
    return buf

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One 32-code chunk of lowbit's canonical bytes as fp32 vectors c[0..3], 8 codes each.
// int4 (16 bytes): byte j holds code 2j (low nibble) and 2j+1 (high nibble); widening each
// 16-bit pair to a 32-bit lane puts codes 4l..4l+3 in lane l's nibbles 0..3, so c[j] holds
// codes {4l + j : l = 0..7} -- the activations of each 32-chunk are permuted the same way
// (cheap: M x K, against N x K weights that stay as stored). Shifts and masks instead of byte
// shuffles keep the unpacking off the shuffle port.
// int8 (32 bytes): the stored bytes read as signed, byte ^ 0x80 = code - qmin - 128, in order
// (a symmetric int8 weight then has zero 0: no correction term to cancel against).
template <bool INT8>
static inline void unpack(const uint8_t* p, __m256 c[4]) {
  if constexpr (INT8) {
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int q = 0; q < 4; ++q)
      c[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_xor_si128(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)), flip)));
  } else {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    c[0] = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
    c[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 4), mask));
    c[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 8), mask));
    c[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 12));
  }
}

constexpr int64_t CODES = 32;  // codes per chunk
template <bool INT8> constexpr int64_t CHUNK_BYTES = INT8 ? 32 : 16;

// Rows m0..m0+MT of OUT for output channel n; X [M, K], XS [M, G] group sums of X; prow the
// channel's K * bits / 8 bytes; S, ZS [N, G].
template <bool INT8, int MT>
static inline void row_tile(const float* X, const float* XS, const uint8_t* prow,
                            const float* S, const float* ZS, const float* B, float* OUT,
                            int64_t m0, int64_t n, int64_t K, int64_t G, int64_t N) {
  // Independent accumulators per row: one FMA chain would wait on the FMA latency (4 cycles)
  // at every step; with fewer rows each row gets more chains.
  constexpr int A = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const int64_t group = K / G, chunks = group / CODES;
  __m256 tot[MT];
  float corr[MT];
  for (int t = 0; t < MT; ++t) { tot[t] = _mm256_setzero_ps(); corr[t] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT][A];
    for (int t = 0; t < MT; ++t)
      for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t k0 = g * group + i * CODES;
      __m256 c[4];
      unpack<INT8>(prow + CHUNK_BYTES<INT8> * (g * chunks + i), c);
      for (int t = 0; t < MT; ++t) {
        const float* x = X + (m0 + t) * K + k0;
        for (int q = 0; q < 4; ++q)
          acc[t][q % A] = _mm256_fmadd_ps(c[q], _mm256_loadu_ps(x + 8 * q), acc[t][q % A]);
      }
    }
    const __m256 sv = _mm256_set1_ps(S[n * G + g]);
    const float zs = ZS[n * G + g];
    for (int t = 0; t < MT; ++t) {
      __m256 sum = acc[t][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[t][a]);
      tot[t] = _mm256_fmadd_ps(sum, sv, tot[t]);
      corr[t] += zs * XS[(m0 + t) * G + g];
    }
  }
  const float bias = B ? B[n] : 0.f;
  for (int t = 0; t < MT; ++t) OUT[(m0 + t) * N + n] = (hsum(tot[t]) - corr[t]) + bias;
}

// M = 1, output channels n and n + 1 together: each activation load feeds both rows' FMAs.
template <bool INT8>
static inline void pair_tile(const float* X, const float* XS, const uint8_t* prow,
                             int64_t row_bytes, const float* S, const float* ZS,
                             const float* B, float* OUT, int64_t n, int64_t K, int64_t G) {
  const int64_t group = K / G, chunks = group / CODES;
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  float corr0 = 0.f, corr1 = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t off = CHUNK_BYTES<INT8> * (g * chunks + i);
      const float* x = X + g * group + i * CODES;
      __m256 c[4], d[4];
      // two streams at once defeat the hardware prefetcher on large weights: help it
      const char* ahead = reinterpret_cast<const char*>(prow + off + 32 * CHUNK_BYTES<INT8>);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + row_bytes, _MM_HINT_T0);
      unpack<INT8>(prow + off, c);
      unpack<INT8>(prow + row_bytes + off, d);
      __m256 xv = _mm256_loadu_ps(x);
      a0 = _mm256_fmadd_ps(c[0], xv, a0); b0 = _mm256_fmadd_ps(d[0], xv, b0);
      xv = _mm256_loadu_ps(x + 8);
      a1 = _mm256_fmadd_ps(c[1], xv, a1); b1 = _mm256_fmadd_ps(d[1], xv, b1);
      xv = _mm256_loadu_ps(x + 16);
      a0 = _mm256_fmadd_ps(c[2], xv, a0); b0 = _mm256_fmadd_ps(d[2], xv, b0);
      xv = _mm256_loadu_ps(x + 24);
      a1 = _mm256_fmadd_ps(c[3], xv, a1); b1 = _mm256_fmadd_ps(d[3], xv, b1);
    }
    const float xs = XS[g];
    tot0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(S[n * G + g]), tot0);
    tot1 = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), _mm256_set1_ps(S[(n + 1) * G + g]), tot1);
    corr0 += ZS[n * G + g] * xs;
    corr1 += ZS[(n + 1) * G + g] * xs;
  }
  OUT[n] = (hsum(tot0) - corr0) + (B ? B[n] : 0.f);
  OUT[n + 1] = (hsum(tot1) - corr1) + (B ? B[n + 1] : 0.f);
}

// OUT [M, N] = X [M, K] @ W^T (+ B [N] if not null); W from P [N, K * bits / 8], S, ZS [N, G].
template <bool INT8>
static int gemv(const float* X, const uint8_t* P, const float* S, const float* ZS,
                const float* B, float* OUT, int64_t M, int64_t K, int64_t N, int64_t G,
                int threads) {
  const int64_t group = K / G, row_bytes = INT8 ? K : K / 2;
  float* XS = static_cast<float*>(malloc(sizeof(float) * M * G));
  if (!XS) return 1;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += X[m * K + g * group + k];
      XS[m * G + g] = s;
    }
  float* XP = nullptr;  // int4: X with each 32-chunk in the unpack order (see unpack)
  if constexpr (!INT8) {
    XP = static_cast<float*>(malloc(sizeof(float) * M * K));
    if (!XP) { free(XS); return 1; }
    for (int64_t i = 0; i < M * K; i += 32)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 8; ++l) XP[i + 8 * j + l] = X[i + 4 * l + j];
    X = XP;
  }
  if (M == 1) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
    for (int64_t p = 0; p < N / 2; ++p)
      pair_tile<INT8>(X, XS, P + 2 * p * row_bytes, row_bytes, S, ZS, B, OUT, 2 * p, K, G);
    if (N % 2) row_tile<INT8, 1>(X, XS, P + (N - 1) * row_bytes, S, ZS, B, OUT, 0, N - 1, K, G, N);
    free(XS);
    free(XP);
    return 0;
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* prow = P + n * row_bytes;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) row_tile<INT8, 4>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, N);
    switch (M - m0) {
      case 3: row_tile<INT8, 3>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, N); break;
      case 2: row_tile<INT8, 2>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, N); break;
      case 1: row_tile<INT8, 1>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, N); break;
      default: break;
    }
  }
  free(XS);
  free(XP);
  return 0;
}

// c[q] lane l holds code 4l + q (unpack<false>'s order) -> o[j] lane i holds code 8j + i: a
// 4 x 8 transpose in registers.
static inline void natural_order(const __m256 c[4], __m256 o[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
  const __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  o[0] = _mm256_permute2f128_ps(u0, u1, 0x20);
  o[1] = _mm256_permute2f128_ps(u2, u3, 0x20);
  o[2] = _mm256_permute2f128_ps(u0, u1, 0x31);
  o[3] = _mm256_permute2f128_ps(u2, u3, 0x31);
}

// fp32 weights W [N, K] = code * s - zs in the stored column order.
template <bool INT8>
static void dequant(const uint8_t* P, const float* S, const float* ZS, float* W, int64_t N,
                    int64_t K, int64_t G, int threads) {
  const int64_t group = K / G, chunks = group / CODES, row_bytes = INT8 ? K : K / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const __m256 sv = _mm256_set1_ps(S[n * G + g]), zv = _mm256_set1_ps(ZS[n * G + g]);
      for (int64_t i = 0; i < chunks; ++i) {
        __m256 c[4], v[4];
        unpack<INT8>(P + n * row_bytes + CHUNK_BYTES<INT8> * (g * chunks + i), c);
        if constexpr (!INT8) natural_order(c, v);
        const __m256* w = INT8 ? c : v;
        float* o = W + n * K + g * group + i * CODES;
        for (int q = 0; q < 4; ++q)
          _mm256_storeu_ps(o + 8 * q, _mm256_fmsub_ps(w[q], sv, zv));
      }
    }
  }
}

extern "C" int int4_gemv(const float* X, const uint8_t* P, const float* S, const float* ZS,
                         const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                         int64_t G, int threads) {
  return gemv<false>(X, P, S, ZS, B, OUT, M, K, N, G, threads);
}
extern "C" int int8_gemv(const float* X, const uint8_t* P, const float* S, const float* ZS,
                         const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                         int64_t G, int threads) {
  return gemv<true>(X, P, S, ZS, B, OUT, M, K, N, G, threads);
}
extern "C" void int4_dequant(const uint8_t* P, const float* S, const float* ZS, float* W,
                             int64_t N, int64_t K, int64_t G, int threads) {
  dequant<false>(P, S, ZS, W, N, K, G, threads);
}
extern "C" void int8_dequant(const uint8_t* P, const float* S, const float* ZS, float* W,
                             int64_t N, int64_t K, int64_t G, int threads) {
  dequant<true>(P, S, ZS, W, N, K, G, threads);
}
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_LIB = NativeLibrary("cpu_int4", _SOURCE, _FLAGS, {
    **{f"int{b}_gemv": ([_PTR] * 6 + [_I64] * 4 + [_INT], _INT) for b in (4, 8)},
    **{f"int{b}_dequant": ([_PTR] * 4 + [_I64] * 3 + [_INT], None) for b in (4, 8)},
}, fallback="the reference kernel")


def extension() -> ctypes.CDLL | None:
    """The compiled kernel library, or None if it cannot be built here (``_LIB.error`` says
    why; warned once)."""
    return _LIB.get()


def spec_supported(qt: QuantizedTensor) -> bool:
    """Weight-only 2-D affine specs, 4-bit group-wise or 8-bit per-channel / group-wise, whose
    groups (or rows) are a multiple of 32 wide."""
    spec = qt.spec
    if spec.act is not None or spec.kind != "affine" or len(qt.shape) != 2 or qt.g_idx is not None:
        return False
    if spec.bits == 4:
        return spec.granularity == "group" and spec.group_size % 32 == 0
    if spec.bits == 8:
        if spec.granularity == "group":
            return spec.group_size % 32 == 0
        return spec.granularity == "channel" and spec.axis in (0, -2) and qt.shape[1] % 32 == 0
    return False


def _supports(qt: QuantizedTensor, x: torch.Tensor, bits: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through ctypes
        and qt.qdata.device.type == "cpu"
        and qt.spec.bits == bits
        and x.dim() >= 1 and x.shape[-1] == qt.shape[1]
        and spec_supported(qt)
        and extension() is not None
    )


def scale_and_zero_code(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[N, G]`` scales and zero-points in units of the stored unsigned codes
    ``u = code - qmin``: ``W = scale * (u - zero_code)`` per group (G = 1 per channel)."""
    spec = qt.spec
    qmin, _ = qrange(spec)
    n_out = qt.shape[0]
    scale = qt.scale.float().reshape(n_out, -1).contiguous()
    if spec.has_zero_point:
        zero_code = qt.zero_point.float().reshape(n_out, -1) - qmin
    else:
        zero_code = torch.full_like(scale, float(symmetric_zero(spec) - qmin))
    return scale, zero_code


def _execution_layout(
    qt: QuantizedTensor, cache: dict
) -> tuple[tuple[torch.Tensor, ...], tuple[int, int, int]]:
    """(tensors, their data pointers): lowbit's canonical code bytes, scale fp32 [N, G] and
    scale * zero fp32 [N, G] in the kernel's code units; the two small float tensors are built
    once and held in ``cache``. Whoever keeps a pointer must keep the tensors.

    The codes are read as stored (no repacked copy of the weight is kept: the int4 GEMV
    permutes the activations instead); 8-bit codes as ``byte - 128``, so
    a symmetric int8 weight has zero 0 and its correction term vanishes.
    """
    bits = qt.spec.bits
    name = f"cpu_int{bits}"
    entry = cache.get(name)
    version = weight_version(qt)
    if entry is None or entry[0] != version:
        scale, zero_code = scale_and_zero_code(qt)
        if bits == 8:
            zero_code = zero_code - 128
        tensors = (qt.qdata.contiguous(), scale, (scale * zero_code).contiguous())
        # the tensors keep the pointers valid; the ints save per-call ctypes work
        entry = (version, tensors, tuple(t.data_ptr() for t in tensors), qt)
        cache[name] = entry
    return entry[1], entry[2]


def bind_cpu_linear(
    qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] float32 -> x @ W^T + b [..., N]`` for a 4-bit group-wise or 8-bit W
    ``[N, K]``, with the weight's pointers and shapes resolved once (and again after an in-place
    change of a stored tensor)."""
    lib = extension()
    bits = qt.spec.bits
    n_out, k_in = qt.shape
    n_groups = qt.scale.numel() // n_out
    row_bytes = k_in * bits // 8
    gemv, dequant = getattr(lib, f"int{bits}_gemv"), getattr(lib, f"int{bits}_dequant")
    if bias is not None and bias.numel() != n_out:
        raise ValueError(f"bias has {bias.numel()} elements; the weight has {n_out} outputs")
    b = None if bias is None else bias.float().contiguous()  # the same tensor if already so
    b_ptr = None if b is None else b.data_ptr()
    get_threads = torch.get_num_threads
    layout: list = [None, *_execution_layout(qt, cache)]  # [versions, held, pointers]
    # The kernel reads the codes in place but copies of the scale and zero-point: follow their
    # in-place edits outside inference_mode (inference tensors have no version counter: after
    # editing one under inference_mode, clear the module's kernel cache).
    tracked = [t for t in (qt.scale, qt.zero_point) if t is not None and not t.is_inference()]
    layout[0] = [t._version for t in tracked]

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != k_in or x.dtype is not torch.float32 or not x.is_cpu:
            raise ValueError(f"cpu_int{bits}: x {x.dtype} {tuple(x.shape)} on {x.device} for "
                             f"weight {tuple(qt.shape)}; needs float32 CPU [..., {k_in}]")
        versions = [t._version for t in tracked]
        if versions != layout[0]:
            layout[:] = [versions, *_execution_layout(qt, cache)]
        packed, scale, scale_zero = layout[2]
        x2 = x.reshape(-1, k_in)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        if m > GEMV_MAX_ROWS:
            rows = n_out if n_out * k_in <= DEQUANT_WHOLE_MAX else DEQUANT_BLOCK_ROWS
            block = _scratch(rows * k_in)
            if rows == n_out:  # one block: the whole weight, bias fused into the GEMM
                w = block[: n_out * k_in].view(n_out, k_in)
                dequant(packed, scale, scale_zero, w.data_ptr(), n_out, k_in, n_groups,
                        get_threads())
                return F.linear(x2, w, b).reshape(*x.shape[:-1], n_out)
            y = torch.empty(m, n_out, dtype=torch.float32, device="cpu")
            for n0 in range(0, n_out, rows):
                nb = min(rows, n_out - n0)
                w = block[: nb * k_in].view(nb, k_in)
                dequant(packed + n0 * row_bytes, scale + 4 * n0 * n_groups,
                        scale_zero + 4 * n0 * n_groups, w.data_ptr(), nb, k_in, n_groups,
                        get_threads())
                y[:, n0:n0 + nb] = x2 @ w.T
            if b is not None:
                y += b
            return y.reshape(*x.shape[:-1], n_out)
        y = torch.empty(*x.shape[:-1], n_out, dtype=torch.float32, device="cpu")
        status = gemv(x2.data_ptr(), packed, scale, scale_zero, b_ptr, y.data_ptr(), m, k_in,
                      n_out, n_groups, get_threads())
        if status:
            raise MemoryError(f"cpu_int{bits}: could not allocate {m}x{n_groups} group sums")
        return y

    run.held = (layout, b)  # the tensors behind the pointers live as long as run
    return run


def cpu_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] float32 @ W^T`` for a 4-bit group-wise or 8-bit W ``[N, K]``; ``[..., N]``."""
    return bind_cpu_linear(qt, bias, cache)(x)


for _bits in (4, 8):
    register_kernel(Kernel(f"cpu_int{_bits}", cpu_linear,
                           lambda qt, x, b=_bits: _supports(qt, x, b), priority=10,
                           bind=bind_cpu_linear))
