"""Fused float32 CPU ops for one decode step of a Llama-family block (used by
:class:`lowbit.models.decode.Decoder`): RMSNorm, rotary embedding + KV-cache write, and
single-query attention over the cache.

Why: at batch 1 a small model's step is dominated by per-op overhead, not arithmetic. Each of
these replaces 6-15 torch ops (RMSNorm: pow, mean, add, rsqrt, mul, mul; rotary + cache: views,
roll, muls, adds, two strided copies; attention: SDPA with its slicing) by one ctypes call.
Float32, contiguous inputs, computed in the same formulas as transformers' Llama code (fp32
accumulation; results differ from torch's only in summation order). Plain C++ (auto-vectorized,
no OpenMP), built on first use like ``cpu_avx2``; if it cannot be built, ``available()`` is
False and the Decoder uses torch ops.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from lowbit.kernels.native import NativeLibrary, cpu_has_avx2

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

// OUT[r, :] = X[r, :] * (1 / sqrt(mean(X[r, :]^2) + eps)) * W, rows of length D.
extern "C" void rms_norm(const float* X, const float* W, float* OUT, int64_t rows, int64_t D,
                         float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * D;
    float* o = OUT + r * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; ++i) o[i] = (x[i] * inv) * W[i];
  }
}

// H [rows, D] += DELTA [rows, D] in place, then OUT = rms_norm(H) * W as above (the residual
// add that precedes every norm of a pre-norm block).
extern "C" void add_rms_norm(float* H, const float* DELTA, const float* W, float* OUT,
                             int64_t rows, int64_t D, float eps) {
  for (int64_t i = 0; i < rows * D; ++i) H[i] += DELTA[i];
  rms_norm(H, W, OUT, rows, D, eps);
}

// Rotary embedding (half-split layout: t' = t * cos + cat(-t2, t1) * sin) of Q [B, T, NH, HD]
// in place and of K [B, T, NKV, HD] into KC [B, NKV, L, HD] at cache slots start..start+T; V
// into VC likewise. Token t of row b takes table row max(0, row0 + t - PAD[b]) of COS, SIN
// [rows, HD] (PAD: each row's left-padding slots, or null for none); SIN's first half is
// negated (so t'[i] = t[i] * cos[i] + t[i +- HD/2] * SIN[i] in both halves).
extern "C" void rope_kv(float* Q, const float* K, const float* V, const float* COS,
                        const float* SIN, float* KC, float* VC, const int64_t* PAD, int64_t B,
                        int64_t T, int64_t NH, int64_t NKV, int64_t HD, int64_t L,
                        int64_t start, int64_t row0) {
  const int64_t half = HD / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t row = row0 + t - (PAD && PAD[b] > 0 ? PAD[b] : 0);  // (negative counts: none)
      row = row < 0 ? 0 : row;
      const float* c = COS + row * HD;
      const float* s = SIN + row * HD;
      for (int64_t h = 0; h < NH; ++h) {
        float* q = Q + ((b * T + t) * NH + h) * HD;
        for (int64_t i = 0; i < half; ++i) {
          const float a = q[i], z = q[i + half];
          q[i] = a * c[i] + z * s[i];
          q[i + half] = z * c[i + half] + a * s[i + half];
        }
      }
      for (int64_t h = 0; h < NKV; ++h) {
        const float* k = K + ((b * T + t) * NKV + h) * HD;
        const float* v = V + ((b * T + t) * NKV + h) * HD;
        float* kc = KC + ((b * NKV + h) * L + start + t) * HD;
        float* vc = VC + ((b * NKV + h) * L + start + t) * HD;
        for (int64_t i = 0; i < half; ++i) {
          kc[i] = k[i] * c[i] + k[i + half] * s[i];
          kc[i + half] = k[i + half] * c[i + half] + k[i] * s[i + half];
        }
        for (int64_t i = 0; i < HD; ++i) vc[i] = v[i];
      }
    }
}

// One query per row: OUT [B, NH * HD] = softmax(Q [B, NH, HD] . K^T * scale) V over cached
// slots PAD[b]..len - 1 of KC, VC [B, NKV, L, HD] (PAD: each row's left-padding slots, never
// attended to; null: none); query head h reads kv head h / (NH / NKV). SCORES: scratch of len
// floats.
extern "C" void decode_attention(const float* Q, const float* KC, const float* VC, float* OUT,
                                 float* SCORES, const int64_t* PAD, int64_t B, int64_t NH,
                                 int64_t NKV, int64_t HD, int64_t L, int64_t len, float scale) {
  const int64_t group = NH / NKV;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      // a row of padding only (count >= len) sees its own last slot, as in the torch path;
      // negative counts read as none
      const int64_t pad = PAD && PAD[b] > 0 ? PAD[b] : 0, first = pad < len ? pad : len - 1;
      const float* q = Q + (b * NH + h) * HD;
      const float* kc = KC + (b * NKV + h / group) * L * HD;
      const float* vc = VC + (b * NKV + h / group) * L * HD;
      float top = -INFINITY;
      for (int64_t j = first; j < len; ++j) {
        float d = 0.f;
        for (int64_t i = 0; i < HD; ++i) d += q[i] * kc[j * HD + i];
        SCORES[j] = d * scale;
        top = SCORES[j] > top ? SCORES[j] : top;
      }
      float total = 0.f;
      for (int64_t j = first; j < len; ++j) {
        SCORES[j] = expf(SCORES[j] - top);
        total += SCORES[j];
      }
      float* o = OUT + (b * NH + h) * HD;
      for (int64_t i = 0; i < HD; ++i) o[i] = 0.f;
      for (int64_t j = first; j < len; ++j) {
        const float p = SCORES[j] / total;
        for (int64_t i = 0; i < HD; ++i) o[i] += p * vc[j * HD + i];
      }
    }
}
"""
# Reassociation lets GCC vectorize the sums (no -ffast-math: the softmax needs -inf).
_FLAGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-shared",
          "-fPIC", "-std=c++17"]

