"""Integer formats: intN (two's complement) and uintN (plain binary).

Bit layout of a code (most significant bit first), ``bits`` wide:

* ``uintN``: ``b[N-1] ... b[0]`` is the value ``sum(b[i] * 2**i)``, range ``[0, 2**N - 1]``;
* ``intN``:  two's complement, the top bit weighs ``-2**(N-1)``, range ``[-2**(N-1), 2**(N-1) - 1]``
  (so ``int1`` is ``{-1, 0}``).

Codes are the unsigned bit patterns ``0 <= code < 2**N`` (what ``formats.packing`` stores): for intN
a negative value ``v`` has the code ``v + 2**N``. Quantization targets are 1..8 bits; int16/int32
exist for the facts table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntFormat:
    """An N-bit signed (two's complement) or unsigned integer format."""

    name: str
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"{self.name}: bits={self.bits!r}; allowed: an int from 1 to 32")

    @property
    def qmin(self) -> int:
        """Smallest integer value: -2**(bits-1) if signed, else 0."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer value: 2**(bits-1) - 1 if signed, else 2**bits - 1."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Number of distinct values, 2**bits."""
        return 1 << self.bits

    @property
    def is_quant_target(self) -> bool:
        """True for the 1..8-bit formats a QuantSpec may use."""
        return self.bits <= 8

    def describe(self) -> dict[str, object]:
        """Facts for tables: name, bits, signed, qmin, qmax, levels, encoding."""
        return {
            "name": self.name,
            "bits": self.bits,
            "signed": self.signed,
            "qmin": self.qmin,
            "qmax": self.qmax,
            "levels": self.levels,
            "encoding": "two's complement" if self.signed else "unsigned binary",
        }

    def to_code(self, value: int) -> int:
        """Bit pattern of one in-range integer (two's complement for signed)."""
        value = int(value)
        if not self.qmin <= value <= self.qmax:
            raise ValueError(f"{self.name}: {value} is outside [{self.qmin}, {self.qmax}]")
        return value & ((1 << self.bits) - 1)

    def from_code(self, code: int) -> int:
        """Integer value of one bit pattern."""
        code = int(code)
        if not 0 <= code < self.levels:
            raise ValueError(f"{self.name}: code {code} is outside [0, {self.levels - 1}]")
        if self.signed and code >> (self.bits - 1):
            return code - self.levels
        return code

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` half-to-even, clamp to [qmin, qmax], return int64 bit patterns.

        NaN raises ValueError (an integer has no NaN).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}.encode needs a tensor, got {type(x).__name__}")
        if x.dtype.is_floating_point:
            if bool(torch.isnan(x).any()):
                raise ValueError(f"{self.name} has no NaN encoding; the input holds NaN")
            x = torch.round(x.to(torch.float64))
        q = torch.clamp(x, self.qmin, self.qmax).to(torch.int64)
        return q & ((1 << self.bits) - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Bit patterns -> integer values (int64)."""
        c = codes.to(torch.int64)
        if codes.numel() and (int(c.min()) < 0 or int(c.max()) >= self.levels):
            raise ValueError(
                f"{self.name}.decode: codes must lie in [0, {self.levels - 1}], got range "
                f"[{int(c.min())}, {int(c.max())}]"
            )
        if self.signed:
            c = torch.where(c >= 1 << (self.bits - 1), c - self.levels, c)
        return c


INT_FORMATS: tuple[IntFormat, ...] = (
    *(IntFormat(f"int{b}", b, True) for b in range(1, 9)),
    *(IntFormat(f"uint{b}", b, False) for b in range(1, 9)),
    IntFormat("int16", 16, True),
    IntFormat("int32", 32, True),
)
