"""Fast CPU weight-only kernels (AVX2 + FMA) for every weight format of at most 4 bits, for
5-, 6- and 8-bit integers and 8-bit floats: ``cpu_int1`` .. ``cpu_int6`` and ``cpu_int8`` run
affine codes (w4g128, w3g128, w2g64, q5_0, w8, ...), ``cpu_lut`` runs codes that index a
table of at most 16 values: nf4 and fp4 (one table per spec, times the group's absmax scale)
and k-means (one table per row or group), ``cpu_fp8`` runs fp8 e4m3fn / e5m2 codes (decoded
from their bits).
Groups (or rows, per channel) must be a multiple of 32 wide.

Why a small compiled kernel: on AVX2 CPUs without AVX-512 (this project's machines) torch's own
int4 CPU op ``_weight_int4pack_mm_for_cpu`` is several times *slower* than fp32 ``F.linear``
(measured in benchmarks/results/kernels.md), and ``_weight_int8pack_mm`` was 4-30x slower than
fp32 here; a ``torch.compile``d fused dequant-GEMV was also slower (tried, not kept). Without
these kernels the 2/3-bit, nf4, fp4, fp8 and k-means formats dequantized the whole weight on
every call, 13-100x slower than fp32 at M=1 on a 4096x4096 layer
(benchmarks/results/format_kernels.md, reference column).

Per output row and group the kernel unpacks codes to fp32 in AVX2 registers (affine: the
codes themselves; tables: byte or register shuffles; fp8: shifted into fp16 bits, converted by
F16C) and accumulates against the activations:

    y[m, n] = sum_g s[n, g] * sum_{k in g} v[n, k] x[m, k]  -  sum_g s[n, g] zc[n, g] xs[m, g]

where ``v`` are the codes as the kernel reads them (int1-6: the stored unsigned codes, ``code -
qmin``; int8: the stored byte - 128; tables: the code's entry; fp8: its value, or for e4m3 the
value / 256 with each group's sum times 256), ``zc`` the zero-point in those units (int1-6:
``z - qmin``, e.g. 8 for signed symmetric int4; int8: ``z - qmin - 128``, 0 for signed
symmetric; tables, fp8: none) and ``xs[m, g]`` the activation sum of group g. Weights never
exist as fp32, so M=1 moves 32/bits times fewer weight bytes than fp32. For M >
``GEMV_MAX_ROWS`` (8 for small weights) it dequantizes the weight (whole up to 16 MiB of fp32,
else blocks of rows; stored column order) into a reused fp32 buffer (C++) and multiplies with
torch's fp32 GEMM (compute-bound there; fp32 speed minus the dequant).

The kernels are plain C++ (AVX2 intrinsics + OpenMP) compiled on first use (a second or two)
and called through ctypes (:mod:`lowbit.kernels.native`). If they cannot be built, they report
themselves unsupported (the reason is in a RuntimeWarning) and dispatch falls back to the
reference.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.formats.packing import pack
from lowbit.kernels.dispatch import Kernel, reference_linear, register_kernel, weight_version
from lowbit.kernels.native import NativeLibrary, output_allocator, step_rows
from lowbit.quant.maps import code_values, qrange, symmetric_zero
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

# Above this many activation rows dequantize + F.linear is faster here than the GEMV; above
# GEMV_SMALL_MAX_ROWS already for weights of fewer than GEMV_SMALL_WEIGHT elements (one-off
# sweep, 1 thread, w4g128 / w8 / nf4g64 on 384x384 .. 4096x4096: at M=32 the dequantizing path
# won on every shape, 0.67-1.23x fp32 against 0.32-0.83x; at M=16 it won below ~2M elements
# and tied or lost above; at M=8 the GEMV won or tied everywhere).
GEMV_MAX_ROWS = 16
GEMV_SMALL_MAX_ROWS = 8
GEMV_SMALL_WEIGHT = 1 << 21
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
#include <string.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// What the codes are: affine integers, indices into a table (TABLE_BF16: a 4-bit table whose
// entries are bf16 values, the low 16 bits of each float zero, as fp4 e2m1's), or fp8 bit
// patterns.
enum : int { AFFINE = 0, TABLE = 1, TABLE_BF16 = 2, E4M3 = 3, E5M2 = 4 };
constexpr bool is_table(int kind) { return kind == TABLE || kind == TABLE_BF16; }

constexpr int64_t CODES = 32;  // codes per chunk: a chunk is 4 * BITS bytes of a row
template <int BITS> constexpr int64_t CHUNK_BYTES = 4 * BITS;
// Codes of at most 4 bits are read in a permuted order (see codes, code_at); the activations
// are permuted to match (cheap: M x K, against N x K weights that stay as stored).

// The integer codes of one chunk of lowbit's canonical bytes (a little-endian bit stream per
// row), c[0..3] holding 8 codes each as int32 lanes. Lane l first gets the 4 * BITS bits of
// codes 4l..4l+3 (bits [4 * BITS * l, 4 * BITS * (l + 1)) of the chunk); c[j] is then lane >>
// (BITS * j) masked, so lane l of c[j] holds code 4l + j. Shifts and masks (and one byte
// shuffle for 3 bits) keep the unpacking cheap:
//   1 bit: the chunk's 32-bit word in every lane, shifted right by 4l;
//   2, 4 bits: the chunk's bytes (16-bit pairs) widened to 32-bit lanes;
//   3 bits: 12-bit fields at byte offsets 0, 1.5, 3, ..: bytes floor(1.5 l), +1 gathered into
//   lane l by a shuffle, odd lanes shifted right by 4;
//   5 bits: 20-bit fields at byte offsets 2.5 l: bytes floor(2.5 l) .. +2 gathered (lanes 4-7
//   from the chunk's last 16 bytes, so no read passes the chunk), odd lanes shifted by 4;
//   6 bits: 24-bit fields at byte offsets 3 l, gathered alike.
template <int BITS>
static inline __m256i code_word(const uint8_t* p) {
  __m256i w;
  if constexpr (BITS == 1) {
    uint32_t word;
    memcpy(&word, p, 4);
    w = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)),
                          _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  } else if constexpr (BITS == 2) {
    w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (BITS == 3) {
    int32_t tail;
    memcpy(&tail, p + 8, 4);  // 12 bytes, never read past the chunk
    const __m128i bytes =
        _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), tail, 2);
    const __m256i both = _mm256_broadcastsi128_si256(bytes);
    const __m256i gather = _mm256_setr_epi8(
        0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,
        6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    w = _mm256_srlv_epi32(_mm256_shuffle_epi8(both, gather),
                          _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
  } else if constexpr (BITS == 5) {
    const __m256i bytes = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 4),
                                              reinterpret_cast<const __m128i*>(p));
    const __m256i gather = _mm256_setr_epi8(
        0, 1, 2, -1, 2, 3, 4, -1, 5, 6, 7, -1, 7, 8, 9, -1,
        6, 7, 8, -1, 8, 9, 10, -1, 11, 12, 13, -1, 13, 14, 15, -1);
    w = _mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, gather),
                          _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
  } else if constexpr (BITS == 6) {
    const __m256i bytes = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 8),
                                              reinterpret_cast<const __m128i*>(p));
    const __m256i gather = _mm256_setr_epi8(
        0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
        4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    w = _mm256_shuffle_epi8(bytes, gather);
  } else {
    w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  return w;
}

template <int BITS, bool IN_PLACE>
static inline void codes(const uint8_t* p, __m256i c[4]) {
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256i w = code_word<BITS>(p);
  if constexpr (IN_PLACE) {
    for (int j = 0; j < 4; ++j)
      c[j] = _mm256_and_si256(w, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * j)));
    return;
  }
  c[0] = _mm256_and_si256(w, mask);
  c[1] = _mm256_and_si256(_mm256_srli_epi32(w, BITS), mask);
  c[2] = _mm256_and_si256(_mm256_srli_epi32(w, 2 * BITS), mask);
  // 2 and 4 bits: lanes hold 4 * BITS bits, nothing above the last code to mask off
  c[3] = _mm256_srli_epi32(w, 3 * BITS);
  if constexpr (BITS == 1 || BITS == 3 || BITS == 5) c[3] = _mm256_and_si256(c[3], mask);
}

// Affine codes of at most 4 bits are decoded where they sit: field j of a lane masked in place
// is code * 2^(BITS * j), converted exactly; the GEMV multiplies it by the activation times
// 2^(-BITS * j) (see code_scale), the same product for |x| >= 2^(3 * BITS - 126) (~5e-35 at 4
// bits; below, x * 2^(-BITS * j) is subnormal and loses bits, or is flushed under FTZ), so the
// shifts that would move each code down are saved (they shared pipes with the conversions).
template <int BITS, int KIND> constexpr bool IN_PLACE_CODES = KIND == AFFINE && BITS <= 4;

// What decode's w[j] values are multiplied by to give the codes' values (1 unless in place).
template <int BITS, int KIND>
constexpr float code_scale(int j) {
  return IN_PLACE_CODES<BITS, KIND> ? 1.f / static_cast<float>(1 << (BITS * j)) : 1.f;
}

// 4-bit tables are looked up one byte plane at a time: vpshufb maps 32 codes at once to byte k
// of their entries (a 16-byte plane per k), and two rounds of byte / 16-bit unpacks assemble
// the floats: 15 instructions per 32 codes where register permutes took 25. The floats come
// out in their own order (see code_at).
template <int BITS, int KIND> constexpr bool BYTE_PLANES = is_table(KIND) && BITS == 4;

// The index within its chunk of the code whose value decode puts in lane l of w[j]: codes()'
// order (4l + j) for affine and <= 3-bit table codes; for 4-bit tables w[j] holds codes 8j +
// (0, 2, 4, 6, 1, 3, 5, 7); 8 bits: natural (8j + l).
template <int BITS, int KIND>
constexpr int code_at(int j, int l) {
  if constexpr (BYTE_PLANES<BITS, KIND>) return 8 * j + (l < 4 ? 2 * l : 2 * (l - 4) + 1);
  if constexpr (BITS < 8) return 4 * l + j;
  return 8 * j + l;
}

// A table in registers: <= 3 bits, its 8 floats in r[0]; 4 bits, its four byte planes (plane k
// = byte k of the 16 entries) each in both 128-bit halves of r[k].
struct Table {
  __m256i r[4];
};

// One chunk as fp32 vectors w[0..3], lane l of w[j] the value of code code_at(j, l).
// AFFINE: the codes themselves; 8 bits: the stored bytes read as signed, byte ^ 0x80 = code -
// qmin - 128 (a symmetric int8 weight then has zero 0).
// TABLE, TABLE_BF16: the table entry of each code.
// E5M2: the fp8 value, through the fp16 with the same bits (see below); E4M3: the value / 256
// (to_value multiplies the 256 back into each group's sum: one multiply per group, not per
// code; 15% faster at M=1, one-off; folding it into the scales instead overflowed scales above
// FLT_MAX / 256). Exact for every finite code (e4m3fn's NaN pattern would read as 480 / 256;
// weights holding inf / NaN patterns keep the reference path, see nonfinite_codes).
template <int BITS, int KIND>
static inline void decode(const uint8_t* p, const Table& tab, __m256 w[4]);

// decode's values (or sums of their products, exact: a power of two) times what gives the codes'
// values: 256 for E4M3, else nothing.
template <int KIND>
static inline __m256 to_value(__m256 v) {
  if constexpr (KIND == E4M3) return _mm256_mul_ps(v, _mm256_set1_ps(256.f));
  return v;
}

template <int BITS, int KIND>
static inline void decode(const uint8_t* p, const Table& tab, __m256 w[4]) {
  if constexpr (BITS == 8 && KIND == AFFINE) {
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (int q = 0; q < 4; ++q)
      w[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_xor_si128(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)), flip)));
  } else if constexpr (BITS == 8) {
    // through fp16 (F16C converts 8 halves per instruction): an e5m2 code is the top byte of
    // an fp16; an e4m3 code shifted left by 7 has its exponent and mantissa in fp16's fields
    // (the value / 2^8, subnormals included) and its sign at bit 14, moved to bit 15 by adding
    // that bit to itself
    for (int h = 0; h < 2; ++h) {
      const __m256i wide = _mm256_cvtepu8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      __m256i half;
      if constexpr (KIND == E5M2) {
        half = _mm256_slli_epi16(wide, 8);
      } else {
        half = _mm256_slli_epi16(wide, 7);
        half = _mm256_add_epi16(half, _mm256_and_si256(half, _mm256_set1_epi16(0x4000)));
      }
      w[2 * h] = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
      w[2 * h + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
    }
  } else if constexpr (BYTE_PLANES<BITS, KIND>) {
    // byte i of idx: code 2i (i < 16: low nibbles) or code 2(i - 16) + 1 (high nibbles)
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p)));
    const __m256i idx = _mm256_and_si256(
        _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
        _mm256_set1_epi8(0x0F));
    const __m256i b2 = _mm256_shuffle_epi8(tab.r[2], idx), b3 = _mm256_shuffle_epi8(tab.r[3], idx);
    const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    __m256i lo01, hi01;
    if constexpr (KIND == TABLE_BF16) {  // bytes 0 and 1 of every entry are zero
      lo01 = hi01 = _mm256_setzero_si256();
    } else {
      const __m256i b0 = _mm256_shuffle_epi8(tab.r[0], idx);
      const __m256i b1 = _mm256_shuffle_epi8(tab.r[1], idx);
      lo01 = _mm256_unpacklo_epi8(b0, b1);
      hi01 = _mm256_unpackhi_epi8(b0, b1);
    }
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  } else {
    __m256i c[4];
    codes<BITS, IN_PLACE_CODES<BITS, KIND>>(p, c);
    for (int q = 0; q < 4; ++q) {
      if constexpr (is_table(KIND))
        w[q] = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(tab.r[0]), c[q]);
      else
        w[q] = _mm256_cvtepi32_ps(c[q]);
    }
  }
}

// decode's w[q] alone, for codes without tables (pair_rows_tile decodes one vector at a time:
// two channels' chunks decoded whole would take 8 registers). ``word`` is chunk_word(p).
template <int BITS, int KIND>
static inline __m256i chunk_word(const uint8_t* p) {
  if constexpr (IN_PLACE_CODES<BITS, KIND> || (KIND == AFFINE && BITS < 8))
    return code_word<BITS>(p);
  return _mm256_setzero_si256();
}

template <int BITS, int KIND>
static inline __m256 decode_vector(const uint8_t* p, __m256i word, int q) {
  static_assert(!is_table(KIND), "decode_vector takes codes without tables");
  if constexpr (IN_PLACE_CODES<BITS, KIND>) {
    return _mm256_cvtepi32_ps(
        _mm256_and_si256(word, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * q))));
  } else if constexpr (KIND == AFFINE && BITS < 8) {  // 5, 6 bits: field q of each lane
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(word, BITS * q),
                                               _mm256_set1_epi32((1 << BITS) - 1)));
  } else if constexpr (KIND == AFFINE) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_xor_si128(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)),
        _mm_set1_epi8(static_cast<char>(0x80)))));
  } else {  // fp8 through fp16, as decode
    __m128i half = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)));
    if constexpr (KIND == E5M2) {
      half = _mm_slli_epi16(half, 8);
    } else {
      half = _mm_slli_epi16(half, 7);
      half = _mm_add_epi16(half, _mm_and_si128(half, _mm_set1_epi16(0x4000)));
    }
    return _mm256_cvtph_ps(half);
  }
}

// Where a weight's numbers are: P [N, K * BITS / 8] code bytes; S [N, G] scales (null: 1);
// ZS [N, G] scale * zero-point in code units (null: no zero-point term); T the tables, row n
// group g at T + n * TR + g * TG (16 floats: <= 3 bits the values, 4 bits their byte planes,
// 16 bytes each; affine: unused).
struct Weight {
  const uint8_t* P;
  const float *S, *ZS, *T;
  int64_t TR, TG;
};

template <int BITS, int KIND>
static inline void load_table(const Weight& W, int64_t n, int64_t g, Table& tab) {
  if constexpr (is_table(KIND)) {
    const float* t = W.T + n * W.TR + g * W.TG;
    if constexpr (BYTE_PLANES<BITS, KIND>) {
      for (int k = 0; k < 4; ++k)
        tab.r[k] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 4 * k)));
    } else {
      tab.r[0] = _mm256_castps_si256(_mm256_loadu_ps(t));
    }
  }
}

template <int KIND>
static inline float scale_of(const Weight& W, int64_t n, int64_t g, int64_t G) {
  if constexpr (KIND == AFFINE) return W.S[n * G + g];  // affine weights always have scales
  return W.S ? W.S[n * G + g] : 1.f;
}

static inline float zero_term(const Weight& W, const float* XS, int64_t m, int64_t n, int64_t g,
                              int64_t G) {
  return W.ZS ? W.ZS[n * G + g] * XS[m * G + g] : 0.f;
}

// Rows m0..m0+MT of OUT for output channel n; X [M, K], XS [M, G] group sums of X.
template <int BITS, int KIND, int MT>
static inline void row_tile(const float* X, const float* XS, const Weight& W, const float* B,
                            float* OUT, int64_t m0, int64_t n, int64_t K, int64_t G, int64_t N) {
  // Independent accumulators per row: one FMA chain would wait on the FMA latency (4 cycles)
  // at every step; with fewer rows each row gets more chains.
  constexpr int A = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const int64_t group = K / G, chunks = group / CODES;
  const uint8_t* prow = W.P + n * (K * BITS / 8);
  __m256 tot[MT];
  float corr[MT];
  Table tab;
  for (int t = 0; t < MT; ++t) { tot[t] = _mm256_setzero_ps(); corr[t] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT][A];
    if (g == 0 || W.TG) load_table<BITS, KIND>(W, n, g, tab);
    for (int t = 0; t < MT; ++t)
      for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t k0 = g * group + i * CODES;
      __m256 c[4];
      decode<BITS, KIND>(prow + CHUNK_BYTES<BITS> * (g * chunks + i), tab, c);
      for (int t = 0; t < MT; ++t) {
        const float* x = X + (m0 + t) * K + k0;
        for (int q = 0; q < 4; ++q)
          acc[t][q % A] = _mm256_fmadd_ps(c[q], _mm256_loadu_ps(x + 8 * q), acc[t][q % A]);
      }
    }
    const __m256 sv = _mm256_set1_ps(scale_of<KIND>(W, n, g, G));
    for (int t = 0; t < MT; ++t) {
      __m256 sum = acc[t][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[t][a]);
      tot[t] = _mm256_fmadd_ps(to_value<KIND>(sum), sv, tot[t]);
      corr[t] += zero_term(W, XS, m0 + t, n, g, G);
    }
  }
  const float bias = B ? B[n] : 0.f;
  for (int t = 0; t < MT; ++t) OUT[(m0 + t) * N + n] = (hsum(tot[t]) - corr[t]) + bias;
}

constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int64_t PAIR_ROWS_MIN_M = 6, PAIR_ROWS_MIN_K = 2048;  // see gemv
constexpr int PAIR_TILE_ROWS = 4;

// M = 1, output channels n and n + 1 together: each activation load feeds both rows' FMAs.
// SHARED: one table for every row (nf4, fp4), kept in registers once rather than twice (two
// 4-register tables beside the accumulators spill).
template <int BITS, int KIND, bool SHARED>
static inline void pair_tile(const float* X, const float* XS, const Weight& W, const float* B,
                             float* OUT, int64_t n, int64_t K, int64_t G) {
  const int64_t group = K / G, chunks = group / CODES, row_bytes = K * BITS / 8;
  const uint8_t* prow = W.P + n * row_bytes;
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  float corr0 = 0.f, corr1 = 0.f;
  Table tab0, tab1;
  for (int64_t g = 0; g < G; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    if (g == 0 || W.TG) {  // a table per spec is loaded once
      load_table<BITS, KIND>(W, n, g, tab0);
      if constexpr (!SHARED) load_table<BITS, KIND>(W, n + 1, g, tab1);
    }
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t off = CHUNK_BYTES<BITS> * (g * chunks + i);
      const float* x = X + g * group + i * CODES;
      __m256 c[4], d[4];
      // two streams at once defeat the hardware prefetcher on large weights: help it, far
      // enough ahead to cover a DRAM access (512 bytes ahead was 10-30% slower on cold
      // 4096-wide weights, one-off)
      // (integer arithmetic: the last pair's address may lie past the weight, where a
      // pointer may not point; a prefetch never faults)
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(prow + off) + PREFETCH_BYTES;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + row_bytes), _MM_HINT_T0);
      decode<BITS, KIND>(prow + off, tab0, c);
      decode<BITS, KIND>(prow + row_bytes + off, SHARED ? tab0 : tab1, d);
      __m256 xv = _mm256_loadu_ps(x);
      a0 = _mm256_fmadd_ps(c[0], xv, a0); b0 = _mm256_fmadd_ps(d[0], xv, b0);
      xv = _mm256_loadu_ps(x + 8);
      a1 = _mm256_fmadd_ps(c[1], xv, a1); b1 = _mm256_fmadd_ps(d[1], xv, b1);
      xv = _mm256_loadu_ps(x + 16);
      a0 = _mm256_fmadd_ps(c[2], xv, a0); b0 = _mm256_fmadd_ps(d[2], xv, b0);
      xv = _mm256_loadu_ps(x + 24);
      a1 = _mm256_fmadd_ps(c[3], xv, a1); b1 = _mm256_fmadd_ps(d[3], xv, b1);
    }
    const __m256 s0 = _mm256_set1_ps(scale_of<KIND>(W, n, g, G));
    const __m256 s1 = _mm256_set1_ps(scale_of<KIND>(W, n + 1, g, G));
    tot0 = _mm256_fmadd_ps(to_value<KIND>(_mm256_add_ps(a0, a1)), s0, tot0);
    tot1 = _mm256_fmadd_ps(to_value<KIND>(_mm256_add_ps(b0, b1)), s1, tot1);
    corr0 += zero_term(W, XS, 0, n, g, G);
    corr1 += zero_term(W, XS, 0, n + 1, g, G);
  }
  OUT[n] = (hsum(tot0) - corr0) + (B ? B[n] : 0.f);
  OUT[n + 1] = (hsum(tot1) - corr1) + (B ? B[n + 1] : 0.f);
}

// Output channels n and n + 1 for activation rows m0..m0+MT: each decoded vector feeds MT
// FMAs and each activation load two. Codes without tables (affine, fp8), decoded one vector at
// a time: 2 x MT accumulators, two code words, two vectors and an activation fit the 16
// registers for MT <= 4.
template <int BITS, int KIND, int MT>
static inline void pair_rows_tile(const float* X, const float* XS, const Weight& W,
                                  const float* B, float* OUT, int64_t m0, int64_t n, int64_t K,
                                  int64_t G, int64_t N) {
  const int64_t group = K / G, chunks = group / CODES, row_bytes = K * BITS / 8;
  const uint8_t* prow = W.P + n * row_bytes;
  __m256 tot0[MT], tot1[MT];
  float corr0[MT], corr1[MT];
  for (int t = 0; t < MT; ++t) {
    tot0[t] = tot1[t] = _mm256_setzero_ps();
    corr0[t] = corr1[t] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[MT], b[MT];
    for (int t = 0; t < MT; ++t) a[t] = b[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < chunks; ++i) {
      const uint8_t* p0 = prow + CHUNK_BYTES<BITS> * (g * chunks + i);
      const uint8_t* p1 = p0 + row_bytes;
      const __m256i w0 = chunk_word<BITS, KIND>(p0), w1 = chunk_word<BITS, KIND>(p1);
      const float* x = X + m0 * K + g * group + i * CODES;
      for (int q = 0; q < 4; ++q) {
        const __m256 c = decode_vector<BITS, KIND>(p0, w0, q);
        const __m256 d = decode_vector<BITS, KIND>(p1, w1, q);
        for (int t = 0; t < MT; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + t * K + 8 * q);
          a[t] = _mm256_fmadd_ps(c, xv, a[t]);
          b[t] = _mm256_fmadd_ps(d, xv, b[t]);
        }
      }
    }
    const __m256 s0 = _mm256_set1_ps(scale_of<KIND>(W, n, g, G));
    const __m256 s1 = _mm256_set1_ps(scale_of<KIND>(W, n + 1, g, G));
    for (int t = 0; t < MT; ++t) {
      tot0[t] = _mm256_fmadd_ps(to_value<KIND>(a[t]), s0, tot0[t]);
      tot1[t] = _mm256_fmadd_ps(to_value<KIND>(b[t]), s1, tot1[t]);
      corr0[t] += zero_term(W, XS, m0 + t, n, g, G);
      corr1[t] += zero_term(W, XS, m0 + t, n + 1, g, G);
    }
  }
  const float bias0 = B ? B[n] : 0.f, bias1 = B ? B[n + 1] : 0.f;
  for (int t = 0; t < MT; ++t) {
    OUT[(m0 + t) * N + n] = (hsum(tot0[t]) - corr0[t]) + bias0;
    OUT[(m0 + t) * N + n + 1] = (hsum(tot1[t]) - corr1[t]) + bias1;
  }
}

// Every activation row of output channels n, n + 1 in pair_rows_tile's tiles of PAIR_TILE_ROWS.
template <int BITS, int KIND>
static inline void pair_rows(const float* X, const float* XS, const Weight& W, const float* B,
                             float* OUT, int64_t M, int64_t n, int64_t K, int64_t G, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + PAIR_TILE_ROWS <= M; m0 += PAIR_TILE_ROWS)
    pair_rows_tile<BITS, KIND, PAIR_TILE_ROWS>(X, XS, W, B, OUT, m0, n, K, G, N);
  switch (M - m0) {
    case 3: pair_rows_tile<BITS, KIND, 3>(X, XS, W, B, OUT, m0, n, K, G, N); break;
    case 2: pair_rows_tile<BITS, KIND, 2>(X, XS, W, B, OUT, m0, n, K, G, N); break;
    case 1: pair_rows_tile<BITS, KIND, 1>(X, XS, W, B, OUT, m0, n, K, G, N); break;
    default: break;
  }
}

// OUT [M, N] = X [M, K] @ W^T (+ B [N] if not null).
template <int BITS, int KIND>
static int gemv(const float* X, const Weight& W, const float* B, float* OUT, int64_t M,
                int64_t K, int64_t N, int64_t G, int threads) {
  const int64_t group = K / G;
  float* XS = nullptr;  // group sums of X, for the zero-point term
  if (W.ZS) {
    XS = static_cast<float*>(malloc(sizeof(float) * M * G));
    if (!XS) return 1;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = 0; k < group; ++k) s += X[m * K + g * group + k];
        XS[m * G + g] = s;
      }
  }
  float* XP = nullptr;  // X with each 32-chunk in decode's order (code_at), times code_scale
  if constexpr (BITS < 8) {
    XP = static_cast<float*>(malloc(sizeof(float) * M * K));
    if (!XP) { free(XS); return 1; }
    for (int64_t i = 0; i < M * K; i += 32)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 8; ++l)
          XP[i + 8 * j + l] = X[i + code_at<BITS, KIND>(j, l)] * code_scale<BITS, KIND>(j);
    X = XP;
  }
  if (M == 1) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
    for (int64_t p = 0; p < N / 2; ++p) {
      if (is_table(KIND) && W.TR == 0)
        pair_tile<BITS, KIND, true>(X, XS, W, B, OUT, 2 * p, K, G);
      else
        pair_tile<BITS, KIND, false>(X, XS, W, B, OUT, 2 * p, K, G);
    }
    if (N % 2) row_tile<BITS, KIND, 1>(X, XS, W, B, OUT, 0, N - 1, K, G, N);
    free(XS);
    free(XP);
    return 0;
  }
  // Pairs of output channels where they were measured to win: on 4096-11008 wide layers at
  // M=8, 16-23% (M=16: 2-13%) as 2 x 3 tiles of whole decoded chunks, and another 8-19% at
  // M=8-16 as today's 2 x 4 tiles decoded a vector at a time. At M=2-4 (the 2 x 4 tile: 13-19%
  // slower at M=2), on 384-wide layers and for nf4 / fp4's table lookups (M=16: 0.84x / 0.74x
  // fp32 against 1.06x / 0.92x), row_tile was as fast or faster (one-off A/Bs and
  // format_kernels.md runs).
  if constexpr (!is_table(KIND)) {
    if (M >= PAIR_ROWS_MIN_M && K >= PAIR_ROWS_MIN_K) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
      for (int64_t p = 0; p < N / 2; ++p)
        pair_rows<BITS, KIND>(X, XS, W, B, OUT, M, 2 * p, K, G, N);
      if (N % 2)
        for (int64_t m = 0; m < M; ++m)
          row_tile<BITS, KIND, 1>(X, XS, W, B, OUT, m, N - 1, K, G, N);
      free(XS);
      free(XP);
      return 0;
    }
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= (1 << 18))
  for (int64_t n = 0; n < N; ++n) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) row_tile<BITS, KIND, 4>(X, XS, W, B, OUT, m0, n, K, G, N);
    switch (M - m0) {
      case 3: row_tile<BITS, KIND, 3>(X, XS, W, B, OUT, m0, n, K, G, N); break;
      case 2: row_tile<BITS, KIND, 2>(X, XS, W, B, OUT, m0, n, K, G, N); break;
      case 1: row_tile<BITS, KIND, 1>(X, XS, W, B, OUT, m0, n, K, G, N); break;
      default: break;
    }
  }
  free(XS);
  free(XP);
  return 0;
}

// c[q] lane l holds code 4l + q (codes()' order) -> o[j] lane i holds code 8j + i: a 4 x 8
// transpose in registers.
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

// Row n of the weight in fp32, OUT [K] = value * s - zs in the stored column order.
template <int BITS, int KIND>
static inline void dequant_row(const Weight& W, int64_t n, float* OUT, int64_t K, int64_t G) {
  const int64_t group = K / G, chunks = group / CODES, row_bytes = K * BITS / 8;
  Table tab;
  for (int64_t g = 0; g < G; ++g) {
    if (g == 0 || W.TG) load_table<BITS, KIND>(W, n, g, tab);
    const __m256 sv = _mm256_set1_ps(scale_of<KIND>(W, n, g, G));
    const __m256 zv = _mm256_set1_ps(W.ZS ? W.ZS[n * G + g] : 0.f);
    for (int64_t i = 0; i < chunks; ++i) {
      __m256 c[4], v[4];
      decode<BITS, KIND>(W.P + n * row_bytes + CHUNK_BYTES<BITS> * (g * chunks + i), tab, c);
      if constexpr (BYTE_PLANES<BITS, KIND>) {
        const __m256i interleave = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (int q = 0; q < 4; ++q) v[q] = _mm256_permutevar8x32_ps(c[q], interleave);
      } else if constexpr (BITS < 8) {
        if constexpr (IN_PLACE_CODES<BITS, KIND>)
          for (int q = 0; q < 4; ++q)
            c[q] = _mm256_mul_ps(c[q], _mm256_set1_ps(code_scale<BITS, KIND>(q)));
        natural_order(c, v);
      }
      const __m256* w = BITS < 8 ? v : c;
      float* o = OUT + g * group + i * CODES;
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_ps(o + 8 * q, _mm256_fmsub_ps(to_value<KIND>(w[q]), sv, zv));
    }
  }
}

// fp32 weights OUT [N, K].
template <int BITS, int KIND>
static void dequant(const Weight& W, float* OUT, int64_t N, int64_t K, int64_t G, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) dequant_row<BITS, KIND>(W, n, OUT + n * K, K, G);
}

// OUT [count, K] = rows IDS [count] of the weight (an embedding lookup; ids checked by the
// caller).
template <int BITS, int KIND>
static void rows(const Weight& W, const int64_t* IDS, int64_t count, float* OUT, int64_t K,
                 int64_t G) {
  for (int64_t i = 0; i < count; ++i) dequant_row<BITS, KIND>(W, IDS[i], OUT + i * K, K, G);
}

// What a GEMV call needs besides the activations: built once per weight layout by the caller,
// so that a call passes 5 arguments (ctypes converts each argument on every call: 14 of them
// took ~3 us, 5 take ~1.4 us, against ~13 us of arithmetic in a 384x384 layer).
struct GemvArgs {
  Weight W;
  const float* B;
  int64_t K, N, G;
};

#define EXPORT(NAME, BITS, KIND)                                                             \
  extern "C" int NAME##_gemv(const float* X, float* OUT, int64_t M, const GemvArgs* A,      \
                             int threads) {                                                  \
    return gemv<BITS, KIND>(X, A->W, A->B, OUT, M, A->K, A->N, A->G, threads);               \
  }                                                                                          \
  extern "C" void NAME##_dequant(const uint8_t* P, const float* S, const float* ZS,          \
                                 const float* T, int64_t TR, int64_t TG, float* OUT,         \
                                 int64_t N, int64_t K, int64_t G, int threads) {             \
    dequant<BITS, KIND>(Weight{P, S, ZS, T, TR, TG}, OUT, N, K, G, threads);                  \
  }                                                                                          \
  extern "C" void NAME##_rows(const uint8_t* P, const float* S, const float* ZS,             \
                              const float* T, int64_t TR, int64_t TG, const int64_t* IDS,    \
                              int64_t count, float* OUT, int64_t K, int64_t G) {             \
    rows<BITS, KIND>(Weight{P, S, ZS, T, TR, TG}, IDS, count, OUT, K, G);                    \
  }
EXPORT(int1, 1, AFFINE)
EXPORT(int2, 2, AFFINE)
EXPORT(int3, 3, AFFINE)
EXPORT(int5, 5, AFFINE)
EXPORT(int6, 6, AFFINE)
EXPORT(int4, 4, AFFINE)
EXPORT(int8, 8, AFFINE)
EXPORT(lut1, 1, TABLE)
EXPORT(lut2, 2, TABLE)
EXPORT(lut3, 3, TABLE)
EXPORT(lut4, 4, TABLE)
EXPORT(lut4bf16, 4, TABLE_BF16)
EXPORT(e4m3, 8, E4M3)
EXPORT(e5m2, 8, E5M2)
"""
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)  # cpu_int{bits}: affine codes
TABLE_BITS = (1, 2, 3, 4)  # cpu_lut: codebook, float-grid and k-means codes (a 16-entry table)
TABLE_KINDS = ("codebook", "float", "kmeans")
FP8_FORMATS = {"fp8_e4m3fn": "e4m3", "fp8_e5m2": "e5m2"}  # cpu_fp8: decoded from the bits
# Activations the kernels take: float32, and half types computed in float32 (the result
# rounded to x's dtype once: closer to exact than the reference's half-precision F.linear)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_GEMV_ARGS = [_PTR, _PTR, _I64, _PTR, _INT]
_DEQUANT_ARGS = [_PTR] * 4 + [_I64] * 2 + [_PTR] + [_I64] * 3 + [_INT]
_ROWS_ARGS = [_PTR] * 4 + [_I64] * 2 + [_PTR, _I64, _PTR] + [_I64] * 2
_FAMILIES = ([f"int{b}" for b in AFFINE_BITS] + [f"lut{b}" for b in TABLE_BITS] + ["lut4bf16"]
             + list(FP8_FORMATS.values()))