_PTR, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_LIB = NativeLibrary(
    "cpu_decode", _SOURCE, _FLAGS + (["-mavx2", "-mfma"] if cpu_has_avx2() else []),
    {"rms_norm": ([_PTR] * 3 + [_I64] * 2 + [_F32], None),
     "add_rms_norm": ([_PTR] * 4 + [_I64] * 2 + [_F32], None),
     "rope_kv": ([_PTR] * 8 + [_I64] * 8, None),
     "decode_attention": ([_PTR] * 6 + [_I64] * 6 + [_F32], None)},
    needs_avx2=False, fallback="torch ops",
)


def library() -> ctypes.CDLL | None:
    """The compiled ops, or None where they cannot be built (the reason warned once)."""
    return _LIB.get()


def available(example: torch.Tensor) -> bool:
    """Whether these ops apply to tensors like ``example`` (CPU float32) and are built."""
    return example.device.type == "cpu" and example.dtype == torch.float32 and (
        library() is not None
    )


def _lib(*tensors: torch.Tensor) -> ctypes.CDLL:
    """The library, after checking that ``tensors`` are contiguous float32 on CPU (the C code
    indexes them densely)."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"cpu_decode ops take contiguous float32 CPU tensors; got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    lib = _LIB.get()
    if lib is None:
        raise RuntimeError("cpu_decode ops are not built here (see the earlier warning)")
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., D]`` RMS-normalized and scaled by ``weight [D]`` (float32)."""
    x = x.contiguous()
    if weight.numel() != x.shape[-1]:
        raise ValueError(f"weight has {weight.numel()} elements for x {tuple(x.shape)}")
    out = torch.empty_like(x)
    _lib(x, weight).rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                           x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
            signed_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
            n_heads: int, n_kv: int) -> None:
    """Rotary-embed ``q [B, T, n_heads * hd]`` in place; write rotary-embedded ``k`` and ``v``
    ``[B, T, n_kv * hd]`` into ``k_cache``/``v_cache [B, n_kv, L, hd]`` at ``start..start+T``.
    ``cos``/``signed_sin [T, hd]``: HF's tables, sin's first half negated."""
    batch, length = q.shape[0], q.shape[1]
    hd, cache_len = k_cache.shape[-1], k_cache.shape[-2]
    shapes_ok = (
        k_cache.dim() == 4 and v_cache.shape == k_cache.shape and k_cache.shape[1] == n_kv
        and k_cache.shape[0] >= batch and 0 < n_kv <= n_heads and n_heads % n_kv == 0
        and hd % 2 == 0 and q.numel() == batch * length * n_heads * hd
        and k.numel() == v.numel() == batch * length * n_kv * hd
        and cos.shape == signed_sin.shape and cos.dim() == 2 and cos.shape[1] == hd
        and cos.shape[0] >= length and 0 <= start and start + length <= cache_len
    )
    if not shapes_ok:
        raise ValueError(
            f"rope_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            f"({n_heads} heads, {n_kv} kv heads) at [{start}, {start + length}) do not fit the "
            f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} and tables "
            f"{tuple(cos.shape)}"
        )
    lib = _lib(q, k, v, cos, signed_sin, k_cache, v_cache)
    lib.rope_kv(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(),
                k_cache.data_ptr(), v_cache.data_ptr(), None, batch, length, n_heads, n_kv, hd,
                cache_len, start, 0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                     scale: float, scratch: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row ``q [B, 1, n_heads * hd]`` over the first ``length``
    positions of the caches ``[B, n_kv, L, hd]``; returns ``[B, 1, n_heads * hd]``.
    ``scratch``: float32 with at least ``length`` elements."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}: need two "
                         "equal [B, n_kv, L, hd]")
    batch, n_kv, cache_len, hd = k_cache.shape
    n_heads = q.shape[-1] // hd if q.dim() == 3 else 0
    if not (q.dim() == 3 and q.shape[0] == batch and q.shape[1] == 1 and n_heads * hd ==
            q.shape[-1] and n_heads >= n_kv > 0 and n_heads % n_kv == 0
            and 0 < length <= min(cache_len, scratch.numel())):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, length {length} do not fit the "
                         f"caches {tuple(k_cache.shape)} and scratch of {scratch.numel()}")
    out = torch.empty_like(q)
    lib = _lib(q, k_cache, v_cache, scratch)
    lib.decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                         scratch.data_ptr(), None, batch, n_heads, n_kv, hd, cache_len,
                         length, scale)
    return out


