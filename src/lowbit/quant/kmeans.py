"""1-D k-means (Lloyd) codebooks, fitted for many blocks at once (palettization)."""

from __future__ import annotations

import torch


def fit_codebooks(xb: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Fit a sorted ``k``-entry codebook to each block.

    xb: ``[..., n]`` float32 values, one block per leading index. Returns ``[..., k]`` sorted
    ascending. Initialised at the k quantile midpoints (deterministic), then Lloyd iterations;
    an empty cluster keeps its previous centroid.
    """
    if k < 1:
        raise ValueError(f"k={k}; a codebook needs at least one entry")
    lead, n = xb.shape[:-1], xb.shape[-1]
    flat = xb.reshape(-1, n).float()
    probs = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    sorted_x = flat.sort(-1).values
    idx = (probs * (n - 1)).round().long()
    centroids = sorted_x[:, idx].contiguous()
    for _ in range(iters):
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        assign = torch.searchsorted(mids.contiguous(), flat.contiguous())
        sums = torch.zeros_like(centroids).scatter_add_(1, assign, flat)
        counts = torch.zeros_like(centroids).scatter_add_(1, assign, torch.ones_like(flat))
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        updated = updated.sort(-1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.reshape(*lead, k)
