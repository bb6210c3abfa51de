"""Histogram observers: percentile, MSE search and (in ``kl.py``) entropy calibration.

They share a memory-bounded histogram: ``bins_per_side`` bins for the non-negative values and as
many for the negative ones, both counting ``|x|`` outward from 0 over ``[0, bound]``. When a batch
exceeds ``bound`` the range doubles and adjacent bin pairs merge, which keeps every count exact
(only the resolution halves); the first batch sets ``bound`` to its own ``max |x|``.
"""

from __future__ import annotations

import torch

from lowbit.observers.base import Observer, register_observer
from lowbit.quant import fake_quantize, qparams_from_range
from lowbit.spec import QuantSpec


class SymmetricHistogram:
    """Counts of ``x >= 0`` (``pos``) and ``-x`` for ``x < 0`` (``neg``), float64 ``[F]`` each.

    Bin ``k`` of either side covers ``[k * width, (k + 1) * width)`` of ``|x|``.
    """

    def __init__(self, bins_per_side: int = 16384) -> None:
        if bins_per_side < 2 or bins_per_side & (bins_per_side - 1):
            raise ValueError(f"bins_per_side={bins_per_side!r}; allowed: a power of two >= 2")
        self.bins_per_side = bins_per_side
        self.pos = torch.zeros(bins_per_side, dtype=torch.float64)
        self.neg = torch.zeros(bins_per_side, dtype=torch.float64)
        self.bound = 0.0

    @property
    def width(self) -> float:
        return self.bound / self.bins_per_side

    def _double(self) -> None:
        half = self.bins_per_side // 2
        for side in (self.pos, self.neg):
            merged = side.reshape(half, 2).sum(1)
            side.zero_()
            side[:half] = merged
        self.bound *= 2.0

    def update(self, x: torch.Tensor) -> None:
        """Add a flat float32 tensor of finite values."""
        amax = float(x.abs().max())
        if self.bound == 0.0:
            self.bound = amax if amax > 0.0 else 1.0
        while amax > self.bound:
            self._double()
        last = self.bins_per_side - 1
        for side, values in ((self.pos, x[x >= 0]), (self.neg, -x[x < 0])):
            if values.numel():
                idx = (values / self.width).floor().long().clamp_(0, last)
                side += torch.bincount(idx, minlength=self.bins_per_side).double()

    def signed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [2F], left edges [2F])`` from ``-bound`` to ``bound``, float64."""
        f = self.bins_per_side
        counts = torch.cat([self.neg.flip(0), self.pos])
        left = torch.arange(-f, f, dtype=torch.float64) * self.width
        return counts, left

    def absolute(self) -> torch.Tensor:
        """Counts of ``|x|`` ``[F]`` over ``[0, bound]``, float64."""
        return self.pos + self.neg


class HistogramObserver(Observer):
    """Base for observers that choose the range from a :class:`SymmetricHistogram`."""

    def __init__(self, bins_per_side: int = 16384) -> None:
        super().__init__()
        self.histogram = SymmetricHistogram(bins_per_side)

    def _observe(self, x: torch.Tensor) -> None:
        self.histogram.update(x)


def _quantile(counts: torch.Tensor, left: torch.Tensor, width: float, q: float) -> float:
    """Value below which a fraction ``q`` of the histogram lies (linear within a bin)."""
    cdf = counts.cumsum(0)
    target = q * float(cdf[-1])
    k = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).clamp(
        max=len(cdf) - 1))
    before = float(cdf[k - 1]) if k > 0 else 0.0
    inside = float(counts[k])
    frac = (target - before) / inside if inside > 0 else 1.0
    return float(left[k]) + width * min(max(frac, 0.0), 1.0)


@register_observer
class PercentileObserver(HistogramObserver):
    """Clip to the ``percentile``-th value at the top and ``100 - percentile``-th at the bottom.

    Read off the histogram (resolution ``bound / bins_per_side``), then clamped into the exact
    observed ``[min, max]``.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins_per_side: int = 16384) -> None:
        super().__init__(bins_per_side)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile={percentile!r}; allowed: 50 < percentile <= 100")
        self.percentile = float(percentile)

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        counts, left = self.histogram.signed()
        w = self.histogram.width
        q = self.percentile / 100.0
        lo = _quantile(counts, left, w, 1.0 - q)
        hi = _quantile(counts, left, w, q)
        lo = min(max(lo, self.min_val), self.max_val)
        hi = min(max(hi, self.min_val), self.max_val)
        return lo, hi


@register_observer
class MSEObserver(HistogramObserver):
    """The clipping range ``r * [min, max]`` that minimises the fake-quantization MSE.

    The error of each candidate ratio ``r`` is measured with the spec's own ``fake_quantize`` on
    the histogram's bin centres weighted by their counts: a coarse grid of ``grid`` ratios in
    ``(0, 1]``, then a fine grid of ``grid`` ratios around the best coarse one.
    """

    name = "mse"

    def __init__(self, grid: int = 100, bins_per_side: int = 16384) -> None:
        super().__init__(bins_per_side)
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid={grid!r}; allowed: an int >= 2")
        self.grid = grid

    def errors(self, spec: QuantSpec, ratios: torch.Tensor) -> torch.Tensor:
        """Count-weighted squared fake-quantization error ``[len(ratios)]`` of each ratio."""
        counts, left = self.histogram.signed()
        used = counts > 0
        centres = (left[used] + self.histogram.width / 2).float()
        weights = counts[used]
        row_spec = spec.replace(granularity="channel", axis=0)  # one candidate range per row
        out = []
        for chunk in ratios.split(max(1, 4_000_000 // max(len(centres), 1))):
            n = len(chunk)
            lo = (self.min_val * chunk).float().reshape(n, 1)
            hi = (self.max_val * chunk).float().reshape(n, 1)
            qp = qparams_from_range(lo, hi, row_spec)
            x = centres.expand(n, -1).contiguous()
            err = (fake_quantize(x, row_spec, qp) - x).double().square()
            out.append(err @ weights)
        return torch.cat(out)

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        coarse = torch.linspace(1.0 / self.grid, 1.0, self.grid, dtype=torch.float64)
        best = float(coarse[int(self.errors(spec, coarse).argmin())])
        step = 1.0 / self.grid
        fine = torch.linspace(max(best - step, step / self.grid), min(best + step, 1.0),
                              self.grid, dtype=torch.float64)
        candidates = torch.cat([fine, torch.tensor([best], dtype=torch.float64)])
        r = float(candidates[int(self.errors(spec, candidates).argmin())])
        return self.min_val * r, self.max_val * r
