"""Entropy (KL) calibration, as TensorRT's int8 calibrator describes it.

Histogram ``|x|`` into ``bins`` bins over ``[0, max |x|]``. For every candidate threshold of
``i`` bins (``levels <= i <= bins``): P is the first ``i`` bins with all the clipped mass added to
bin ``i - 1``; Q merges the first ``i`` bins *without* the clipped mass into ``levels`` chunks and
spreads each chunk's mass evenly over the bins where P is non-zero. Both are normalised and the
threshold minimises KL(P || Q). Where P has mass and Q none (clipped mass landing in an empty
chunk) the divergence is infinite, so such a candidate is never chosen; no smoothing epsilon.
"""

from __future__ import annotations

import math

import torch

from lowbit.observers.base import register_observer
from lowbit.observers.histogram import HistogramObserver
from lowbit.spec import QuantSpec


def kl_divergences(hist: torch.Tensor, levels: int, kept: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) ``[n]`` for each candidate number of kept bins ``kept`` (long ``[n]``, each in
    ``[levels, len(hist)]``), all candidates at once; ``hist`` is ``[B]`` counts.

    ``inf`` where P has mass that Q cannot represent (the clipped mass lands in an empty chunk).
    """
    h = hist.double()
    total = float(h.sum())
    bins = h.numel()
    n = kept.numel()
    j = torch.arange(bins)
    sliced = torch.where(j[None, :] < kept[:, None], h[None, :], torch.zeros((), dtype=h.dtype))
    clipped = total - h.cumsum(0)[kept - 1]
    p = sliced.clone()
    p[torch.arange(n), kept - 1] += clipped
    chunk = (j[None, :] // (kept // levels)[:, None]).clamp_(max=levels - 1)
    present = (p > 0).double()
    mass = torch.zeros(n, levels, dtype=torch.float64).scatter_add_(1, chunk, sliced)
    filled = torch.zeros(n, levels, dtype=torch.float64).scatter_add_(1, chunk, present)
    q = torch.gather(mass / filled.clamp(min=1.0), 1, chunk) * present
    q = q / (total - clipped).clamp(min=1e-300)[:, None]
    p = p / total
    terms = torch.where(p > 0, p * (p / q).log(), torch.zeros((), dtype=p.dtype))
    return terms.sum(1)


def kl_threshold_bins(hist: torch.Tensor, levels: int = 128, chunk: int = 128) -> int:
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
