"""``cpu_w8a8``: exact dynamic W8A8 (and W7A8 / W8A7) on AVX2 CPUs in one C++ call.

At decode sizes the fbgemm path (``int8-fbgemm``) is dominated by its ~15 torch ops per call
(activation range, scale, divide, round, clamp, the pos/neg split, fbgemm's own quantization,
the scale-out), several times the integer work of a 384-wide layer. This kernel does the whole
call in C++: per row (token) or per tensor, the activation scale and codes exactly as lowbit's Q
computes them (``s = absmax / qmax`` in float32, 1 for an all-zero row; codes =
``clamp(round_half_even(x / s))``), the integer dot products with the centered int8 weight
(sign-extended to int16, ``vpmaddwd`` pair sums into int32: exact, no saturation), then
``float(acc) * sx``, ``* sw``, ``+ bias`` as separate float32 roundings (compiled with
``-ffp-contract=off``): bit-identical to ``int8-reference`` while ``|acc| < 2**31``.

Above ``MAX_ROWS`` rows (presets fbgemm runs in one pass: above ``ONE_PASS_MAX_ROWS`` rows and
``ONE_PASS_MAX_WORK`` multiply-adds) it hands over to ``int8-fbgemm``, which equals the
reference while each pass's ``|acc| < 2**24`` (see :mod:`lowbit.kernels.int8`). Specs: signed
symmetric int weights (per channel or tensor) and dynamic signed symmetric int activations (per
token or tensor) with float32 scales, clip ratio 1 and round-to-nearest (the presets w8a8,
w7a8 and w8a7), and K < 2**17 (int32 sums cannot overflow).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from lowbit.kernels import int8
from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.kernels.native import NativeLibrary
from lowbit.quant.maps import check_finite, qrange
from lowbit.tensor import QuantizedTensor

# Measured here (4096x4096, 1 thread): faster than int8-fbgemm's exact two passes up to M=512
# (vpmaddwd does 16 MACs per instruction; fbgemm's vpmaddubsw 32, but twice).
MAX_ROWS = 512
# Presets fbgemm runs in one exact pass (w7a8, w8a7) are 2x faster there once the call is big
# enough to hide its per-call overhead: hand over above this many rows and multiply-adds.
ONE_PASS_MAX_ROWS, ONE_PASS_MAX_WORK = 4, 1 << 26

_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// Codes of X [rows, K] with one scale over all of it; returns 1 if X has NaN/Inf.
static int quantize(const float* X, int64_t rows, int64_t K, float qmax, float qmin,
                    int16_t* XQ, float* scale) {
  float absmax = 0.f;
  for (int64_t i = 0; i < rows * K; ++i) {
    if (!isfinite(X[i])) return 1;
    const float a = fabsf(X[i]);
    absmax = a > absmax ? a : absmax;
  }
  float s = absmax / qmax;
  if (!(s > 0.f)) s = 1.f;
  if (s < 1.40129846e-45f) s = 1.40129846e-45f;  // lowbit's _store_scale: never 0
  for (int64_t i = 0; i < rows * K; ++i) {
    float v = nearbyintf(X[i] / s);
    v = v < qmin ? qmin : (v > qmax ? qmax : v);
    XQ[i] = (int16_t)v;
  }
  *scale = s;
  return 0;
}

static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Integer dots of MT code rows with NR weight rows (stride K) from w:
// ACC[r * 4 + t] = sum_k XQ[t, k] * w[r * K + k]. Each weight load feeds MT products and each
// activation load NR.
template <int MT, int NR>
static inline void dots(const int16_t* XQ, const int8_t* w, int64_t K, int32_t* ACC) {
  __m256i acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + r * K + k)));
    for (int t = 0; t < MT; ++t) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(XQ + t * K + k));
      for (int r = 0; r < NR; ++r)
        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(xv, wv[r]));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) {
      int32_t s = hsum_epi32(acc[r][t]);
      for (int64_t j = k; j < K; ++j) s += (int32_t)XQ[t * K + j] * (int32_t)w[r * K + j];
      ACC[r * 4 + t] = s;
    }
}

template <int NR>
static inline void tile(const int16_t* xq, const int8_t* w, int64_t K, int64_t rows,
                        int32_t* acc) {
  switch (rows) {
    case 4: dots<4, NR>(xq, w, K, acc); break;
    case 3: dots<3, NR>(xq, w, K, acc); break;
    case 2: dots<2, NR>(xq, w, K, acc); break;
    default: dots<1, NR>(xq, w, K, acc); break;
  }
}

// OUT [M, N] = (float(acc) * sx[m]) * sw[n] (+ B[n]); W [N, K] centered int8 codes; SW [N] or
// [1] (sw_per_channel 0); per_token 0: one activation scale for all rows. Returns 1 for
// non-finite X, 2 for an allocation failure.
extern "C" int w8a8_linear(const float* X, const int8_t* W, const float* SW, int sw_per_channel,
                           const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                           int per_token, float qmax, float qmin, int threads) {
  int16_t* XQ = (int16_t*)malloc(sizeof(int16_t) * M * K);
  float* SX = (float*)malloc(sizeof(float) * M);
  if (!XQ || !SX) { free(XQ); free(SX); return 2; }
  int bad = 0;
  if (per_token) {
    for (int64_t m = 0; m < M && !bad; ++m) bad = quantize(X + m * K, 1, K, qmax, qmin,
                                                           XQ + m * K, SX + m);
  } else {
    bad = quantize(X, M, K, qmax, qmin, XQ, SX);
    for (int64_t m = 1; m < M; ++m) SX[m] = SX[0];
  }
  if (bad) { free(XQ); free(SX); return 1; }
  // Blocks of NB weight rows (L2-sized for K = 4096) against tiles of 4 activation rows
  // (L1-sized): the weights stream from memory once, the activations once per block.
  const int64_t NB = 64;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
  for (int64_t nb = 0; nb < N; nb += NB) {
    const int64_t n_end = nb + NB < N ? nb + NB : N;
    int32_t acc[8];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t rows = M - m0 < 4 ? M - m0 : 4;
      const int16_t* xq = XQ + m0 * K;
      for (int64_t n = nb; n < n_end; n += 2) {
        const int64_t nr = n + 1 < n_end ? 2 : 1;
        if (nr == 2) tile<2>(xq, W + n * K, K, rows, acc);
        else tile<1>(xq, W + n * K, K, rows, acc);
        for (int64_t r = 0; r < nr; ++r) {
          const float sw = SW[sw_per_channel ? n + r : 0];
          for (int64_t t = 0; t < rows; ++t) {
            float y = (float)acc[r * 4 + t] * SX[m0 + t];
            y = y * sw;
            if (B) y = y + B[n + r];
            OUT[(m0 + t) * N + n + r] = y;
          }
        }
      }
    }
  }
  free(XQ);
  free(SX);
  return 0;
}
"""
# -ffp-contract=off: no fused multiply-adds, so each float32 step rounds like torch's ops.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
          "-std=c++17"]

