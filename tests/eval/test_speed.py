"""latency / weight_bytes / peak_rss: bookkeeping checks (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.eval.speed import latency, peak_rss, weight_bytes


def test_latency_calls_warmup_plus_repeats_and_returns_median() -> None:
    calls = []
    seconds = latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and seconds >= 0.0
    with pytest.raises(ValueError, match="repeats"):
        latency(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        latency(lambda: None, warmup=-1)


def test_weight_bytes_counts_params_buffers_and_ties_once() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100, bias=True),
                                torch.nn.BatchNorm1d(100))
    expected = (100 * 16 + 100 * 16 + 100 + 2 * 100) * 4 + 2 * 100 * 4 + 8  # + running stats
    assert weight_bytes(model) == expected
    model[1].weight = model[0].weight  # tied: one storage
    assert weight_bytes(model) == expected - 100 * 16 * 4
    with pytest.raises(TypeError, match="model"):
        weight_bytes("not a model")


def test_weight_bytes_of_quantized_linear_are_packed_bytes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
    q = lowbit.quantize(model, "w4g64")
    qt = q[0].qweight
    # packed uint4 codes + fp16 scale and zero per group + the int64 logical shape
    assert weight_bytes(q) == qt.nbytes + 2 * 8
    assert qt.nbytes == 256 * 64 // 2 + 2 * 2 * 64 * 4


def test_peak_rss_sees_a_large_allocation() -> None:
    size = 200 * 2**20

    def allocate() -> None:
        x = torch.ones(size // 4, dtype=torch.float32)
        x.add_(1)
        del x

    m = peak_rss(allocate)
    assert m.peak >= m.before > 0
    if m.exact:
        assert m.increase >= 0.9 * size
