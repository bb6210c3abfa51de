"""``cpu_w4a8``: 4-bit group-wise weights x dynamic int8 activations, integer dot products on
AVX2 CPUs in one C++ call (the ``w4a8`` preset; the idea of llama.cpp's Q4 x Q8 dot products).

Per token (or per tensor) the activations get lowbit's symmetric dynamic Q (the same C code as
:mod:`lowbit.kernels.cpu_w8a8`: ``s = absmax / qmax``, codes ``clamp(round_half_even(x / s))``),
then per output channel n and weight group g::

    y[m, n] = sx[m] * sum_g s[n, g] * (sum_{k in g} u[n, k] qx[m, k]  -  zc[n, g] qs[m, g])

with ``u`` the stored unsigned 4-bit codes, ``zc`` the zero-point in code units (8 for signed
symmetric int4) and ``qs`` the group sums of the activation codes. The inner sums are exact
integers: ``vpmaddubsw`` multiplies unsigned codes (<= 15) by int8 activations (|q| <= 128), so
a pair sum stays below 3,840 and two of them (a k octet) below 7,680: no int16 saturation, and
``vpmaddwd`` widens to int32 once per octet. That is about 3 instructions per 64 multiply-adds
of a tile, against 4 per 32 for exact int8 x int8 (``vpmaddwd``) and 1 FMA per 8 for fp32.
The float sums over groups (fused multiply-adds) differ from the float64 oracle by float32
rounding of ``s * dot`` and ``s * zc * qs``, so the error scales with ``s (|u| + |zc|) |qx|``
rather than ``|W| |x|``: like every zero-point kernel that subtracts the correction after the
sums (``cpu_int4`` too), an output whose exact value is 0 may come out as a few ulps of those.

The weight is repacked once (cached, never saved): panels of 8 output channels, each k octet of
a panel 32 bytes (``[channel][4]`` bytes, low nibbles k 0-3, high nibbles k 4-7), so one load,
two masks and one shift give the operands of two ``vpmaddubsw`` against broadcast activation
quads. Specs: affine 4-bit weights (signed or unsigned, symmetric or with an integer or float
zero-point), groups a multiple of 8 wide dividing K (or per channel) and at most ``MAX_GROUP``
wide, dynamic signed symmetric int activations of at most 8 bits per token or tensor, float32
scale, clip ratio 1, round to nearest.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.kernels.cpu_avx2 import group_order, scale_and_zero_code, whole_groups
from lowbit.kernels.cpu_w8a8 import (
    ACTIVATION_Q_SOURCE,
    HALF_DTYPES,
    bind_activation_kernel,
    struct_call,
)
from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.kernels.native import NativeLibrary
from lowbit.quant.maps import qrange
from lowbit.tensor import QuantizedTensor

# Group sums exact: |sum u * qx| <= 15 * 128 * group < 2**31 and the float32 activation group sums
# |sum qx| <= 128 * group <= 2**24.
MAX_GROUP = 1 << 17

_SOURCE = ACTIVATION_Q_SOURCE + r"""
// Tile of MR activation rows x NP panels: T[(t * NP + j) * 8 + c] = sum over groups of
// s * dot - s * zc * qs for channel 8 (p0 + j) + c (the caller multiplies by sx). WP, SP, SZP
// start at panel p0; panel strides K / 8 * 32 bytes and G * 8 floats.
template <int MR, int NP>
static inline void tile(const int8_t* xq, int64_t K, const uint8_t* wp, const float* sp,
                        const float* szp, const float* qs, int64_t G, float* T) {
  const int64_t octets = K / 8, per_group = octets / G;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 tot[MR][NP];
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NP; ++j) tot[t][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MR][NP];
    for (int t = 0; t < MR; ++t)
      for (int j = 0; j < NP; ++j) acc[t][j] = _mm256_setzero_si256();
    for (int64_t o = g * per_group; o < (g + 1) * per_group; ++o) {
      __m256i lo[NP], hi[NP];
      for (int j = 0; j < NP; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wp + (j * octets + o) * 32));
        lo[j] = _mm256_and_si256(v, mask);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      }
      for (int t = 0; t < MR; ++t) {
        int32_t q0, q1;
        memcpy(&q0, xq + t * K + 8 * o, 4);
        memcpy(&q1, xq + t * K + 8 * o + 4, 4);
        const __m256i a0 = _mm256_set1_epi32(q0), a1 = _mm256_set1_epi32(q1);
        for (int j = 0; j < NP; ++j) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], a0),
                                             _mm256_maddubs_epi16(hi[j], a1));
          acc[t][j] = _mm256_add_epi32(acc[t][j], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int j = 0; j < NP; ++j) {
      const __m256 s = _mm256_loadu_ps(sp + (j * G + g) * 8);
      const __m256 sz = _mm256_loadu_ps(szp + (j * G + g) * 8);
      for (int t = 0; t < MR; ++t) {
        tot[t][j] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[t][j]), tot[t][j]);
        tot[t][j] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(qs[t * G + g]), tot[t][j]);
      }
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NP; ++j) _mm256_storeu_ps(T + (t * NP + j) * 8, tot[t][j]);
}

