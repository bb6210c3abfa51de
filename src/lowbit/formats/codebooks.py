"""Codebook (lookup-table) formats: a code is an index into a sorted table of 2**bits float values.

Bit layout: a ``bits``-wide unsigned index ``i``; its value is ``values[i]``. Tables are sorted
ascending, so code order is value order. Tables here are normalized to [-1, 1] and meant to be
multiplied by a per-block absmax scale.

* ``NF4_VALUES``: NormalFloat-4 of QLoRA (Dettmers et al. 2023), bit for bit the float32 table of
  bitsandbytes (``create_normal_map(offset=0.9677083, use_extra_value=True)``): 8 positive levels at
  the N(0,1) quantiles of ``linspace(offset, 0.5, 9)[:-1]``, 7 negative at those of
  ``linspace(offset, 0.5, 8)[:-1]``, plus an exact zero, divided by the largest. Code 7 is 0.
* ``pow2_values(bits)``: a logarithmic grid, see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_construction(offset: float = 0.9677083) -> tuple[float, ...]:
    """Recompute the NF4 table the way bitsandbytes does (float32 linspace and result).

    Positive half: ``ndtri(linspace(offset, 0.5, 9)[:-1])`` (8 values), negative half:
    ``-ndtri(linspace(offset, 0.5, 8)[:-1])`` (7 values), plus 0; sorted and divided by the max.
    """
    def ndtri(p: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtri(p.to(torch.float64))

    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).to(torch.float32)
    v = v.sort().values
    return tuple((v / v.max()).tolist())


def pow2_values(bits: int) -> tuple[float, ...]:
    """A power-of-two (log) grid of 2**bits sorted values in [-1, 1], including 0 and ±1.

    With ``K = 2**(bits-1) - 1``: the negative side is ``-2**-k`` for k = 0..K-1, zero, and the
    positive side ``+2**-k`` for k = 0..K. The one level left over after a symmetric ``0, ±2**-k``
    grid goes to the positive side (the smallest magnitude ``2**-K``), the same choice NF4 makes
    (8 positive, 7 negative levels). For 4 bits: ``-1 .. -1/64, 0, 1/128 .. 1``. All values are
    exact in float32 (for 8 bits the smallest, 2**-127, is a float32 subnormal).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"pow2_values: bits={bits!r}; allowed: an int from 2 to 8")
    k_max = (1 << (bits - 1)) - 1
    neg = [-(2.0**-k) for k in range(k_max)]
    pos = [2.0**-k for k in range(k_max, -1, -1)]
    return tuple(neg + [0.0] + pos)


@dataclass(frozen=True)
class CodebookFormat:
    """A ``bits``-bit index into ``values`` (2**bits floats, strictly ascending)."""

    name: str
    bits: int
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != 1 << self.bits:
            raise ValueError(
                f"{self.name}: {len(self.values)} values for {self.bits} bits; "
                f"need {1 << self.bits}"
            )
        if any(b <= a for a, b in zip(self.values[:-1], self.values[1:], strict=True)):
            raise ValueError(f"{self.name}: values must be strictly ascending")

    @property
    def levels(self) -> int:
        """Number of codes, 2**bits."""
        return 1 << self.bits

    @property
    def max(self) -> float:
        """Largest magnitude in the table."""
        return max(abs(self.values[0]), abs(self.values[-1]))

    def grid(self) -> torch.Tensor:
        """The table as a float32 tensor (index = code)."""
        return torch.tensor(self.values, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table value for each element (int64 codes).

        Out-of-range inputs go to the end codes; an exact midpoint goes to the value of smaller
        magnitude. NaN raises ValueError.
        """
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{self.name}.encode needs a real floating tensor, got {got}")
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{self.name} has no NaN encoding; the input holds NaN")
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            # one float32 pass: a code is the number of thresholds at or below x
            return torch.bucketize(x.float(), self._thresholds.to(x.device), right=True)
        table = torch.tensor(self.values, dtype=torch.float64, device=x.device)
        mids = (table[1:] + table[:-1]) / 2
        x64 = x.to(torch.float64)
        lo = torch.bucketize(x64, mids, right=False)  # at a midpoint: the lower code
        hi = torch.bucketize(x64, mids, right=True)  # at a midpoint: the upper code
        pick_hi = table[hi].abs() < table[lo].abs()
        return torch.where(pick_hi, hi, lo)

    @cached_property
    def _thresholds(self) -> torch.Tensor:
        """float32 ``[2**bits - 1]``: the least float32 that encodes to code i + 1. The float64
        midpoint m of entries i, i + 1 itself goes toward zero: to i + 1 when m < 0 (the
        threshold is the least float32 >= m), else to i (the least float32 > m)."""
        out = []
        for low, high in zip(self.values[:-1], self.values[1:], strict=True):
            mid = (low + high) / 2
            t = torch.tensor(mid, dtype=torch.float32)
            if (float(t) < mid) if mid < 0 else (float(t) <= mid):
                t = torch.nextafter(t, torch.tensor(float("inf")))
            out.append(float(t))
        return torch.tensor(out, dtype=torch.float32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> float32 table values."""
        c = codes.to(torch.int64)
        if codes.numel() and (int(c.min()) < 0 or int(c.max()) >= self.levels):
            raise ValueError(
                f"{self.name}.decode: codes must lie in [0, {self.levels - 1}], got range "
                f"[{int(c.min())}, {int(c.max())}]"
            )
        return self.grid().to(codes.device)[c]


NF4 = CodebookFormat("nf4", 4, NF4_VALUES)
POW2_FORMATS: tuple[CodebookFormat, ...] = tuple(
    CodebookFormat(f"pow2_{b}", b, pow2_values(b)) for b in range(2, 9)
)
