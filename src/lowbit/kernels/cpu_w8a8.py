"""``cpu_w8a8``: exact dynamic W8A8 (and W7A8 / W8A7) on AVX2 CPUs in one C++ call.

The whole call in C++: per row (token) or per tensor, the activation scale and codes exactly as
lowbit's Q computes them (``s = absmax / qmax`` in float32, 1 for an all-zero row; codes =
``clamp(round_half_even(x / s))``), the integer dot products with the centered int8 weight
(both sides int16, ``vpmaddwd`` pair sums into int32: exact, no saturation, whatever the bit
widths), then ``float(acc) * sx``, ``* sw``, ``+ bias`` as separate float32 roundings (compiled
with ``-ffp-contract=off``): bit-identical to ``int8-reference`` while ``|acc| < 2**31``.

The weight is repacked once (cached, never saved) into panels of 8 output channels whose k pairs
are 16 contiguous bytes: one load and one sign extension give the 8-channel x 2-k operand of
``vpmaddwd`` against a broadcast activation pair, so tiles of 4 tokens x 16 channels keep eight
int32 accumulators in registers and need no horizontal sums. Without VNNI this is the fastest
exact int8 x int8 path measured here (benchmarks/results/int8_linear.md): about twice
fbgemm's exact two passes at every M. Presets with a 7-bit side (w7a8, w8a7) let fbgemm run
one exact ``vpmaddubsw`` pass (3 instructions per 32 multiply-adds against ``vpmaddwd``'s 4),
which wins on big calls: above ``ONE_PASS_MAX_ROWS`` rows and ``ONE_PASS_MAX_WORK``
multiply-adds they go to ``int8-fbgemm``, which equals the reference while the shifted sums
of its pass stay below ``2**24`` in magnitude (see :mod:`lowbit.kernels.int8`; beyond, outputs
differ in the last float32 bits). Specs: signed symmetric int weights (per
channel or tensor) and dynamic signed symmetric int activations (per token or tensor) with
float32 scales, clip ratio 1 and round-to-nearest (the presets w8a8, w7a8 and w8a7), and
K < 2**17 (int32 sums cannot overflow).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.kernels import int8
from lowbit.kernels.cpu_avx2 import ACTIVATION_DTYPES, group_order, whole_groups
from lowbit.kernels.dispatch import Kernel, register_kernel, weight_version
from lowbit.kernels.native import NativeLibrary, output_allocator, step_rows
from lowbit.quant.maps import check_finite, qrange
from lowbit.tensor import QuantizedTensor

# int8_linear.md (1 thread): fbgemm's one exact pass is 0-25% faster than this kernel from
# M=16 on the 4096/11008 shapes, slower below (its ~15 torch ops per call).
ONE_PASS_MAX_ROWS, ONE_PASS_MAX_WORK = 4, 1 << 26

# Activation Q shared with cpu_w4a8: lowbit's symmetric dynamic Q per row (token) or per tensor.
ACTIVATION_Q_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Codes of X [rows, K] (one scale for all of it) into XQ [rows, KP] (zero padded; Code int16_t
// or int8_t); returns 1 if X has NaN/Inf.
template <typename Code>
static int quantize(const float* X, int64_t rows, int64_t K, int64_t KP, float qmax, float qmin,
                    Code* XQ, float* scale) {
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  float absmax = 0.f;
  int nonfinite = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_NEQ_UQ));
    }
    for (; k < K; ++k) {
      if (!isfinite(x[k])) nonfinite = 1;
      const float a = fabsf(x[k]);
      absmax = a > absmax ? a : absmax;
    }
  }
  if (nonfinite || _mm256_movemask_ps(bad)) return 1;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (int i = 0; i < 8; ++i) absmax = lanes[i] > absmax ? lanes[i] : absmax;
  float s = absmax / qmax;
  if (!(s > 0.f)) s = 1.f;
  if (s < 1.40129846e-45f) s = 1.40129846e-45f;  // lowbit's _store_scale: never 0
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * K;
    Code* q = XQ + r * KP;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 a = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256 b = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k + 8), vs),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
      b = _mm256_min_ps(_mm256_max_ps(b, lo), hi);
      const __m256i p = _mm256_permute4x64_epi64(
          _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), 0xD8);
      if constexpr (sizeof(Code) == 2) {
        _mm256_storeu_si256((__m256i*)(q + k), p);
      } else {
        _mm_storeu_si128((__m128i*)(q + k), _mm_packs_epi16(_mm256_castsi256_si128(p),
                                                            _mm256_extracti128_si256(p, 1)));
      }
    }
    for (; k < K; ++k) {
      float v = nearbyintf(x[k] / s);
      v = v < qmin ? qmin : (v > qmax ? qmax : v);
      q[k] = (Code)v;
    }
    for (; k < KP; ++k) q[k] = 0;
  }
  *scale = s;
  return 0;
}

// Codes XQ [M, KP] and scales SX [M] of X [M, K]: one scale per row (per_token) or for all.
template <typename Code>
static int quantize_rows(const float* X, int64_t M, int64_t K, int64_t KP, int per_token,
                         float qmax, float qmin, Code* XQ, float* SX) {
  if (!per_token) {
    if (quantize(X, M, K, KP, qmax, qmin, XQ, SX)) return 1;
    for (int64_t m = 1; m < M; ++m) SX[m] = SX[0];
    return 0;
  }
  for (int64_t m = 0; m < M; ++m)
    if (quantize(X + m * K, 1, K, KP, qmax, qmin, XQ + m * KP, SX + m)) return 1;
  return 0;
}
"""

