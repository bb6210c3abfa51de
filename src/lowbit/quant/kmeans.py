"""1-D k-means (Lloyd) codebooks, fitted for many blocks at once (palettization)."""

from __future__ import annotations

import torch


def fit_codebooks(xb: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """Fit a sorted ``k``-entry codebook to each block.

    xb: ``[..., n]`` float32 values, one block per leading index. Returns ``[..., k]`` sorted
    ascending. Initialised at the k quantile midpoints (deterministic), then Lloyd iterations.

    In one dimension the clusters of sorted values are contiguous runs, so each iteration only
    finds ``k - 1`` boundaries by binary search and takes cluster sums from a prefix sum:
    O(k log n) per block instead of O(n). An empty cluster (quantiles that coincide, e.g. on a
    few repeated values) moves to the largest value of the cluster with the largest squared
    error, so a block with at most k distinct values ends with all of them.
    """
    if k < 1:
        raise ValueError(f"k={k}; a codebook needs at least one entry")
    lead, n = xb.shape[:-1], xb.shape[-1]
    sorted_x = xb.reshape(-1, n).float().sort(-1).values.contiguous()
    rows = sorted_x.shape[0]
    prefix = torch.zeros(rows, n + 1, dtype=torch.float64)
    prefix[:, 1:] = sorted_x.double().cumsum(-1)
    prefix2 = torch.zeros(rows, n + 1, dtype=torch.float64)  # of squares: cluster SSE
    prefix2[:, 1:] = sorted_x.double().square().cumsum(-1)
    probs = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    centroids = sorted_x[:, (probs * (n - 1)).round().long()]
    edges_lo = torch.zeros(rows, 1, dtype=torch.long)
    edges_hi = torch.full((rows, 1), n, dtype=torch.long)
    for _ in range(iters):
        mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        # Values equal to a midpoint go to the lower cluster, as in the final assignment.
        cuts = torch.searchsorted(sorted_x, mids, right=True)
        lo = torch.cat([edges_lo, cuts], 1)
        hi = torch.cat([cuts, edges_hi], 1)
        counts = (hi - lo).double()
        sums = prefix.gather(1, hi) - prefix.gather(1, lo)
        means = (sums / counts.clamp(min=1)).float()
        updated = torch.where(counts > 0, means, centroids)
        if bool((counts == 0).any()):
            sse = prefix2.gather(1, hi) - prefix2.gather(1, lo) - sums**2 / counts.clamp(min=1)
            _reseed_empty(updated, counts, sse, sorted_x, hi)
        updated = updated.sort(-1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.reshape(*lead, k)


def _reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, sse: torch.Tensor,
                  sorted_x: torch.Tensor, hi: torch.Tensor) -> None:
    """In place: each empty cluster's centroid becomes the largest value of the cluster with the
    largest squared error (rows with empty clusters are rare: a Python loop over them)."""
    for r in (counts == 0).any(1).nonzero()[:, 0].tolist():
        row_sse = sse[r].clone()
        for j in (counts[r] == 0).nonzero()[:, 0].tolist():
            c = int(row_sse.argmax())
            if row_sse[c] <= 0:  # no cluster holds two distinct values: nothing to split
                break
            centroids[r, j] = sorted_x[r, int(hi[r, c]) - 1]
            row_sse[c] = 0