_LIB = NativeLibrary("cpu_avx2", _SOURCE, _FLAGS, {
    **{f"{f}_gemv": (_GEMV_ARGS, _INT) for f in _FAMILIES},
    **{f"{f}_dequant": (_DEQUANT_ARGS, None) for f in _FAMILIES},
    **{f"{f}_rows": (_ROWS_ARGS, None) for f in _FAMILIES},
}, fallback="the reference kernel")


class GemvArgs(ctypes.Structure):
    """The C ``GemvArgs``: a weight's pointers and sizes, passed to ``<family>_gemv`` by
    address."""

    _fields_ = [("P", _PTR), ("S", _PTR), ("ZS", _PTR), ("T", _PTR), ("TR", _I64), ("TG", _I64),
                ("B", _PTR), ("K", _I64), ("N", _I64), ("G", _I64)]


def extension() -> ctypes.CDLL | None:
    """The compiled kernel library, or None if it cannot be built here (``_LIB.error`` says
    why; warned once)."""
    return _LIB.get()


def family(qt: QuantizedTensor) -> str | None:
    """The C kernel family that runs ``qt`` (``"int3"``, ``"lut4"``, ...), or None.

    Weight-only 2-D specs with group-wise or per-output-channel parameters and groups (or rows)
    a multiple of 32 wide: affine codes of 1 to 6 or 8 bits; codebook (nf4), float-grid
    (fp4) and k-means codes of at most 4 bits (looked up in a table per row, group or spec);
    fp8 (e4m3fn, e5m2) codes. A group index (GPTQ act-order's ``g_idx``) is taken when every
    group has ``group_size`` columns: the kernel then keeps a copy of the codes with each
    group's columns together.
    """
    spec = qt.spec
    if spec.act is not None or len(qt.shape) != 2 or spec.double_quantized:
        return None  # (double-quantized weights run as their float view, with_float_scales)
    if qt.scale is None and spec.kind != "kmeans":  # (a hand-built weight: the reference refuses)
        return None
    if spec.granularity == "group":
        if spec.group_size % 32 or not whole_groups(qt):
            return None
    elif not (spec.granularity == "channel" and spec.axis in (0, -2) and qt.shape[1] % 32 == 0):
        return None
    if spec.kind == "affine" and spec.bits in AFFINE_BITS:
        return f"int{spec.bits}"
    if spec.kind in TABLE_KINDS and spec.bits in TABLE_BITS:
        if spec.bits == 4 and spec.kind != "kmeans" and _bf16_values(spec):
            return "lut4bf16"  # fp4 e2m1: two byte planes of four to look up
        return f"lut{spec.bits}"
    return FP8_FORMATS.get(spec.format)