_SOURCE = ACTIVATION_Q_SOURCE + r"""
// C[t * 24 + j * 8 + c] = sum_k XQ[t, k] * W[8 (p + j) + c, k] for MR activation rows and NP
// panels of the packed weight (panel stride KH * 16 bytes, see w8a8_linear).
template <int MR, int NP>
static inline void dots(const int16_t* xq, int64_t KP, const int8_t* wp, int64_t KH,
                        int32_t* C) {
  __m256i c[MR][NP];
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NP; ++j) c[t][j] = _mm256_setzero_si256();
  for (int64_t h = 0; h < KH; ++h) {
    __m256i w[NP];
    for (int j = 0; j < NP; ++j)
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + (j * KH + h) * 16)));
    for (int t = 0; t < MR; ++t) {
      int32_t pair;
      memcpy(&pair, xq + t * KP + 2 * h, 4);
      const __m256i a = _mm256_set1_epi32(pair);
      for (int j = 0; j < NP; ++j) c[t][j] = _mm256_add_epi32(c[t][j], _mm256_madd_epi16(a, w[j]));
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int j = 0; j < NP; ++j) _mm256_storeu_si256((__m256i*)(C + t * 24 + j * 8), c[t][j]);
}

// Tiles up to 4 rows x 2 panels (above 3 rows) or 3 rows x 3 panels.
static void tile(int mr, int np, const int16_t* xq, int64_t KP, const int8_t* wp, int64_t KH,
                 int32_t* C) {
  switch (mr * 4 + np) {
    case 4 * 4 + 2: dots<4, 2>(xq, KP, wp, KH, C); break;
    case 4 * 4 + 1: dots<4, 1>(xq, KP, wp, KH, C); break;
    case 3 * 4 + 3: dots<3, 3>(xq, KP, wp, KH, C); break;
    case 3 * 4 + 2: dots<3, 2>(xq, KP, wp, KH, C); break;
    case 3 * 4 + 1: dots<3, 1>(xq, KP, wp, KH, C); break;
    case 2 * 4 + 3: dots<2, 3>(xq, KP, wp, KH, C); break;
    case 2 * 4 + 2: dots<2, 2>(xq, KP, wp, KH, C); break;
    case 2 * 4 + 1: dots<2, 1>(xq, KP, wp, KH, C); break;
    case 1 * 4 + 3: dots<1, 3>(xq, KP, wp, KH, C); break;
    case 1 * 4 + 2: dots<1, 2>(xq, KP, wp, KH, C); break;
    default: dots<1, 1>(xq, KP, wp, KH, C); break;
  }
}

// OUT [M, N] = (float(acc) * sx[m]) * sw[n] (+ B[n]). WP: the centered int8 weight [N, K] in
// panels of 8 output rows, each k pair of a panel 16 contiguous bytes:
// WP[((n / 8) * KH + k / 2) * 16 + (n % 8) * 2 + k % 2] = W[n, k], KH = ceil(K / 2), zero padded
// to whole panels and pairs. SW [N] or [1] (sw_per_channel 0); per_token 0: one activation scale
// for all rows. Returns 1 for non-finite X, 2 for an allocation failure.
static int w8a8_linear(const float* X, const int8_t* WP, const float* SW, int sw_per_channel,
                       const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                       int per_token, float qmax, float qmin, int threads) {
  const int64_t KP = (K + 1) / 2 * 2, KH = KP / 2, panels = (N + 7) / 8;
  int16_t* XQ = (int16_t*)malloc(sizeof(int16_t) * M * KP);
  float* SX = (float*)malloc(sizeof(float) * M);
  if (!XQ || !SX) { free(XQ); free(SX); return 2; }
  if (quantize_rows(X, M, K, KP, per_token, qmax, qmin, XQ, SX)) {
    free(XQ);
    free(SX);
    return 1;
  }
  // Below 4 rows, 3-panel tiles (more independent loads in flight for the memory-bound GEMV);
  // from 4 rows 4 x 2 tiles (8 accumulators: 12 make gcc spill). Chunks of M_CHUNK rows keep
  // the activation codes of a chunk in cache while every panel group passes over them.
  const int64_t M_CHUNK = 128;
  const int MR = M < 4 ? (int)M : 4, NP = M < 4 ? 3 : 2;
  const int64_t groups = (panels + NP - 1) / NP;
  for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
    const int64_t mc_end = mc + M_CHUNK < M ? mc + M_CHUNK : M;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t p0 = g * NP;
      const int np = panels - p0 < NP ? (int)(panels - p0) : NP;
      alignas(32) int32_t C[4 * 24];
      for (int64_t m0 = mc; m0 < mc_end; m0 += MR) {
        const int mr = mc_end - m0 < MR ? (int)(mc_end - m0) : MR;
        tile(mr, np, XQ + m0 * KP, KP, WP + p0 * KH * 16, KH, C);
        for (int t = 0; t < mr; ++t) {
          const __m256 sx = _mm256_set1_ps(SX[m0 + t]);
          float* out = OUT + (m0 + t) * N;
          for (int j = 0; j < np; ++j) {
            const int64_t n0 = 8 * (p0 + j);
            const int32_t* acc = C + t * 24 + j * 8;
            if (n0 + 8 <= N) {
              const __m256i a = _mm256_load_si256((const __m256i*)acc);
              const __m256 sw = sw_per_channel ? _mm256_loadu_ps(SW + n0) : _mm256_set1_ps(SW[0]);
              __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), sx), sw);
              if (B) y = _mm256_add_ps(y, _mm256_loadu_ps(B + n0));
              _mm256_storeu_ps(out + n0, y);
            } else {
              for (int64_t c = 0; n0 + c < N; ++c) {
                float y = (float)acc[c] * SX[m0 + t];
                y = y * SW[sw_per_channel ? n0 + c : 0];
                if (B) y = y + B[n0 + c];
                out[n0 + c] = y;
              }
            }
          }
        }
      }
    }
  }
  free(XQ);
  free(SX);
  return 0;
}

// A call's arguments besides the activations, built once per weight (see cpu_avx2's GemvArgs).
struct W8A8Args {
  const int8_t* WP;
  const float *SW, *B;
  int64_t K, N;
  int sw_per_channel, per_token;
  float qmax, qmin;
};

extern "C" int w8a8_call(const float* X, float* OUT, int64_t M, const W8A8Args* A, int threads) {
  return w8a8_linear(X, A->WP, A->SW, A->sw_per_channel, A->B, OUT, M, A->K, A->N,
                     A->per_token, A->qmax, A->qmin, threads);
}
"""
# -ffp-contract=off: no fused multiply-adds, so each float32 step rounds like torch's ops.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
          "-std=c++17"]

