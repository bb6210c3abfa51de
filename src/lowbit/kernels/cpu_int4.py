"""Fast CPU weight-only kernel for 4-bit group-wise affine specs (w4g128, w4g64, w4g128-sym).

Why a small compiled kernel: on AVX2 CPUs without AVX-512 (this project's machines) torch's own
int4 CPU op ``_weight_int4pack_mm_for_cpu`` is several times *slower* than fp32 ``F.linear``
(measured in benchmarks/results/kernels.md); ``_weight_int8pack_mm`` and a ``torch.compile``d
fused dequant-GEMV were also slower than fp32 when tried during development (not kept).

The kernel reads lowbit's canonical packed bytes directly (no repack) and, per output row and
group, unpacks nibbles to fp32 in AVX2 registers and accumulates against the activations:

    y[m, n] = sum_g s[n, g] * sum_{k in g} u[n, k] x[m, k]  -  sum_g s[n, g] zc[n, g] xs[m, g]

where ``u`` are the stored unsigned codes, ``zc`` the zero-point in code units (``z - qmin``;
8 for signed symmetric int4) and ``xs[m, g]`` the activation sum of group g. Weights never exist
as fp32, so M=1 moves ~8x fewer bytes than fp32. For M > ``GEMV_MAX_ROWS`` it dequantizes into
an fp32 buffer (C++) and calls ``F.linear`` (compute-bound there; fp32 speed minus the dequant).

The kernel is plain C++ (AVX2 intrinsics + OpenMP, no torch headers) compiled on first use with
the system C++ compiler (a second or two) into ``~/.cache/lowbit/kernels/`` (``LOWBIT_CACHE``
overrides), keyed by a hash of source and flags, and called through ctypes (which releases the
GIL). If it cannot be built, the kernel reports itself unsupported (the reason is in a
RuntimeWarning) and dispatch falls back to the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.quant.maps import qrange
from lowbit.tensor import QuantizedTensor

NAME = "cpu_int4"
GEMV_MAX_ROWS = 32  # above this many activation rows, dequantize + F.linear is faster here

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

// Execution layout: each 16-byte chunk holds 32 consecutive codes, codes 0..15 in the low
// nibbles and 16..31 in the high nibbles, so the activations are read contiguously.
// Rows m0..m0+MT of out for output channel n; X [M, K], XS [M, G] group sums of X.
template <int MT>
static inline void row_tile(const float* X, const float* XS, const uint8_t* prow,
                            const float* S, const float* ZS, const float* B, float* OUT,
                            int64_t m0, int64_t n, int64_t K, int64_t G, int64_t hg, int64_t N) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256 tot[MT];
  float corr[MT];
  for (int t = 0; t < MT; ++t) { tot[t] = _mm256_setzero_ps(); corr[t] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t j = g * hg; j < (g + 1) * hg; j += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(prow + j));
      __m128i lo = _mm_and_si128(b, mask);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      __m256 c2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      __m256 c3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      for (int t = 0; t < MT; ++t) {
        const float* x = X + (m0 + t) * K + 2 * j;
        acc[t] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(x), acc[t]);
        acc[t] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x + 8), acc[t]);
        acc[t] = _mm256_fmadd_ps(c2, _mm256_loadu_ps(x + 16), acc[t]);
        acc[t] = _mm256_fmadd_ps(c3, _mm256_loadu_ps(x + 24), acc[t]);
      }
    }
    const __m256 sv = _mm256_set1_ps(S[n * G + g]);
    const float zs = ZS[n * G + g];
    for (int t = 0; t < MT; ++t) {
      tot[t] = _mm256_fmadd_ps(acc[t], sv, tot[t]);
      corr[t] += zs * XS[(m0 + t) * G + g];
    }
  }
  const float bias = B ? B[n] : 0.f;
  for (int t = 0; t < MT; ++t) OUT[(m0 + t) * N + n] = (hsum(tot[t]) - corr[t]) + bias;
}

// OUT [M, N] = X [M, K] @ W^T (+ B [N] if not null); W from P [N, K/2], S and ZS [N, G].
extern "C" int int4_gemv(const float* X, const uint8_t* P, const float* S, const float* ZS,
                         const float* B, float* OUT, int64_t M, int64_t K, int64_t N,
                         int64_t G, int threads) {
  const int64_t group = K / G, hg = group / 2, H = K / 2;
  float* XS = static_cast<float*>(malloc(sizeof(float) * M * G));
  if (!XS) return 1;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += X[m * K + g * group + k];
      XS[m * G + g] = s;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* prow = P + n * H;
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) row_tile<4>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, hg, N);
    switch (M - m0) {
      case 3: row_tile<3>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, hg, N); break;
      case 2: row_tile<2>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, hg, N); break;
      case 1: row_tile<1>(X, XS, prow, S, ZS, B, OUT, m0, n, K, G, hg, N); break;
      default: break;
    }
  }
  free(XS);
  return 0;
}

// fp32 weights W [N, K] = code * s - zs, from the execution layout.
extern "C" void int4_dequant(const uint8_t* P, const float* S, const float* ZS, float* W,
                             int64_t N, int64_t K, int64_t G, int threads) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const int64_t hg = K / G / 2, H = K / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const __m256 sv = _mm256_set1_ps(S[n * G + g]), zv = _mm256_set1_ps(ZS[n * G + g]);
      for (int64_t j = g * hg; j < (g + 1) * hg; j += 16) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(P + n * H + j));
        __m128i lo = _mm_and_si128(b, mask);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        float* o = W + n * K + 2 * j;
        for (int q = 0; q < 4; ++q) {
          __m256 u = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[q]));
          _mm256_storeu_ps(o + 8 * q, _mm256_fmsub_ps(u, sv, zv));
        }
      }
    }
  }
}
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_state: dict[str, object] = {}
_lock = threading.Lock()


def _cpu_has_avx2() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except AttributeError:  # very old torch
        return False


def _build_library() -> ctypes.CDLL:
    """Compile ``_SOURCE`` once per source/flags hash into the user cache; load it."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    library = cache_dir / "kernels" / f"cpu_int4_{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            src = Path(tmp) / "cpu_int4.cpp"
            src.write_text(_SOURCE)
            out = Path(tmp) / library.name
            run = subprocess.run(
                [compiler, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True
            )
            if run.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[:300]}")
            os.replace(out, library)  # atomic: concurrent builders agree on one file
    # The library brings the system's OpenMP runtime beside torch's own: keep its idle threads
    # asleep rather than spinning, so the two runtimes don't fight over the cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(str(library))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.int4_gemv.argtypes = [ptr] * 6 + [i64] * 4 + [ctypes.c_int]
    lib.int4_gemv.restype = ctypes.c_int
    lib.int4_dequant.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int]
    lib.int4_dequant.restype = None
    return lib


