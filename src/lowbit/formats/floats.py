"""Binary floating-point formats, bit exact: IEEE fp32/fp16/bf16, OCP fp8 e4m3fn/e5m2, MX fp6/fp4.

Bit layout of every format here (most significant bit first)::

    [ sign (1) | exponent (exp_bits, biased by ``bias``) | mantissa (man_bits) ]

A pattern with exponent field ``E`` and mantissa field ``M`` means

* ``E == 0``: subnormal ``(-1)**s * M * 2**(1 - bias - man_bits)`` (``M == 0`` is ±0);
* otherwise:  normal ``(-1)**s * (2**man_bits + M) * 2**(E - bias - man_bits)``;

except the special patterns selected by ``has_inf`` / ``nan_encoding``:

* ``"ieee"``: ``E`` all ones is inf (``M == 0``, when ``has_inf``) or NaN (``M != 0``);
* ``"fn"`` (finite, as float8_e4m3fn): only ``S.1111.111`` (exponent and mantissa all ones) is NaN;
  ``E`` all ones with other mantissas are ordinary normal numbers; there is no inf;
* ``"none"`` (fp6/fp4 of the OCP MX spec): every pattern is a finite number.

Codes are the unsigned bit patterns as integers: int32 tensors for formats up to 16 bits and int64
for fp32, so a code is always ``0 <= code < 2**bits``.

Overflow (``encode(x, saturate=False)``) follows torch 2.13's own casts from float32: fp32, fp16,
bf16 and e5m2 round to inf; e4m3fn *saturates* to ±448 (finite overflow and ±inf alike; this is
torch's CPU behaviour since pytorch#178817 — older torch gave NaN); fp6/fp4 always saturate.
``saturate=True`` clamps every overflow, ±inf included, to ±max (NVIDIA's ``.satfinite``); NaN stays
NaN. NaN inputs become the format's canonical NaN with the input's sign: fp32 ``S.FF.400000``,
fp16 ``S.1F.200``, bf16 ``S.FF.40``, fp8 ``S.all-ones``. (torch's vectorized CPU float32->bf16
cast writes 0xFFFF for every NaN; its scalar path and CUDA write 0x7FC0, which lowbit follows.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NanEncoding = Literal["ieee", "fn", "none"]
Overflow = Literal["inf", "nan", "saturate"]


_CHUNK = 1 << 16  # elements per step: keeps the float64/int64 temporaries in cache


def _chunked(fn, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Apply the elementwise ``fn`` to ``x`` in flat chunks (a loop over chunks, not elements)."""
    if x.numel() <= _CHUNK:
        return fn(x).to(out_dtype)
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
    for start in range(0, flat.numel(), _CHUNK):
        out[start : start + _CHUNK] = fn(flat[start : start + _CHUNK])
    return out.view(x.shape)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float64 ``2**k`` for an int64 tensor ``k`` in [-1022, 1023], built from its bits."""
    return ((k + 1023) << 52).view(torch.float64)


@dataclass(frozen=True)
class FloatFormat:
    """A sign/exponent/mantissa binary float format; see the module docstring for the layout."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool
    nan_encoding: NanEncoding
    torch_dtype: torch.dtype | None = None
    overflow: Overflow = "inf"
    """What a non-saturating encode does on overflow (and ±inf input): "inf" (IEEE), "nan" (OCP's
    non-saturating e4m3) or "saturate" (to ±max)."""

    def __post_init__(self) -> None:
        if self.overflow == "inf" and not self.has_inf:
            raise ValueError(f"{self.name}: overflow='inf' needs has_inf=True")
        if self.overflow == "nan" and self.nan_encoding == "none":
            raise ValueError(f"{self.name}: overflow='nan' needs a NaN encoding")

    # ---- facts ---------------------------------------------------------------------------------

    @property
    def bits(self) -> int:
        """Total width: 1 + exp_bits + man_bits."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number: 1 - bias."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Magnitude pattern (sign bit clear) of the largest finite value."""
        all_ones = (1 << (self.exp_bits + self.man_bits)) - 1
        if self.nan_encoding == "ieee":
            return ((1 << self.exp_bits) - 1 << self.man_bits) - 1
        if self.nan_encoding == "fn":
            return all_ones - 1
        return all_ones

    @property
    def nan_code(self) -> int | None:
        """Canonical positive NaN pattern written by :meth:`encode`; None when there is no NaN."""
        if self.nan_encoding == "none":
            return None
        all_ones = (1 << (self.exp_bits + self.man_bits)) - 1
        if self.nan_encoding == "fn" or self.bits <= 8:
            return all_ones
        return ((1 << self.exp_bits) - 1 << self.man_bits) | (1 << (self.man_bits - 1))

    @property
    def inf_code(self) -> int | None:
        """Positive infinity pattern (exponent all ones, mantissa 0); None without inf."""
        return ((1 << self.exp_bits) - 1 << self.man_bits) if self.has_inf else None

    @property
    def max(self) -> float:
        """Largest finite value."""
        return self._value_of(self.max_code)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, 2**(1 - bias)."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value, 2**(1 - bias - man_bits)."""
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1 and the next value, 2**-man_bits."""
        return math.ldexp(1.0, -self.man_bits)

    @property
    def decimal_digits(self) -> float:
        """Decimal digits of precision, (man_bits + 1) * log10(2)."""
        return (self.man_bits + 1) * math.log10(2.0)

    # ---- single codes --------------------------------------------------------------------------

    def fields(self, code: int) -> tuple[int, int, int]:
        """Split one code into (sign, exponent field, mantissa field)."""
        code = int(code)
        if not 0 <= code < 1 << self.bits:
            raise ValueError(f"{self.name}: code {code} is outside [0, {(1 << self.bits) - 1}]")
        man = code & ((1 << self.man_bits) - 1)
        exp = (code >> self.man_bits) & ((1 << self.exp_bits) - 1)
        return code >> (self.bits - 1), exp, man

    def is_nan_code(self, code: int) -> bool:
        """True when ``code`` is a NaN pattern of this format."""
        _, e, m = self.fields(code)
        e_ones = e == (1 << self.exp_bits) - 1
        if self.nan_encoding == "ieee":
            return e_ones and m != 0
        if self.nan_encoding == "fn":
            return e_ones and m == (1 << self.man_bits) - 1
        return False

    def _value_of(self, code: int) -> float:
        """Exact value of one code as a Python float (float64 holds every value here exactly)."""
        s, e, m = self.fields(code)
        if self.is_nan_code(code):
            return math.nan
        if self.has_inf and e == (1 << self.exp_bits) - 1 and m == 0:
            return -math.inf if s else math.inf
        if e == 0:
            mag = math.ldexp(m, self.emin - self.man_bits)
        else:
            mag = math.ldexp((1 << self.man_bits) + m, e - self.bias - self.man_bits)
        return -mag if s else mag

    # ---- tensors -------------------------------------------------------------------------------

    def _code_dtype(self) -> torch.dtype:
        return torch.int64 if self.bits > 16 else torch.int32

    def encode(self, x: torch.Tensor, saturate: bool = False) -> torch.Tensor:
        """Round ``x`` to the nearest value (ties to even) and return its bit patterns.

        ``x`` is any real floating tensor; it is widened to float64 exactly and rounded once.
        Returns int32 codes (int64 for fp32) in ``[0, 2**bits)``. See the module docstring for
        overflow, NaN and ``saturate``.
        """
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self.name}.encode needs a real floating tensor, got {got}")
        if self.nan_encoding == "none" and bool(torch.isnan(x).any()):
            raise ValueError(
                f"{self.name} has no NaN encoding; the input holds NaN (remove or replace it first)"
            )
        if self.bits == 32:
            return self._encode_fp32(x, saturate)
        if x.dtype != torch.float64:  # float32 holds x exactly: one rounding step either way
            if saturate and self.torch_dtype is not None and self.bits == 8:
                return self._encode_torch_cast(x)  # (quantization's path; bf16 NaN bits differ)
            if self.nan_encoding == "none":
                return self._encode_by_table(x)
        return _chunked(lambda part: self._encode_chunk(part, saturate), x, self._code_dtype())

    def _encode_torch_cast(self, x: torch.Tensor) -> torch.Tensor:
        """Saturating encode through torch's own cast (same bits: pinned by the tests)."""
        x = x.to(torch.float32).clamp(-self.max, self.max)  # ±inf -> ±max; NaN stays NaN
        return x.to(self.torch_dtype).view(torch.int8).to(torch.int32) & 0xFF

    def _encode_by_table(self, x: torch.Tensor) -> torch.Tensor:
        """Small formats without inf/NaN (fp4, fp6): nearest magnitude code, ties to even.

        Sign-magnitude codes are ordered like their magnitudes, so the magnitude code is the
        number of midpoints below |x|; a value exactly on a midpoint takes the even code.
        """
        mags = self.decode(torch.arange(self.max_code + 1, dtype=torch.int32))
        mids = ((mags[1:] + mags[:-1]) / 2).to(x.device)
        a = x.to(torch.float32).abs()
        code = torch.bucketize(a, mids)  # |x| == mid -> the lower code
        on_mid = (code < mids.numel()) & (a == mids[code.clamp(max=mids.numel() - 1)])
        code = torch.where(on_mid & (code % 2 == 1), code + 1, code)
        sign = torch.signbit(x).to(torch.int64) << (self.bits - 1)
        return (code | sign).to(torch.int32)

    def _encode_chunk(self, x: torch.Tensor, saturate: bool) -> torch.Tensor:
        x64 = x.to(torch.float64)
        sign = torch.signbit(x64).to(torch.int64) << (self.bits - 1)
        a = x64.abs()
        finite = torch.isfinite(a)
        a_f = torch.where(finite, a, torch.zeros((), dtype=torch.float64, device=a.device))
        # a = mant * 2**exp with mant in [0.5, 1): floor(log2 a) = exp - 1; clamp for subnormals.
        _, exp = torch.frexp(a_f)
        e = torch.clamp(exp.to(torch.int64) - 1, min=self.emin)
        e = torch.where(a_f == 0, torch.full_like(e, self.emin), e)  # frexp(0) has exponent 0
        # n = a / quantum, quantum = 2**(e - man_bits); torch.round is round-half-even and the
        # scaling by a power of two is exact, so this is one correctly rounded step.
        n = torch.round(a_f * _pow2(self.man_bits - e)).to(torch.int64)
        # Normal: code = (e - emin + 1) << man | (n - 2**man) = ((e - emin) << man) + n; a carry
        # n == 2**(man+1) lands on the next binade's pattern; subnormal (e == emin): code = n.
        mag = ((e - self.emin) << self.man_bits) + n
        over = (mag > self.max_code) | (torch.isinf(a))
        if saturate or self.overflow == "saturate":
            on_overflow = self.max_code
        else:
            on_overflow = self.inf_code if self.overflow == "inf" else self.nan_code
        mag = torch.where(over, torch.full_like(mag, on_overflow), mag)
        if self.nan_code is not None:
            mag = torch.where(torch.isnan(a), torch.full_like(mag, self.nan_code), mag)
        return (mag | sign).to(self._code_dtype())

    def _encode_fp32(self, x: torch.Tensor, saturate: bool) -> torch.Tensor:
        y = x.to(torch.float32)  # one IEEE round-to-nearest-even step from float64 if needed
        if saturate:
            y = torch.where(torch.isinf(y), torch.copysign(torch.tensor(self.max), y), y)
        return y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Bit patterns (any integer tensor, values in [0, 2**bits)) -> float32 values, exactly.

        NaN patterns decode to NaN and inf patterns to ±inf.
        """
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"{self.name}.decode needs an integer tensor of codes, got {got}")
        if self.bits == 32:
            c = codes.to(torch.int64) & 0xFFFFFFFF
            c = torch.where(c >= 1 << 31, c - (1 << 32), c)
            return c.to(torch.int32).view(torch.float32)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << self.bits):
            raise ValueError(
                f"{self.name}.decode: codes must lie in [0, {(1 << self.bits) - 1}], got range "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return _chunked(self._decode_chunk, codes, torch.float32)

    def _decode_chunk(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int64)
        s = c >> (self.bits - 1)
        e = (c >> self.man_bits) & ((1 << self.exp_bits) - 1)
        m = c & ((1 << self.man_bits) - 1)
        sub = e == 0
        sig = torch.where(sub, m, m + (1 << self.man_bits)).to(torch.float64)
        unbiased = torch.where(sub, torch.full_like(e, self.emin), e - self.bias)
        scale = _pow2(unbiased - self.man_bits)
        val = sig * scale
        e_ones = e == (1 << self.exp_bits) - 1
        if self.nan_encoding == "ieee":
            val = torch.where(e_ones & (m != 0), torch.full_like(val, math.nan), val)
            if self.has_inf:
                val = torch.where(e_ones & (m == 0), torch.full_like(val, math.inf), val)
        elif self.nan_encoding == "fn":
            nan = e_ones & (m == (1 << self.man_bits) - 1)
            val = torch.where(nan, torch.full_like(val, math.nan), val)
        val = torch.where(s == 1, -val, val)
        return val.to(torch.float32)

    def values(self) -> torch.Tensor:
        """All finite values, ascending, without duplicates (-0 dropped), float32.

        Only for formats of at most 16 bits (fp32 has 2**32 patterns).
        """
        if self.bits > 16:
            raise ValueError(f"{self.name}.values(): {2**self.bits} patterns is too many to list")
        pos = self.decode(torch.arange(self.max_code + 1, dtype=torch.int32))
        pos = pos[torch.isfinite(pos)]
        return torch.cat([-pos.flip(0)[:-1], pos])  # pos[0] is +0: drop its -0 twin

    def grid(self) -> torch.Tensor:
        """Same as :meth:`values` (the shared name with codebook formats)."""
        return self.values()


FP32 = FloatFormat("fp32", 8, 23, 127, True, "ieee", torch.float32)
FP16 = FloatFormat("fp16", 5, 10, 15, True, "ieee", torch.float16)
BF16 = FloatFormat("bf16", 8, 7, 127, True, "ieee", torch.bfloat16)
FP8_E4M3FN = FloatFormat("fp8_e4m3fn", 4, 3, 7, False, "fn", torch.float8_e4m3fn, "saturate")
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, True, "ieee", torch.float8_e5m2)
FP6_E3M2 = FloatFormat("fp6_e3m2", 3, 2, 3, False, "none", None, "saturate")
FP6_E2M3 = FloatFormat("fp6_e2m3", 2, 3, 1, False, "none", None, "saturate")
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, False, "none", None, "saturate")

FLOAT_FORMATS: tuple[FloatFormat, ...] = (
    FP32, FP16, BF16, FP8_E4M3FN, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1,
)