@functools.lru_cache(maxsize=64)
def _bf16_values(spec: QuantSpec) -> bool:
    """Whether every code value of a codebook / float-grid spec is a bf16 number (the low 16
    bits of its float32 zero)."""
    return not bool((code_values(spec).view(torch.int32) & 0xFFFF).any())


def whole_groups(qt: QuantizedTensor) -> bool:
    """No group index, or one that gives every group exactly ``group_size`` columns."""
    if qt.g_idx is None:
        return True
    groups = qt.shape[1] // qt.spec.group_size
    counts = torch.bincount(qt.g_idx.long(), minlength=groups)
    return counts.numel() == groups and bool((counts == qt.spec.group_size).all())


def group_order(qt: QuantizedTensor) -> torch.Tensor | None:
    """The column order (int64 ``[K]``) that puts each group's columns together, for a weight
    with a group index (of :func:`whole_groups`); None without one, or where the columns are
    in group order already. Kernels keep the codes in this order and gather the activations
    alike."""
    if qt.g_idx is None or bool((qt.g_idx[1:] >= qt.g_idx[:-1]).all()):
        return None
    return torch.argsort(qt.g_idx, stable=True)


def spec_supported(qt: QuantizedTensor) -> bool:
    """Whether one of these kernels runs ``qt`` (see :func:`family`)."""
    return family(qt) is not None