_PTR, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_LIB = NativeLibrary("cpu_w8a8", _SOURCE, _FLAGS, {
    "w8a8_linear": ([_PTR, _PTR, _PTR, _I32, _PTR, _PTR, _I64, _I64, _I64, _I32, _F32, _F32,
                     _I32], _I32),
}, fallback="int8-fbgemm")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (the reason warned once)."""
    return _LIB.get()


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    act = qt.spec.act
    return (
        int8._fast_supports(qt, x)
        and act.dynamic
        and act.scale_dtype == "float32"
        and act.clip_ratio == 1.0
        and qt.shape[1] * 128 * 128 < 2**31
        and library() is not None
    )


def _prepared(qt: QuantizedTensor, cache: dict) -> tuple[tuple, tuple[int, int, int]]:
    """(tensors, pointers): the centered int8 weight ``[N, K]`` and float32 scales ``[N]`` (or
    ``[1]``), and whether the scales are per channel; rebuilt when a stored tensor changes (held
    in ``cache``, never saved). Whoever keeps a pointer must keep the tensors."""
    version = weight_version(qt)
    entry = cache.get("cpu_w8a8")
    if entry is None or entry[0] != version:
        weight = int8._centered_weight(qt).to(torch.int8).contiguous()
        sw = int8._weight_scale(qt).reshape(-1).contiguous()
        entry = cache["cpu_w8a8"] = (version, (weight, sw, qt),
                                     (weight.data_ptr(), sw.data_ptr(), int(sw.numel() > 1)))
    return entry[1], entry[2]


def bind_w8a8(qt: QuantizedTensor, bias: torch.Tensor | None,
              cache: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] -> [..., N]`` with everything but the activations resolved once."""
    run_call = library().w8a8_linear
    b = None if bias is None else bias.float().contiguous()
    b_ptr = None if b is None else b.data_ptr()
    act = qt.spec.act
    qmin, qmax = (float(v) for v in qrange(act))
    per_token = int(act.granularity == "token")
    n_out, k_in = qt.shape
    get_threads = torch.get_num_threads
    one_pass = int8.one_pass_shift(qt.spec) is not None

    if bias is not None and bias.numel() != n_out:
        raise ValueError(f"bias has {bias.numel()} elements; the weight has {n_out} outputs")
    # the weight copy follows in-place edits of the stored tensors (inference tensors have no
    # version counter and cannot be edited)
    tracked = [t for t in qt.stored_tensors().values() if not t.is_inference()]
    state = [[t._version for t in tracked], *_prepared(qt, cache)]  # versions, held, pointers

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != k_in or x.dtype is not torch.float32 or not x.is_cpu:
            raise ValueError(f"cpu_w8a8: x {x.dtype} {tuple(x.shape)} on {x.device} for "
                             f"weight {tuple(qt.shape)}; needs float32 CPU [..., {k_in}]")
        x2 = x.reshape(-1, k_in)
        m = x2.shape[0]
        if one_pass:
            handover = m > ONE_PASS_MAX_ROWS and m * k_in * n_out >= ONE_PASS_MAX_WORK
        else:
            handover = m > MAX_ROWS
        if handover or m == 0:
            return int8.int8_fbgemm_linear(x, qt, bias, cache)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        versions = [t._version for t in tracked]
        if versions != state[0]:
            state[:] = [versions, *_prepared(qt, cache)]
        weight, sw, per_channel = state[2]
        y = torch.empty(*x.shape[:-1], n_out)
        status = run_call(x2.data_ptr(), weight, sw, per_channel, b_ptr, y.data_ptr(), m, k_in,
                          n_out, per_token, qmax, qmin, get_threads())
        if status == 1:
            check_finite(x2, "activation")
        if status:
            raise MemoryError(f"cpu_w8a8: could not allocate {m}x{k_in} activation codes")
        return y

    run.held = (state, b)  # the tensors behind the pointers live as long as run
    return run


def cpu_w8a8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Exact dynamic W8A8 ``x @ W^T + b`` (see the module docstring)."""
    return bind_w8a8(qt, bias, cache)(x)


register_kernel(Kernel("cpu_w8a8", cpu_w8a8_linear, _supports, priority=20, bind=bind_w8a8))