constexpr int TILE_ROWS = 4;

// mr (<= TILE_ROWS) activation rows against NP panels. Two panels at once: each activation
// broadcast feeds both (one-off A/B against one panel, 1 thread: 5-15% faster at M=16-2048 on
// 4096x4096, 4-9% on 384x1024).
template <int NP>
static void tile_rows(int mr, const int8_t* xq, int64_t K, const uint8_t* wp, const float* sp,
                      const float* szp, const float* qs, int64_t G, float* T) {
  switch (mr) {
    case 4: tile<4, NP>(xq, K, wp, sp, szp, qs, G, T); break;
    case 3: tile<3, NP>(xq, K, wp, sp, szp, qs, G, T); break;
    case 2: tile<2, NP>(xq, K, wp, sp, szp, qs, G, T); break;
    default: tile<1, NP>(xq, K, wp, sp, szp, qs, G, T); break;
  }
}

// OUT [M, N] = sx[m] * (sum over groups, see tile) (+ B[n]). WP: the unsigned 4-bit codes of
// W [N, K] in panels of 8 channels, per panel and k octet o 32 bytes: byte c * 4 + i holds
// code(8p + c, 8o + i) in its low nibble and code(8p + c, 8o + 4 + i) in its high nibble. SP,
// SZP [ceil(N / 8)][G][8]: scale and scale * zero_code per channel and group (zero padded).
// K a multiple of 8 * G. Returns 1 for non-finite X, 2 for an allocation failure.
static int w4a8_linear(const float* X, const uint8_t* WP, const float* SP, const float* SZP,
                       const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                       int64_t G, int per_token, float qmax, float qmin, int threads) {
  const int64_t group = K / G, panels = (N + 7) / 8;
  int8_t* XQ = (int8_t*)malloc(M * K);
  float* SX = (float*)malloc(sizeof(float) * M);
  float* QS = (float*)malloc(sizeof(float) * M * G);
  if (!XQ || !SX || !QS) { free(XQ); free(SX); free(QS); return 2; }
  if (quantize_rows(X, M, K, K, per_token, qmax, qmin, XQ, SX)) {
    free(XQ); free(SX); free(QS);
    return 1;
  }
  for (int64_t i = 0; i < M * G; ++i) {  // exact: |sum| <= 128 * group <= 2**24 (MAX_GROUP)
    int32_t sum = 0;
    for (int64_t k = 0; k < group; ++k) sum += XQ[i * group + k];
    QS[i] = (float)sum;
  }
  // Chunks of M_CHUNK rows keep a chunk's activation codes in cache while every panel passes.
  const int64_t M_CHUNK = 64;
  const int MR = M < TILE_ROWS ? (int)M : TILE_ROWS;
  for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
    const int64_t mc_end = mc + M_CHUNK < M ? mc + M_CHUNK : M;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
    for (int64_t pp = 0; pp < (panels + 1) / 2; ++pp) {
      const int64_t p = 2 * pp;
      const int np = p + 1 < panels ? 2 : 1;
      alignas(32) float T[TILE_ROWS * 16];
      const uint8_t* wp = WP + p * (K / 8) * 32;
      for (int64_t m0 = mc; m0 < mc_end; m0 += MR) {
        const int mr = mc_end - m0 < MR ? (int)(mc_end - m0) : MR;
        (np == 2 ? tile_rows<2> : tile_rows<1>)(mr, XQ + m0 * K, K, wp, SP + p * G * 8,
                                                 SZP + p * G * 8, QS + m0 * G, G, T);
        for (int t = 0; t < mr; ++t) {
          const float sx = SX[m0 + t];
          float* out = OUT + (m0 + t) * N;
          for (int64_t c = 0; c < 8 * np && 8 * p + c < N; ++c)
            out[8 * p + c] = T[t * 8 * np + c] * sx + (B ? B[8 * p + c] : 0.f);
        }
      }
    }
  }
  free(XQ); free(SX); free(QS);
  return 0;
}

// A call's arguments besides the activations, built once per weight (see cpu_avx2's GemvArgs).
struct W4A8Args {
  const uint8_t* WP;
  const float *SP, *SZP, *B;
  int64_t K, N, G;
  int per_token;
  float qmax, qmin;
};

