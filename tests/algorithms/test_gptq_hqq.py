import pytest
import torch

from lowbit.algorithms import GPTQ, HQQ, RTN, LayerStats, get_algorithm
from lowbit.algorithms.hqq import shrink_lp
from lowbit.quant import fake_quantize, mse
from lowbit.spec import QuantSpec, preset
from lowbit.tensor import QuantizedTensor


@pytest.fixture(scope="module")
def correlated_layer():
    """A layer whose inputs live near a 24-dim subspace: GPTQ's error feedback has room to work."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(256, 24, generator=g)
    x = torch.randn(2048, 24, generator=g) @ mix.t() + 0.05 * torch.randn(2048, 256, generator=g)
    w = torch.randn(64, 256, generator=g) * 0.05
    stats = LayerStats()
    stats.update(x[:1024])
    stats.update(x[1024:])
    return w, x, stats


def output_error(w, x, qt):
    return float(((x @ w.t() - x @ qt.dequantize().t()) ** 2).mean())


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w2g64", "w8", "w4g128-sym"])
@pytest.mark.parametrize(
    "algo", [GPTQ(), GPTQ(act_order=True), GPTQ(act_order=True, static_groups=True)],
    ids=["plain", "act-order", "static-groups"],
)
def test_gptq_beats_rtn_on_correlated_inputs(correlated_layer, name, algo):
    w, x, stats = correlated_layer
    spec = preset(name)
    rtn = output_error(w, x, RTN().quantize_weight(w, spec))
    qt = algo.quantize_weight(w, spec, stats)
    assert output_error(w, x, qt) < 0.5 * rtn
    static = algo.static_groups if algo.static_groups is not None else spec.bits <= 2
    assert (qt.g_idx is not None) == (algo.act_order and not static
                                       and spec.granularity == "group")


def test_gptq_result_is_on_the_spec_grid_bit_for_bit(correlated_layer):
    w, _, stats = correlated_layer
    for algo in (GPTQ(), GPTQ(act_order=True, static_groups=True)):
        qt = algo.quantize_weight(w, preset("w4g128"), stats)
        deq = qt.dequantize()
        # Re-quantizing GPTQ's output with its own qparams is the identity: same Q everywhere.
        again = QuantizedTensor.from_float(deq, qt.spec, qt.qparams)
        assert torch.equal(again.qdata, qt.qdata)
        assert torch.equal(fake_quantize(deq, qt.spec, qt.qparams), deq)


def test_gptq_act_order_g_idx_round_trips_state_dict(correlated_layer):
    w, _, stats = correlated_layer
    qt = GPTQ(act_order=True).quantize_weight(w, preset("w4g64"), stats)
    assert qt.g_idx.dtype == torch.int32 and qt.g_idx.shape == (256,)
    back = QuantizedTensor.from_state_dict(qt.state_dict(), qt.spec)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_gptq_errors():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="needs calibration"):
        GPTQ().quantize_weight(w, preset("w8"))
    stats = LayerStats()
    stats.update(torch.randn(32, 32))
    with pytest.raises(ValueError, match="does not match in_features=64"):
        GPTQ().quantize_weight(w, preset("w8"), stats)
    with pytest.raises(ValueError, match="affine"):
        s = LayerStats()
        s.update(torch.randn(32, 64))
        GPTQ().quantize_weight(w, preset("nf4g64"), s)
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=0)


def test_gptq_raises_damping_for_a_singular_hessian():
    stats = LayerStats()
    x = torch.zeros(16, 64)
    x[:, 0] = 1.0  # rank one
    stats.update(x)
    qt = GPTQ(damp=1e-9).quantize_weight(torch.randn(8, 64), preset("w8"), stats)
    assert torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize(
    "spec",
    [preset("w4g128"), preset("w3g128"), preset("w2g64"), preset("w4g128-sym"), preset("w8"),
     QuantSpec("int3", "group", 64, symmetric=True, full_range=True),
     QuantSpec("uint4", "group", 64, zero_point="float"), QuantSpec("uint3", "channel")],
    ids=str,
)
def test_hqq_never_increases_weight_error(spec):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.003] *= 12  # outliers
    qt = HQQ().quantize_weight(w, spec)
    rtn = RTN().quantize_weight(w, spec)
    blocks_hqq = ((w - qt.dequantize()) ** 2).reshape(128, -1)
    blocks_rtn = ((w - rtn.dequantize()) ** 2).reshape(128, -1)
    assert float(blocks_hqq.sum()) <= float(blocks_rtn.sum())
    if spec.bits <= 3:
        assert mse(w, qt.dequantize()) < 0.9 * mse(w, rtn.dequantize())


def test_shrink_lp_is_the_proximal_step():
    x = torch.tensor([-2.0, -0.01, 0.0, 0.5, 3.0])
    out = shrink_lp(x, beta=10.0, p=0.7)
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12) ** -0.3 / 10)
    assert torch.equal(out, expected)
    assert out[1] == 0 and abs(out[4]) < 3.0


def test_registry():
    assert isinstance(get_algorithm("gptq"), GPTQ)
    assert get_algorithm("gptq-act-order").act_order
    algo = HQQ(iters=3)
    assert get_algorithm(algo) is algo
    with pytest.raises(ValueError, match="allowed: rtn, gptq, hqq"):
        get_algorithm("magic")