_PTR, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_LIB = NativeLibrary("cpu_w8a8", _SOURCE, _FLAGS, {
    "w8a8_call": ([_PTR, _PTR, _I64, _PTR, _I32], _I32),
}, fallback="int8-fbgemm")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (the reason warned once)."""
    return _LIB.get()


# Activations the integer-activation kernels take: float32, and half types quantized from their
# float32 values (exactly what the oracles do with them) with the result rounded to x's dtype
HALF_DTYPES = tuple(d for d in ACTIVATION_DTYPES if d is not torch.float32)


def as_float32_probe(x: torch.Tensor) -> torch.Tensor:
    """``x`` for the float32-only support checks, which read device, dtype and shape: a
    half-precision x as a float32 zero expanded to its shape (no copy)."""
    if x.dtype in HALF_DTYPES:
        return torch.zeros((), dtype=torch.float32, device=x.device).expand(x.shape)
    return x


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    act = qt.spec.act
    return (
        int8._fast_supports(qt, as_float32_probe(x))
        and act.dynamic
        and act.scale_dtype == "float32"
        and act.clip_ratio == 1.0
        and qt.shape[1] * 128 * 128 < 2**31
        and library() is not None
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Centered int8 codes ``[N, K]`` -> the kernel's panels ``[ceil(N/8), ceil(K/2), 8, 2]``
    (``[p, h, c, e]`` holds ``W[8p + c, 2h + e]``), zero padded."""
    n, k = weight.shape
    panels, pairs = -(-n // 8), -(-k // 2)
    padded = F.pad(weight.to(torch.int8), (0, 2 * pairs - k, 0, 8 * panels - n))
    return padded.reshape(panels, 8, pairs, 2).permute(0, 2, 1, 3).contiguous()


def _prepared(qt: QuantizedTensor, cache: dict) -> tuple[tuple, tuple[int, int, int]]:
    """(tensors, pointers): the packed int8 weight (:func:`pack_weight`) and float32 scales
    ``[N]`` (or ``[1]``), and whether the scales are per channel; rebuilt when a stored tensor
    changes (held in ``cache``, never saved). Whoever keeps a pointer must keep the tensors."""
    version = weight_version(qt)
    entry = cache.get("cpu_w8a8")
    if entry is None or entry[0] != version:
        weight = pack_weight(int8._centered_weight(qt))
        sw = int8._weight_scale(qt).reshape(-1).contiguous()
        entry = cache["cpu_w8a8"] = (version, (weight, sw, qt),
                                     (weight.data_ptr(), sw.data_ptr(), int(sw.numel() > 1)))
    return entry[1], entry[2]


# (x2d pointer, output pointer, rows) -> status, for one weight layout and bias
NativeCall = Callable[[int, int, int], int]
# (the prepared pointers, bias pointer or None) -> the call for them
MakeCall = Callable[[tuple, "int | None"], NativeCall]


def bind_activation_kernel(
    name: str,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    cache: dict,
    prepare: Callable[[QuantizedTensor, dict], tuple[tuple, tuple]],
    make_call: MakeCall,
    handover: Callable[[int], bool] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] float32 -> [..., N]`` through a C kernel that quantizes the activations
    itself (status 1: non-finite input, 2: allocation failure). ``prepare(qt, cache)`` gives the
    (held tensors, pointers) of the execution layout, rebuilt after in-place edits of the stored
    tensors, with the codes of a weight with a group index in :func:`group_order` (the
    activations are gathered alike); ``make_call(pointers, bias pointer)`` binds the C entry to
    them; where ``handover(rows)`` is true, fbgemm's int8 kernel answers the call instead."""
    n_out, k_in = qt.shape
    if bias is not None and bias.numel() != n_out:
        raise ValueError(f"bias has {bias.numel()} elements; the weight has {n_out} outputs")
    b = None if bias is None else bias.float().contiguous()  # the same tensor if already so
    # the layout follows in-place edits of the stored tensors outside inference_mode (inference
    # tensors have no version counter: clear the kernel cache after editing one)
    tracked = [t for t in qt.stored_tensors().values() if not t.is_inference()]
    if bias is not None and b is not bias and not bias.is_inference():
        tracked.append(bias)  # a half-precision bias: its float32 copy follows edits too
    # versions, held, pointers, column order (a group index's), the call, the bias it reads
    state: list = []

    def build(versions: list[int]) -> None:
        nonlocal b
        if b is not bias and bias is not None:
            b = bias.float().contiguous()
        held, pointers = prepare(qt, cache)
        call = make_call(pointers, None if b is None else b.data_ptr())
        if state:  # a rebuild: the new arguments into the struct that calls already read
            old = state[4]
            ctypes.memmove(ctypes.addressof(old.args), ctypes.addressof(call.args),
                           ctypes.sizeof(call.args))
            call = old
        state[:] = [versions, held, pointers, group_order(qt), call, b]

    build([t._version for t in tracked])
    float32, cpu = torch.float32, torch.device("cpu")
    allocate = output_allocator(n_out)

    def run(x: torch.Tensor) -> torch.Tensor:
        # few torch calls on the common path: see cpu_avx2's bound run
        if x.dtype is not float32 or x.shape[-1] != k_in or not x.is_cpu:
            if x.dtype in HALF_DTYPES and x.shape[-1] == k_in and x.is_cpu:
                return run(x.float()).to(x.dtype)
            raise ValueError(f"{name}: x {x.dtype} {tuple(x.shape)} on {x.device} for "
                             f"weight {tuple(qt.shape)}; needs float32 (or bfloat16 / "
                             f"float16) CPU [..., {k_in}]")
        m = x.numel() // k_in
        if m == 0:
            return torch.empty(*x.shape[:-1], n_out, dtype=float32, device=cpu)
        if handover is not None and handover(m):
            return int8.int8_fbgemm_linear(x, qt, bias, cache)
        if not current():
            return int8.act_reference_linear(x, qt, bias, {})
        y = allocate(x.shape[:-1])
        if state[3] is not None:
            x = x.reshape(m, k_in).index_select(1, state[3])
        elif not x.is_contiguous():
            x = x.contiguous()
        status = state[4](x.data_ptr(), y.data_ptr(), m)
        if status == 1:
            check_finite(x, "activation")
        if status:
            raise MemoryError(f"{name}: could not allocate {m}x{k_in} activation codes")
        return y

    def current() -> bool:
        """Whether the C kernel runs the weight as it is now (its layout rebuilt first after an
        in-place edit)."""
        if tracked:
            versions = [t._version for t in tracked]
            if versions != state[0]:
                if not whole_groups(qt):  # g_idx edited in place into uneven groups
                    return False
                build(versions)
        return True

    def raw_step(out: torch.Tensor) -> Callable[[int], int] | None:
        """As cpu_avx2's: ``x pointer -> status`` into ``out`` (status 1: non-finite input, 2:
        allocation failure; run the checked call then), resolved now; None where this weight or
        out takes another path."""
        m = step_rows(out, n_out)
        if not m or (handover is not None and handover(m)) or not current() or (
                state[3] is not None):
            return None
        return state[4].fixed(out, m, torch.get_num_threads(), state)

    run.held = state  # the tensors behind the pointers live as long as run
    run.raw_step = raw_step
    return run


def struct_call(entry: Callable, args: ctypes.Structure) -> NativeCall:
    """``(x_ptr, y_ptr, m) -> entry(x_ptr, y_ptr, m, &args, threads)``, the C entry of an
    integer-activation kernel with its constant arguments in ``args`` (kept alive by the
    call)."""
    at, get_threads = ctypes.addressof(args), torch.get_num_threads

    def call(x_ptr: int, y_ptr: int, m: int) -> int:
        return entry(x_ptr, y_ptr, m, at, get_threads())

    def fixed(out: torch.Tensor, m: int, threads: int, held: object) -> Callable[[int], int]:
        """``x_ptr -> status`` into ``out`` for ``m`` rows on ``threads`` threads, keeping
        ``args``, ``out`` and ``held`` (what the arguments point to) alive: a default argument,
        free to pass."""
        out_at = out.data_ptr()
        return lambda x_ptr, _keep=(args, out, held): entry(x_ptr, out_at, m, at, threads)

    call.args, call.fixed = args, fixed
    return call


class W8A8Args(ctypes.Structure):
    """The C ``W8A8Args``: a weight's pointers, sizes and activation grid, passed by address."""

    _fields_ = [("WP", _PTR), ("SW", _PTR), ("B", _PTR), ("K", _I64), ("N", _I64),
                ("sw_per_channel", _I32), ("per_token", _I32), ("qmax", _F32), ("qmin", _F32)]


def bind_w8a8(qt: QuantizedTensor, bias: torch.Tensor | None,
              cache: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] -> [..., N]`` with everything but the activations resolved once."""
    entry = library().w8a8_call
    act = qt.spec.act
    qmin, qmax = (float(v) for v in qrange(act))
    n_out, k_in = qt.shape

    def make_call(prepared: tuple, b_ptr: int | None) -> NativeCall:
        weight, sw, per_channel = prepared
        return struct_call(entry, W8A8Args(weight, sw, b_ptr, k_in, n_out, per_channel,
                                           int(act.granularity == "token"), qmax, qmin))

    handover = None
    if int8.one_pass_shift(qt.spec) is not None:
        def handover(m: int) -> bool:
            return m > ONE_PASS_MAX_ROWS and m * k_in * n_out >= ONE_PASS_MAX_WORK

    return bind_activation_kernel("cpu_w8a8", qt, bias, cache, _prepared, make_call, handover)


def cpu_w8a8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Exact dynamic W8A8 ``x @ W^T + b`` (see the module docstring)."""
    return bind_w8a8(qt, bias, cache)(x)


register_kernel(Kernel("cpu_w8a8", cpu_w8a8_linear, _supports, priority=20, bind=bind_w8a8))