extern "C" int w4a8_call(const float* X, float* OUT, int64_t M, const W4A8Args* A, int threads) {
  return w4a8_linear(X, A->WP, A->SP, A->SZP, A->B, OUT, M, A->K, A->N, A->G, A->per_token,
                     A->qmax, A->qmin, threads);
}
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_PTR, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_LIB = NativeLibrary("cpu_w4a8", _SOURCE, _FLAGS, {
    "w4a8_call": ([_PTR, _PTR, _I64, _PTR, _I32], _I32),
}, fallback="the act-reference kernel")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (the reason warned once)."""
    return _LIB.get()


def spec_supported(qt: QuantizedTensor) -> bool:
    """4-bit affine weights in groups (a multiple of 8 dividing K; a GPTQ act-order group index
    allowed, see :func:`lowbit.kernels.cpu_avx2.whole_groups`) or per channel, with dynamic
    signed symmetric int activations of at most 8 bits (see the module docstring)."""
    spec, act = qt.spec, qt.spec.act
    if act is None or spec.kind != "affine" or spec.bits != 4 or len(qt.shape) != 2:
        return False
    if not whole_groups(qt) or act.kind != "affine":
        return False
    k_in = qt.shape[1]
    if spec.granularity == "group":
        group = spec.group_size
        layout_ok = group % 8 == 0 and k_in % group == 0
    else:
        group = k_in
        layout_ok = spec.granularity == "channel" and spec.axis in (0, -2) and k_in % 8 == 0
    return (
        layout_ok
        and group <= MAX_GROUP
        and act.dynamic and act.signed and act.symmetric and act.bits <= 8
        and act.granularity in ("token", "tensor")
        and act.scale_dtype == "float32" and act.clip_ratio == 1.0 and act.rounding == "nearest"
    )


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, *HALF_DTYPES)
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through ctypes
        and qt.qdata.device.type == "cpu"
        and x.dim() >= 1 and x.shape[-1] == qt.shape[1]
        and spec_supported(qt)
        and library() is not None
    )


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[N, K]`` (K a multiple of 8) -> the kernel's panels
    ``[ceil(N/8), K/8, 32]`` uint8: byte ``[p, o, 4c + i]`` = code ``(8p+c, 8o+i)`` in the low
    nibble, ``(8p+c, 8o+4+i)`` in the high one; zero padded to whole panels."""
    n, k = codes.shape
    panels = -(-n // 8)
    c = F.pad(codes.to(torch.uint8), (0, 0, 0, 8 * panels - n))
    c = c.reshape(panels, 8, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [p, o, c, i, half]
    return (c[..., 0] | (c[..., 1] << 4)).reshape(panels, k // 8, 32).contiguous()


def _panel_floats(v: torch.Tensor) -> torch.Tensor:
    """``[N, G]`` -> ``[ceil(N/8), G, 8]`` float32, zero padded."""
    n, g = v.shape
    panels = -(-n // 8)
    return F.pad(v.float(), (0, 0, 0, 8 * panels - n)).reshape(panels, 8, g).transpose(1, 2) \
        .contiguous()


def _prepared(qt: QuantizedTensor, cache: dict) -> tuple[tuple, tuple[int, int, int]]:
    """(tensors, pointers): packed codes, panel scales and scale * zero-code; rebuilt when a
    stored tensor changes (held in ``cache``, never saved)."""
    version = weight_version(qt)
    entry = cache.get("cpu_w4a8")
    if entry is None or entry[0] != version:
        scale, zero_code = scale_and_zero_code(qt)
        codes, order = qt.codes(), group_order(qt)
        if order is not None:  # each group's columns together, as bind_activation_kernel feeds x
            codes = codes[:, order]
        held = (pack_weight(codes), _panel_floats(scale), _panel_floats(scale * zero_code))
        entry = cache["cpu_w4a8"] = (version, (*held, qt), tuple(t.data_ptr() for t in held))
    return entry[1], entry[2]


class W4A8Args(ctypes.Structure):
    """The C ``W4A8Args``: a weight's pointers, sizes and activation grid, passed by address."""

    _fields_ = [("WP", _PTR), ("SP", _PTR), ("SZP", _PTR), ("B", _PTR), ("K", _I64),
                ("N", _I64), ("G", _I64), ("per_token", _I32), ("qmax", _F32), ("qmin", _F32)]


def bind_w4a8(qt: QuantizedTensor, bias: torch.Tensor | None,
              cache: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] -> [..., N]`` with everything but the activations resolved once."""
    entry = library().w4a8_call
    n_out, k_in = qt.shape
    act = qt.spec.act
    qmin, qmax = (float(v) for v in qrange(act))
    n_groups = qt.scale.numel() // n_out

    def make_call(prepared: tuple, b_ptr: int | None) -> Callable[[int, int, int], int]:
        packed, scale, scale_zero = prepared
        return struct_call(entry, W4A8Args(packed, scale, scale_zero, b_ptr, k_in, n_out,
                                           n_groups, int(act.granularity == "token"), qmax,
                                           qmin))

    return bind_activation_kernel("cpu_w4a8", qt, bias, cache, _prepared, make_call)


def cpu_w4a8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x @ W^T + b`` for a 4-bit weight with dynamic int8 activations (module docstring)."""
    return bind_w4a8(qt, bias, cache)(x)


# Below cpu_w8a8 (20): a symmetric per-channel int4 weight, which both take, keeps the kernel
# that is bit-identical to the exact integer reference.
register_kernel(Kernel("cpu_w4a8", cpu_w4a8_linear, _supports, priority=15, bind=bind_w4a8))