# Bound forms for the Decoder: everything that does not change between steps (weights, caches,
# tables, their pointers and shapes) is checked once when bound; a call checks only its inputs
# (dtype, layout, shape) and passes integers (one-off, per call: rope_kv 25 -> 7 us, rms_norm
# 10 -> 7 us, attention 25 -> 17 us; a 19M-parameter model makes 4 such calls per layer and
# token).

# Outputs come from empty_like of a checked input: torch.empty with dtype / device keywords took
# 4-6 us per call here, empty_like 2 us (one-off).
_FLOAT32 = torch.float32


def _dense(name: str, t: torch.Tensor, numel: int) -> None:
    if t.dtype is not _FLOAT32 or not t.is_contiguous() or t.numel() != numel or not t.is_cpu:
        raise ValueError(f"{name}: expected a contiguous float32 CPU tensor of {numel} "
                         f"elements; got {t.dtype} {tuple(t.shape)} on {t.device}")


def _rows(name: str, x: torch.Tensor, width: int) -> int:
    """Rows of width ``width`` in a contiguous float32 CPU ``x``."""
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"{name}: {tuple(x.shape)} is not [..., {width}]")
    _dense(name, x, x.numel())
    return x.numel() // width


def _pad_pointer(pad: torch.Tensor, batch: int) -> int:
    """The address of per-row left-padding counts: contiguous int64 CPU ``[batch]``."""
    if pad.dtype != torch.int64 or pad.shape != (batch,) or not pad.is_contiguous() or \
            not pad.is_cpu:
        raise ValueError(f"pad: expected contiguous int64 CPU [{batch}]; got {pad.dtype} "
                         f"{tuple(pad.shape)} on {pad.device}")
    return pad.data_ptr()