def extension() -> ctypes.CDLL | None:
    """The compiled kernel library, or None if it cannot be built here (reason warned once)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if not _cpu_has_avx2():
            _state["error"] = "CPU lacks AVX2/FMA"
        else:
            try:
                module = _build_library()
            except Exception as exc:  # compiler missing, OpenMP missing, ...
                _state["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                warnings.warn(
                    f"lowbit cpu_int4 kernel unavailable ({_state['error']}); using the "
                    "reference kernel",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _state["module"] = module
        return module


def spec_supported(qt: QuantizedTensor) -> bool:
    """4-bit affine group-wise weight-only 2-D specs with groups a multiple of 32."""
    spec = qt.spec
    return (
        spec.act is None
        and spec.kind == "affine"
        and spec.bits == 4
        and spec.granularity == "group"
        and spec.group_size % 32 == 0
        and len(qt.shape) == 2
        and qt.g_idx is None
    )


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through ctypes
        and qt.qdata.device.type == "cpu"
        and spec_supported(qt)
        and extension() is not None
    )


def _execution_layout(qt: QuantizedTensor, cache: dict) -> tuple[int, int, int]:
    """Data pointers of (repacked uint8 [N, K/2], scale fp32 [N, G], scale*zero fp32 [N, G]),
    tensors built once and held in ``cache``.

    Repacked: each 16-byte chunk holds 32 consecutive codes, codes 0..15 in the low nibbles and
    16..31 in the high nibbles (lowbit's canonical bytes interleave even/odd codes instead).
    """
    entry = cache.get(NAME)
    if entry is None or entry[0] is not qt.qdata:
        spec = qt.spec
        qmin, _ = qrange(spec)
        scale = qt.scale.float().contiguous()
        if spec.has_zero_point:
            zero_code = qt.zero_point.float() - qmin
        else:
            zero_code = torch.full_like(scale, float((0 if spec.signed else 8) - qmin))
        n_out, k_in = qt.shape
        codes = torch.stack([qt.qdata & 15, qt.qdata >> 4], dim=-1).reshape(n_out, -1, 2, 16)
        repacked = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n_out, k_in // 2)
        tensors = (repacked.contiguous(), scale, (scale * zero_code).contiguous())
        # the tensors keep the pointers valid; the ints save per-call ctypes work
        entry = (qt.qdata, tensors, tuple(t.data_ptr() for t in tensors))
        cache[NAME] = entry
    return entry[2]


def cpu_int4_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] float32 @ W^T`` for a 4-bit group-wise W ``[N, K]``; returns ``[..., N]``."""
    lib = extension()
    packed, scale, scale_zero = _execution_layout(qt, cache)  # pointers
    n_out, k_in = qt.shape
    n_groups = k_in // qt.spec.group_size
    threads = torch.get_num_threads()
    x2 = (x if x.dim() == 2 else x.reshape(-1, k_in)).contiguous()
    m = x2.shape[0]
    if m > GEMV_MAX_ROWS:
        w = torch.empty(n_out, k_in)
        lib.int4_dequant(
            packed, scale, scale_zero, w.data_ptr(),
            n_out, k_in, n_groups, threads,
        )
        y = F.linear(x2, w, None if bias is None else bias.float())
    else:
        y = torch.empty(m, n_out)
        b = None if bias is None else bias.float().contiguous()
        status = lib.int4_gemv(
            x2.data_ptr(), packed, scale, scale_zero,
            None if b is None else b.data_ptr(), y.data_ptr(), m, k_in, n_out, n_groups,
            threads,
        )
        if status:
            raise MemoryError(f"cpu_int4: could not allocate {m}x{n_groups} group sums")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


KERNEL = register_kernel(Kernel(NAME, cpu_int4_linear, _supports, priority=10))
