"""Entropy (KL) calibration, as TensorRT's int8 calibrator describes it.

Histogram ``|x|`` into ``bins`` bins over ``[0, max |x|]`` (pooled from the observer's finer
histogram, so the top edge is within ``1.25 * max |x|`` with the default sizes). For every
candidate threshold of ``i`` bins (``levels <= i <= bins``): P is the first ``i`` bins with all
the clipped mass added to bin ``i - 1``; Q merges the first ``i`` bins *without* the clipped mass
into ``levels`` chunks and spreads each chunk's mass evenly over the bins where P is non-zero.
Both are normalised and the threshold minimises KL(P || Q). Where P has mass and Q none (clipped
mass landing in an empty chunk) the divergence is infinite, so such a candidate is never chosen;
no smoothing epsilon.
"""

from __future__ import annotations

import math

import torch

from lowbit.observers.base import register_observer
from lowbit.observers.histogram import HistogramObserver
from lowbit.spec import QuantSpec


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * v.clamp(min=1e-300).log(), torch.zeros((), dtype=v.dtype))


def kl_divergences(hist: torch.Tensor, levels: int, kept: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) ``[n]`` for each candidate number of kept bins ``kept`` (long ``[n]``, each in
    ``[levels, len(hist)]``); ``hist`` is ``[B]`` counts. ``inf`` where P has mass that Q cannot
    represent (the clipped mass lands in an empty chunk).

    Q is constant on the non-empty bins of a chunk, so each chunk's terms reduce to prefix-sum
    differences: ``O(n * levels)`` work instead of ``O(n * B)``.
    """
    h = hist.double()
    total = float(h.sum())
    zero = torch.zeros(1, dtype=torch.float64)
    mass_before = torch.cat([zero, h.cumsum(0)])  # [B + 1]: sum of h[:k]
    filled_before = torch.cat([zero, (h > 0).double().cumsum(0)])
    plogp_before = torch.cat([zero, _xlogx(h).cumsum(0)])
    kept = kept.long()
    width = kept // levels  # bins per chunk; the last chunk also takes the remainder
    c = torch.arange(levels)
    start = c[None, :] * width[:, None]
    end = torch.where(c[None, :] == levels - 1, kept[:, None], start + width[:, None])
    mass = mass_before[end] - mass_before[start]  # chunk mass of the unclipped slice (Q)
    clipped = total - mass_before[kept]
    last = h[kept - 1]
    p_last = last + clipped
    p_mass = mass.clone()
    p_mass[:, -1] += clipped
    filled = filled_before[end] - filled_before[start]
    filled[:, -1] += (p_last > 0).double() - (last > 0).double()
    plogp = plogp_before[kept - 1] + _xlogx(p_last)
    q_level = mass / filled.clamp(min=1.0)
    cross = torch.where(p_mass > 0, p_mass * q_level.log(), torch.zeros((), dtype=h.dtype))
    q_total = mass_before[kept]
    return (plogp - cross.sum(1)) / total + (q_total / total).log()


def kl_threshold_bins(hist: torch.Tensor, levels: int = 128, chunk: int = 512) -> int:
    """Number of bins of ``hist`` to keep (the threshold is that many bin widths); ties go to
    the widest range."""
    bins = hist.numel()
    if bins <= levels or float(hist.sum()) == 0.0:
        return bins
    candidates = torch.arange(levels, bins + 1)
    kl = torch.cat([kl_divergences(hist, levels, c) for c in candidates.split(chunk)])
    best = torch.nonzero(kl <= kl.min()).max()
    return int(candidates[best])


@register_observer
class KLObserver(HistogramObserver):
    """Entropy calibration: the symmetric threshold ``t`` minimising KL(P || Q) (module doc).

    ``levels`` defaults to ``2 ** (bits - 1)`` of the spec (128 for 8 bits). The range is
    ``[max(min, -t), min(max, t)]``.
    """

    name = "kl"

    def __init__(
        self, bins: int = 2048, levels: int | None = None, bins_per_side: int = 16384
    ) -> None:
        super().__init__(bins_per_side)
        if not isinstance(bins, int) or bins < 2 or bins_per_side % bins:
            raise ValueError(f"bins={bins!r}; allowed: an int >= 2 dividing {bins_per_side}")
        if levels is not None and (not isinstance(levels, int) or not 2 <= levels <= bins):
            raise ValueError(f"levels={levels!r}; allowed: None or an int in 2..{bins}")
        self.bins = bins
        self.levels = levels

    def threshold(self, spec: QuantSpec) -> float:
        """The chosen clipping threshold ``t`` on ``|x|``."""
        fine = self.histogram.absolute()
        last = int(torch.nonzero(fine).max()) if bool((fine > 0).any()) else 0
        pool = max(1, math.ceil((last + 1) / self.bins))  # fine bins per KL bin
        hist = fine[: pool * self.bins].reshape(self.bins, pool).sum(1)
        levels = self.levels if self.levels is not None else min(1 << (spec.bits - 1), self.bins)
        kept = kl_threshold_bins(hist, levels)
        return kept * pool * self.histogram.width

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        t = self.threshold(spec)
        return max(self.min_val, -t), min(self.max_val, t)