def bind_rms_norm(weight: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(x [..., D]) -> RMSNorm(x) * weight`` and, as ``.add(h, delta)``, the same after ``h +=
    delta`` in place (h contiguous); the weight ``[D]`` is checked once and its address read
    per call (a model's parameters can move: ``share_memory()``, ``.data`` swaps)."""
    lib = _lib(weight)
    width = weight.numel()
    norm, add_norm = lib.rms_norm, lib.add_rms_norm

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not _FLOAT32 or x.shape[-1] != width or not x.is_cpu:
            raise ValueError(f"rms_norm: x {x.dtype} {tuple(x.shape)} on {x.device}; expected "
                             f"float32 CPU [..., {width}]")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty_like(x)
        norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // width, width, eps)
        return out

    def add(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        numel = h.numel()
        if h.shape[-1] != width:
            raise ValueError(f"add_rms_norm: h {tuple(h.shape)} for a weight of {width}")
        _dense("add_rms_norm: h", h, numel)
        _dense("add_rms_norm: delta", delta, numel)
        out = torch.empty_like(h)
        add_norm(h.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                 numel // width, width, eps)
        return out

    def step(x: torch.Tensor, out: torch.Tensor,
             residual: torch.Tensor | None = None) -> Callable[[], None]:
        """A zero-argument call for the Decoder's step buffers: ``out = RMSNorm(x) * weight``,
        after ``x += residual`` when ``residual`` is given (as :func:`add`); the buffers are
        checked now and kept, the weight's address read per call (as :func:`run`'s)."""
        rows = _rows("rms_norm step: x", x, width)
        _dense("rms_norm step: out", out, x.numel())
        x_at, out_at = x.data_ptr(), out.data_ptr()
        if residual is None:
            def call(_keep=(x, out)) -> None:
                norm(x_at, weight.data_ptr(), out_at, rows, width, eps)

            return call
        _dense("rms_norm step: residual", residual, x.numel())
        residual_at = residual.data_ptr()

        def call_add(_keep=(x, out, residual)) -> None:
            add_norm(x_at, residual_at, weight.data_ptr(), out_at, rows, width, eps)

        return call_add

    run.add, run.step = add, step
    run.held = weight
    return run


def bind_rope_kv(cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, n_heads: int, n_kv: int) -> Callable[..., None]:
    """``(q, k, v, start, pad=None) -> None``: :func:`rope_kv` with the rotary tables ``[L, hd]``
    indexed by position (token t of row b in cache slot ``start + t`` sits at position ``start +
    t - pad[b]``, at least 0; ``pad``: int64 ``[B]`` left-padding slots per row) and the caches
    ``[B, n_kv, L, hd]`` bound."""
    batch, kv, cache_len, hd = k_cache.shape if k_cache.dim() == 4 else (0, 0, 0, 0)
    if not (v_cache.shape == k_cache.shape and kv == n_kv and 0 < n_kv <= n_heads
            and n_heads % n_kv == 0 and hd % 2 == 0 and cos.shape == signed_sin.shape
            and cos.shape == (cache_len, hd)):
        raise ValueError(f"bind_rope_kv: caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, tables {tuple(cos.shape)} / "
                         f"{tuple(signed_sin.shape)}, {n_heads} heads, {n_kv} kv heads do not "
                         "fit together")
    lib = _lib(cos, signed_sin, k_cache, v_cache)
    fn = lib.rope_kv
    cos_ptr, sin_ptr = cos.data_ptr(), signed_sin.data_ptr()
    kc_ptr, vc_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    q_width, kv_width = n_heads * hd, n_kv * hd

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
            pad: torch.Tensor | None = None) -> None:
        b, t = q.shape[0], q.shape[1]
        if not (q.dim() == 3 and b <= batch and 0 <= start and start + t <= cache_len):
            raise ValueError(f"rope_kv: q {tuple(q.shape)} at [{start}, {start + t}) does not "
                             f"fit the caches {tuple(k_cache.shape)}")
        _dense("rope_kv: q", q, b * t * q_width)
        _dense("rope_kv: k", k, b * t * kv_width)
        _dense("rope_kv: v", v, b * t * kv_width)
        fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos_ptr, sin_ptr, kc_ptr, vc_ptr,
           None if pad is None else _pad_pointer(pad, b), b, t, n_heads, n_kv, hd, cache_len,
           start, start)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[int, int | None],
                                                                             None]:
        """``(start, pad pointer or None) -> None``: :func:`run` for one token per row on the
        Decoder's step buffers ``q, k, v [batch, 1, width]``, checked now and kept."""
        _dense("rope_kv step: q", q, batch * q_width)
        _dense("rope_kv step: k", k, batch * kv_width)
        _dense("rope_kv step: v", v, batch * kv_width)
        q_at, k_at, v_at = q.data_ptr(), k.data_ptr(), v.data_ptr()

        def call(start: int, pad_at: int | None, _keep=(q, k, v, run.held)) -> None:
            if not 0 <= start < cache_len:
                raise ValueError(f"rope_kv step: slot {start} outside the caches of {cache_len}")
            fn(q_at, k_at, v_at, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pad_at, batch, 1, n_heads,
               n_kv, hd, cache_len, start, start)

        return call

    run.step = step
    run.held = (cos, signed_sin, k_cache, v_cache)
    return run


def bind_decode_attention(k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                          scratch: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``(q [B, 1, n_heads * hd], length, pad=None) -> [B, 1, n_heads * hd]``:
    :func:`decode_attention` with the caches and the scratch bound; ``pad`` (int64 ``[B]``):
    each row's left-padding slots, never attended to."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}: need two "
                         "equal [B, n_kv, L, hd]")
    batch, n_kv, cache_len, hd = k_cache.shape
    if n_kv < 1 or hd < 1:
        raise ValueError(f"caches {tuple(k_cache.shape)}: need kv heads and head_dim >= 1")
    lib = _lib(k_cache, v_cache, scratch)
    fn, longest = lib.decode_attention, min(cache_len, scratch.numel())
    kc_ptr, vc_ptr, s_ptr = k_cache.data_ptr(), v_cache.data_ptr(), scratch.data_ptr()

    def run(q: torch.Tensor, length: int, pad: torch.Tensor | None = None) -> torch.Tensor:
        n_heads = q.shape[-1] // hd
        if not (q.dim() == 3 and q.shape[0] == batch and q.shape[1] == 1
                and n_heads * hd == q.shape[-1] and n_heads >= n_kv and n_heads % n_kv == 0
                and 0 < length <= longest):
            raise ValueError(f"decode_attention: q {tuple(q.shape)}, length {length} do not "
                             f"fit the caches {tuple(k_cache.shape)} and scratch of "
                             f"{scratch.numel()}")
        _dense("decode_attention: q", q, q.numel())
        out = torch.empty_like(q)
        fn(q.data_ptr(), kc_ptr, vc_ptr, out.data_ptr(), s_ptr,
           None if pad is None else _pad_pointer(pad, batch), batch, n_heads, n_kv, hd,
           cache_len, length, scale)
        return out

    def step(q: torch.Tensor, out: torch.Tensor, n_heads: int) -> Callable[[int, int | None],
                                                                          None]:
        """``(length, pad pointer or None) -> None``: :func:`run` from the Decoder's step
        buffer ``q [batch, 1, n_heads * hd]`` into ``out`` (same shape), checked now and kept."""
        if n_heads < n_kv or n_heads % n_kv:
            raise ValueError(f"decode_attention step: {n_heads} heads for {n_kv} kv heads")
        _dense("decode_attention step: q", q, batch * n_heads * hd)
        _dense("decode_attention step: out", out, batch * n_heads * hd)
        q_at, out_at = q.data_ptr(), out.data_ptr()

        def call(length: int, pad_at: int | None, _keep=(q, out, run.held)) -> None:
            if not 0 < length <= longest:
                raise ValueError(f"decode_attention step: length {length} outside (0, "
                                 f"{longest}]")
            fn(q_at, kc_ptr, vc_ptr, out_at, s_ptr, pad_at, batch, n_heads, n_kv, hd, cache_len,
               length, scale)

        return call

    run.step = step
    run.held = (k_cache, v_cache, scratch)
    return run