def kernel_name(found: str) -> str:
    """The registered kernel of a :func:`family`."""
    if found.startswith("lut"):
        return "cpu_lut"
    return "cpu_fp8" if found in FP8_FORMATS.values() else f"cpu_{found}"


def _supports(qt: QuantizedTensor, x: torch.Tensor, kernel: str) -> bool:
    found = family(qt)
    return (
        found is not None
        and kernel == kernel_name(found)
        and x.device.type == "cpu"
        and x.dtype in ACTIVATION_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through ctypes
        and qt.qdata.device.type == "cpu"
        and x.dim() >= 1 and x.shape[-1] == qt.shape[1]
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


def _tables(qt: QuantizedTensor) -> tuple[torch.Tensor, int, int]:
    """The tables of 16 float32 slots (code -> unscaled value; padded) and their row and group
    strides in floats: one per spec (nf4, fp4: strides 0) or per row and group (k-means). For
    4-bit codes each table is stored as its four byte planes (byte k of the 16 entries, then
    byte k + 1, ...), the kernel's vpshufb operands."""
    entries = 1 << qt.spec.bits
    if qt.spec.kind == "kmeans":
        values = qt.codebook.float().reshape(qt.shape[0], -1, entries)  # [N, G, 2**bits]
        strides = (16 * values.shape[1], 16)
    else:
        values, strides = code_values(qt.spec), (0, 0)
    tables = torch.zeros(*values.shape[:-1], 16)
    tables[..., :entries] = values
    if entries == 16:
        planes = tables.view(torch.uint8).unflatten(-1, (16, 4)).transpose(-1, -2)
        tables = planes.contiguous().flatten(-2).view(torch.float32)
    return tables, *strides


def _execution_layout(qt: QuantizedTensor, cache: dict) -> tuple[tuple, tuple]:
    """(held tensors, the kernel's weight arguments ``(P, S, ZS, T, TR, TG)``): lowbit's
    canonical code bytes read in place (no repacked copy of the weight is kept: the int4 GEMV
    permutes the activations instead) and small float32 copies of the parameters, held in
    ``cache``:

    - affine: scale ``[N, G]`` and scale * zero-point ``[N, G]`` in the kernel's code units
      (8-bit codes are read as ``byte - 128``; a zero-point term that is 0 everywhere, as for a
      symmetric int8 weight, is dropped);
    - tables: scale ``[N, G]`` (none for k-means) and the tables of :func:`_tables`;
    - fp8: scale ``[N, G]``;
    - with a group index: the codes repacked with their columns sorted by group, and that
      column order (int64 ``[K]``, last of the held tensors).

    Whoever keeps a pointer must keep the tensors.
    """
    name = f"cpu_{family(qt)}"
    entry = cache.get(name)
    version = weight_version(qt)
    if entry is None or entry[0] != version:
        scale = zero_term = table = None
        strides = (0, 0)
        if qt.spec.kind == "affine":
            scale, zero_code = scale_and_zero_code(qt)
            if qt.spec.bits == 8:
                zero_code = zero_code - 128
            if bool(zero_code.any()):
                zero_term = (scale * zero_code).contiguous()
        else:
            if qt.scale is not None:
                scale = qt.scale.float().reshape(qt.shape[0], -1).contiguous()
            if qt.spec.bits <= 4:
                table, *strides = _tables(qt)
        qdata, order = qt.qdata.contiguous(), group_order(qt)
        if order is not None:  # columns sorted by group: the activations are gathered alike
            qdata = pack(qt.codes()[:, order].contiguous(), qt.spec.bits)
        tensors = (qdata, scale, zero_term, table)
        # the tensors keep the pointers valid; the ints save per-call ctypes work
        pointers = (*(None if t is None else t.data_ptr() for t in tensors), *strides)
        tensors = (*tensors, order)
        entry = (version, tensors, pointers, qt)
        cache[name] = entry
    return entry[1], entry[2]


def nonfinite_codes(qt: QuantizedTensor, cache: dict) -> bool:
    """Whether an fp8 weight holds inf / NaN bit patterns. lowbit's Q never stores them (it
    saturates), but an imported checkpoint may; the kernels' bit decode would read them as
    large finite values, so such a weight keeps the reference path. Cached per weight version
    in ``cache``."""
    fmt = FP8_FORMATS.get(qt.spec.format)
    if fmt is None:
        return False
    version = weight_version(qt)
    entry = cache.get("fp8_nonfinite")
    if entry is None or entry[0] != version:
        magnitude = qt.qdata.view(torch.uint8) & 0x7F
        special = magnitude == 0x7F if fmt == "e4m3" else magnitude >= 0x7C
        entry = cache["fp8_nonfinite"] = (version, bool(special.any()), qt)
    return entry[1]


def _groups(qt: QuantizedTensor) -> int:
    """G: parameter groups per output row (1 per channel)."""
    if qt.spec.kind == "kmeans":
        return qt.codebook.numel() // (qt.shape[0] << qt.spec.bits)
    return qt.scale.numel() // qt.shape[0]


def _at(pointer: int | None, offset: int) -> int | None:
    return None if pointer is None else pointer + offset


def bind_cpu_linear(
    qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., K] -> x @ W^T + b [..., N]`` for a W ``[N, K]`` of :func:`family`, with the
    weight's pointers and shapes resolved once (and again after an in-place change of a stored
    tensor). x is float32, or bfloat16 / float16 (computed in float32, returned in x's
    dtype)."""
    lib = extension()
    kind = family(qt)
    if kind is None:
        raise ValueError(f"spec {qt.spec} on shape {qt.shape} has no cpu_int / cpu_lut / cpu_fp8 "
                         "kernel")
    name = kernel_name(kind)
    n_out, k_in = qt.shape
    n_groups = _groups(qt)
    row_bytes = k_in * qt.spec.bits // 8
    gemv, dequant = getattr(lib, f"{kind}_gemv"), getattr(lib, f"{kind}_dequant")
    if bias is not None and bias.numel() != n_out:
        raise ValueError(f"bias has {bias.numel()} elements; the weight has {n_out} outputs")
    b = None if bias is None else bias.float().contiguous()  # the same tensor if already so
    get_threads = torch.get_num_threads
    args = GemvArgs(K=k_in, N=n_out, G=n_groups)
    args_at = ctypes.addressof(args)
    # [versions, held tensors, pointers, whether to defer to the reference, the bias args.B
    # points to]
    layout: list = [None, None, None, False, None]

    def build(versions: list[int]) -> None:
        nonlocal b
        if b is not bias and bias is not None:
            b = bias.float().contiguous()
        held, pointers = _execution_layout(qt, cache)
        # the struct first: a concurrent call that sees the new versions finds its pointers
        args.P, args.S, args.ZS, args.T, args.TR, args.TG = pointers
        args.B = None if b is None else b.data_ptr()
        layout[:] = [versions, held, pointers, nonfinite_codes(qt, cache), b]

    # The kernel reads the codes in place (unless regrouped, or fp8, whose codes are checked
    # for inf / NaN patterns) but copies of the other tensors: follow their in-place edits
    # outside inference_mode (inference tensors have no version counter: after editing one
    # under inference_mode, clear the module's kernel cache).
    watch_codes = qt.g_idx is not None or kind in FP8_FORMATS.values()
    tracked = [t for field, t in qt.stored_tensors().items()
               if (field != "qdata" or watch_codes) and not t.is_inference()]
    if bias is not None and b is not bias and not bias.is_inference():
        tracked.append(bias)  # a half-precision bias: its float32 copy follows edits too
    build([t._version for t in tracked])
    float32, cpu = torch.float32, torch.device("cpu")
    max_rows = GEMV_MAX_ROWS if n_out * k_in >= GEMV_SMALL_WEIGHT else GEMV_SMALL_MAX_ROWS
    allocate = output_allocator(n_out)

    def native() -> bool:
        """Whether the C kernel runs the weight as it is now (its layout rebuilt first after an
        in-place edit)."""
        if tracked:
            versions = [t._version for t in tracked]
            if versions != layout[0]:
                if family(qt) is None:  # edited in place into groups these kernels cannot run
                    return False
                build(versions)
        return not layout[3]

    def raw_step(out: torch.Tensor) -> Callable[[int], int] | None:
        """``x pointer -> status`` writing ``x @ W^T + b`` into ``out`` (the caller's buffer,
        ``[..., N]`` contiguous float32 CPU, kept alive) for an x of out's rows (contiguous
        float32; nonzero status: run the checked call instead), resolved now: the weight's
        layout as it is and torch's thread count, none of run's checks; None where this weight
        or out takes another path. After an in-place edit of the weight or a thread-count
        change, get it again (the Decoder does at each generate)."""
        m = step_rows(out, n_out)
        if not native() or layout[1][-1] is not None or not 0 < m <= max_rows:
            return None
        threads, out_at = get_threads(), out.data_ptr()
        # a rebuild updates args in place (and layout, which holds what it points to)
        return lambda x_ptr, _keep=(args, layout, out): gemv(x_ptr, out_at, m, args_at, threads)

    def run(x: torch.Tensor) -> torch.Tensor:
        # the common case first, with as few torch calls as possible: a small layer's whole
        # call is ~10-20 us, and each attribute or method of a tensor costs ~0.2-2 us
        if x.dtype is not float32 or x.shape[-1] != k_in or not x.is_cpu:
            if x.shape[-1] != k_in or x.dtype not in ACTIVATION_DTYPES or not x.is_cpu:
                raise ValueError(f"{name}: x {x.dtype} {tuple(x.shape)} on {x.device} for "
                                 f"weight {tuple(qt.shape)}; needs float32 (or bfloat16 / "
                                 f"float16) CPU [..., {k_in}]")
            return run(x.float()).to(x.dtype)
        if not native():
            return reference_linear(x, qt, bias, {})
        order = layout[1][-1]
        if order is not None:
            x = x.reshape(-1, k_in).index_select(1, order).view(x.shape)
        elif not x.is_contiguous():
            x = x.contiguous()
        m = x.numel() // k_in
        if m > max_rows:
            return dequant_linear(x.view(m, k_in)).view(*x.shape[:-1], n_out)
        y = allocate(x.shape[:-1])
        if m and gemv(x.data_ptr(), y.data_ptr(), m, args_at, get_threads()):
            raise MemoryError(f"{name}: could not allocate {m}x{k_in} activation scratch")
        return y

    def dequant_linear(x2: torch.Tensor) -> torch.Tensor:
        """``x2 [m, K] @ W^T + b`` through fp32 weights dequantized into the scratch buffer."""
        m = x2.shape[0]
        packed, scale, zero_term, table, t_row, t_group = layout[2]
        rows = n_out if n_out * k_in <= DEQUANT_WHOLE_MAX else DEQUANT_BLOCK_ROWS
        block = _scratch(rows * k_in)
        if rows == n_out:  # one block: the whole weight, bias fused into the GEMM
            w = block[: n_out * k_in].view(n_out, k_in)
            dequant(packed, scale, zero_term, table, t_row, t_group, w.data_ptr(), n_out,
                    k_in, n_groups, get_threads())
            return F.linear(x2, w, b)
        y = torch.empty(m, n_out, dtype=float32, device=cpu)
        for n0 in range(0, n_out, rows):
            nb = min(rows, n_out - n0)
            w = block[: nb * k_in].view(nb, k_in)
            offset = 4 * n0 * n_groups  # bytes into the [N, G] float32 parameters
            dequant(packed + n0 * row_bytes, _at(scale, offset), _at(zero_term, offset),
                    _at(table, 4 * n0 * t_row), t_row, t_group, w.data_ptr(), nb, k_in,
                    n_groups, get_threads())
            y[:, n0:n0 + nb] = x2 @ w.T
        if b is not None:
            y += b
        return y

    run.held = layout  # the tensors behind the pointers live as long as run
    run.raw_step = raw_step
    return run


def embedding_rows(qt: QuantizedTensor, ids: torch.Tensor, cache: dict) -> torch.Tensor | None:
    """Rows ``ids`` (int64 / int32) of a float32 table W ``[N, K]`` (an embedding lookup),
    ``[*ids.shape, K]`` float32, dequantized by the kernel library from the stored codes, bit
    for bit ``qt.dequantize()[ids]``; None where it cannot (spec, device, dtypes, group index,
    library unavailable): use the torch path then. The lookup is bound once per weight in
    ``cache`` (a decode step's single-token lookup: ~70 -> ~26 us, one-off)."""
    entry = cache.get("embedding_rows")
    if entry is None or entry[0] is not qt:
        bound = bind_embedding_rows(qt.with_float_scales(), cache)
        entry = cache["embedding_rows"] = (qt, bound)
    return None if entry[1] is None else entry[1](ids)


def bind_embedding_rows(
    qt: QuantizedTensor, cache: dict
) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """:func:`embedding_rows` for this weight, ``ids -> rows`` (None for ids it cannot take),
    with the weight's checks and pointers resolved once and again after an in-place edit of a
    stored tensor (as the bound GEMV's); None where the weight needs the torch path."""
    spec = qt.spec
    if (qt.dtype != torch.float32 or qt.qdata.device.type != "cpu" or qt.g_idx is not None
            or family(qt) is None or extension() is None):
        return None
    if spec.kind == "affine" and spec.has_zero_point and (
            spec.scale_dtype == "float32" or spec.zero_point == "float" and (
                spec.signed or spec.bits == 8 or spec.zero_dtype == "float32")):
        # the kernel's s * (z - qmin) may round where Q^-1's (q - z) * s does not (exact for
        # half-precision scales with integer zero-points, or half-precision float ones of an
        # unsigned grid below 8 bits): the rows would differ by an ulp (e.g. a k-quant's
        # decoded float view); the torch path gives Q^-1's rows
        return None
    rows_of = getattr(extension(), f"{family(qt)}_rows")
    n_rows, k = qt.shape
    n_groups = _groups(qt)
    tracked = [t for t in qt.stored_tensors().values() if not t.is_inference()]
    state: list = [None, None, None]  # versions, (held tensors, pointers), non-finite codes
    allocate = output_allocator(k)
    long, cpu = torch.int64, torch.device("cpu")

    def run(ids: torch.Tensor) -> torch.Tensor | None:
        if ids.device != cpu or ids.dtype not in (torch.int64, torch.int32):
            return None  # others: the torch path (and its error)
        versions = [t._version for t in tracked]
        if versions != state[0]:
            state[:] = [versions, _execution_layout(qt, cache), nonfinite_codes(qt, cache)]
        if state[2]:
            return None
        flat = ids.reshape(-1)
        if flat.dtype is not long:
            flat = flat.to(long)
        flat = flat.contiguous()
        count = flat.numel()
        if count:
            low, high = (flat.item(),) * 2 if count == 1 else map(int, torch.aminmax(flat))
            if not (0 <= low and high < n_rows):
                raise IndexError(f"embedding ids must lie in [0, {n_rows}); got [{low}, {high}]")
        out = allocate((count,))
        rows_of(*state[1][1], flat.data_ptr(), count, out.data_ptr(), k, n_groups)
        return out.view(*ids.shape, k)

    run.held = state
    return run


def cpu_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] float32 @ W^T`` for a W ``[N, K]`` of :func:`family`; ``[..., N]``."""
    return bind_cpu_linear(qt, bias, cache)(x)


for _name in [f"cpu_int{b}" for b in AFFINE_BITS] + ["cpu_lut", "cpu_fp8"]:
    register_kernel(Kernel(_name, cpu_linear, lambda qt, x, k=_name: _supports(qt, x, k),
                           priority=10, bind=bind_cpu_linear))
