"""GPTQ's clipping-range search (``clip_grid``) and its hyper-parameter checks."""

import pytest
import torch

from lowbit.algorithms import GPTQ, RTN, LayerStats
from lowbit.quant.maps import choose_qparams, fake_quantize
from lowbit.spec import preset
from lowbit.tensor import QuantizedTensor


def _heavy_tailed(rows: int = 32, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Student-t weights: a few large values per group stretch min-max ranges."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def _group_errors(w: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, group: int):
    d = (w - q).pow(2) * weight
    return d.reshape(w.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("name", ["w3g128", "w2g64", "w4g128"])
@pytest.mark.parametrize("clip_weight", ["hessian", "uniform"])
def test_clip_search_never_increases_a_groups_weight_error(name, clip_weight):
    torch.manual_seed(0)
    spec = preset(name)
    w = _heavy_tailed()
    col_weight = torch.rand(w.shape[1]) + 0.1 if clip_weight == "hessian" else torch.ones(256)
    searched = GPTQ(clip_grid=20, clip_weight=clip_weight)._qparams(w, spec, col_weight)
    plain = choose_qparams(w, spec)
    e_search = _group_errors(w, fake_quantize(w, spec, searched), col_weight, spec.group_size)
    e_plain = _group_errors(w, fake_quantize(w, spec, plain), col_weight, spec.group_size)
    assert (e_search <= e_plain).all()
    assert (e_search < e_plain).float().mean() > 0.5  # heavy tails: most groups gain
    # clip_grid=0 is plain min-max
    same = GPTQ(clip_grid=0)._qparams(w, spec, col_weight)
    assert torch.equal(same.scale, plain.scale) and torch.equal(same.zero_point, plain.zero_point)


@pytest.fixture
def heavy_layer():
    """Heavy-tailed weights, inputs near a 24-dim subspace (room for error feedback)."""
    torch.manual_seed(0)
    w = _heavy_tailed(48, 256)
    x = torch.randn(2048, 24) @ torch.randn(24, 256) + 0.05 * torch.randn(2048, 256)
    stats = LayerStats()
    stats.update(x)
    return w, x, stats


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", ["w3g128", "w2g64"])
def test_gptq_with_clip_search_beats_plain_gptq_and_rtn(heavy_layer, name, static):
    w, x, stats = heavy_layer
    spec = preset(name)

    def out_err(algo) -> float:
        q = algo.quantize_weight(w, spec, stats).dequantize(torch.float32)
        return float((x @ (w - q).t()).norm())

    searched = out_err(GPTQ(clip_grid=20, static_groups=static))
    assert searched < out_err(GPTQ(clip_grid=0, static_groups=static))
    assert searched < out_err(RTN())


def test_clip_search_result_is_on_the_grid_bit_for_bit(heavy_layer):
    w, _, stats = heavy_layer
    for algo in (GPTQ(clip_grid=10), GPTQ(clip_grid=10, static_groups=True, act_order=True)):
        qt = algo.quantize_weight(w, preset("w3g128"), stats)
        deq = qt.dequantize()
        # the searched qparams are the stored ones: re-quantizing with them is the identity
        again = QuantizedTensor.from_float(deq, qt.spec, qt.qparams)
        assert torch.equal(again.qdata, qt.qdata)
        assert torch.equal(fake_quantize(deq, qt.spec, qt.qparams), deq)


def test_clip_search_hyper_parameters_are_checked():
    with pytest.raises(ValueError, match="clip_grid=-1"):
        GPTQ(clip_grid=-1)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="max_shrink"):
            GPTQ(max_shrink=bad)
    with pytest.raises(ValueError, match="clip_weight='l1'"):
        GPTQ(clip_weight="l1")


@pytest.mark.parametrize("chunk", [1 << 22, 5000])
def test_clip_search_equals_trying_each_ratio_in_turn(monkeypatch, chunk):
    """The batched search picks, per group, the ratio a plain loop over the grid keeps (the
    first strictly better one), also when the ratios go in several batches."""
    import lowbit.algorithms.gptq as gptq_module
    from lowbit.quant.maps import keep_better

    monkeypatch.setattr(gptq_module, "SEARCH_ELEMENTS", chunk)
    spec = preset("w3g128")
    w = _heavy_tailed(16, 256, seed=3)
    col_weight = torch.rand(256) + 0.5
    algo = GPTQ(clip_grid=8, max_shrink=0.3)
    got = algo._qparams(w, spec, col_weight)

    def errors(qp):
        return _group_errors(w, fake_quantize(w, spec, qp), col_weight, 128)

    best = choose_qparams(w, spec)
    best_err = errors(best)
    for i in range(1, 9):
        qp = choose_qparams(w, spec.replace(clip_ratio=1 - 0.3 * i / 8))
        best_err = keep_better(best, best_err, qp, errors(qp))
    assert torch.equal(got.scale, best.scale) and torch.equal(got.zero_point, best.zero_point)


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w2g64", "w8"])
@pytest.mark.parametrize("kw", [{}, {"act_order": True}, {"clip_grid": 0}])
def test_stacked_weights_equal_one_by_one(heavy_layer, name, kw):
    """q/k/v share one Hessian: one stacked column loop gives each weight's own result."""
    w, _, stats = heavy_layer
    parts = [w[:16], w[16:48] * 2]
    algo, spec = GPTQ(**kw), preset(name)
    stacked = algo.quantize_weights(parts, spec, stats)
    for got, part in zip(stacked, parts, strict=True):
        alone = algo.quantize_weight(part, spec, stats)
        assert got.shape == alone.shape
        assert torch.equal(got.dequantize(), alone.dequantize())


@pytest.mark.parametrize("group, block", [(64, 96), (128, 96), (64, 40)])
def test_lazy_batch_width_does_not_change_the_result(group, block):
    """Lazy batch updates are exact: groups that straddle a block boundary take the block's
    pending updates into their qparams, so the block width changes nothing but rounding."""
    torch.manual_seed(0)
    cols = 256
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols) / cols**0.5
    x = (torch.randn(2048, cols) @ mix) * torch.linspace(0.2, 3, cols)[torch.randperm(cols)]
    stats = LayerStats()
    stats.update(x)
    weight = torch.randn(32, cols)
    spec = preset("w3g128").replace(group_size=group)
    codes = [GPTQ(clip_grid=0, block=b).quantize_weight(weight, spec, stats).int_repr()
             for b in (128, block)]
    assert (codes[0] == codes[1]).float().mean() > 0.99
