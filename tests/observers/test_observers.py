import math

import pytest
import torch

from lowbit.observers import (
    OBSERVERS,
    SymmetricHistogram,
    get_observer,
    kl_divergences,
)
from lowbit.quant import fake_quantize, qparams_from_range
from lowbit.spec import QuantSpec

INT8_TENSOR = QuantSpec(format="int8", granularity="tensor", symmetric=True,
                        scale_dtype="float32")
UINT8_ASYM = QuantSpec(format="uint8", granularity="tensor", symmetric=False,
                       scale_dtype="float32", zero_dtype="float32")


def gaussian_with_outliers(n=100_000, n_out=10, size=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:n_out] = torch.tensor([size, -size * 0.9]).repeat(n_out)[:n_out]
    return x, x[n_out:]


def observe(name, x, chunks=4, **kw):
    obs = get_observer(name, **kw)
    for part in x.split(math.ceil(len(x) / chunks)):
        obs.update(part.reshape(-1, 10))  # any shape
    return obs


def bulk_mse(obs, bulk, spec=INT8_TENSOR):
    return float((fake_quantize(bulk, spec, obs.qparams(spec)) - bulk).square().mean())


def test_registry_names_and_errors():
    assert {"minmax", "moving_average", "percentile", "mse", "kl"} <= set(OBSERVERS)
    with pytest.raises(ValueError, match="unknown observer 'nope'; allowed: .*minmax"):
        get_observer("nope")
    with pytest.raises(TypeError, match="observer 'minmax'"):
        get_observer("minmax", momentum=0.1)
    with pytest.raises(ValueError, match="momentum"):
        get_observer("moving_average", momentum=0.0)
    with pytest.raises(ValueError, match="percentile"):
        get_observer("percentile", percentile=101)


def test_minmax_covers_every_value():
    x, _ = gaussian_with_outliers()
    obs = observe("minmax", x)
    assert obs.clip_range(INT8_TENSOR) == (float(x.min()), float(x.max()))
    qp = obs.qparams(INT8_TENSOR)
    assert qp.scale.shape == (1, 1) and qp.scale.dtype == torch.float32
    err = (fake_quantize(x, INT8_TENSOR, qp) - x).abs().max()
    assert err <= float(qp.scale) / 2 + 1e-6


@pytest.mark.parametrize("name", ["percentile", "kl"])
def test_clipping_observers_beat_minmax_on_the_bulk(name):
    x, bulk = gaussian_with_outliers()
    obs = observe(name, x)
    lo, hi = obs.clip_range(INT8_TENSOR)
    assert 2.5 < hi < 10 and -10 < lo < -2.5  # the outliers at +-40 are clipped
    assert bulk_mse(obs, bulk) < bulk_mse(observe("minmax", x), bulk) / 10


def test_percentile_is_close_to_exact_quantile():
    x, _ = gaussian_with_outliers()
    obs = observe("percentile", x, percentile=99.9)
    lo, hi = obs.clip_range(INT8_TENSOR)
    assert abs(hi - float(torch.quantile(x, 0.999))) < 0.02
    assert abs(lo - float(torch.quantile(x, 0.001))) < 0.02


def _total_sq_error(x, lo, hi, spec=INT8_TENSOR):
    qp = qparams_from_range(torch.tensor([[lo]]), torch.tensor([[hi]]), spec)
    return float((fake_quantize(x, spec, qp) - x).square().sum())


@pytest.mark.parametrize("n_out", [1, 10])
def test_mse_finds_the_range_with_least_error(n_out):
    x, bulk = gaussian_with_outliers(n=100_000, n_out=n_out)
    obs, minmax = observe("mse", x), observe("minmax", x)
    lo, hi = obs.clip_range(INT8_TENSOR)
    brute = min(_total_sq_error(x, float(x.min()) * r, float(x.max()) * r)
                for r in torch.linspace(0.01, 1, 100).tolist())
    chosen = _total_sq_error(x, lo, hi)
    assert chosen <= 1.02 * brute
    assert chosen < _total_sq_error(x, float(x.min()), float(x.max()))
    assert hi < float(x.max())  # it clips
    assert bulk_mse(obs, bulk) < bulk_mse(minmax, bulk)


def test_moving_average_matches_hand_computed_ema():
    obs = get_observer("moving_average", momentum=0.25)
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 6.0]), torch.tensor([0.5, 1.0])]
    for b in batches:
        obs.update(b)
    lo, hi = -1.0, 2.0
    for b in batches[1:]:
        lo = 0.75 * lo + 0.25 * float(b.min())
        hi = 0.75 * hi + 0.25 * float(b.max())
    assert obs.clip_range(INT8_TENSOR) == pytest.approx((lo, hi))
    assert (obs.min_val, obs.max_val) == (-3.0, 6.0)


@pytest.mark.parametrize("name", sorted(["minmax", "moving_average", "percentile", "mse", "kl"]))
def test_qparams_come_from_qparams_from_range(name):
    x = torch.rand(20_000) * 5 - 0.5  # mostly positive: asymmetric uint8 fits
    obs = observe(name, x)
    for spec in (INT8_TENSOR, UINT8_ASYM):
        lo, hi = obs.clip_range(spec)
        expected = qparams_from_range(torch.tensor([[lo]]), torch.tensor([[hi]]), spec)
        got = obs.qparams(spec)
        assert torch.equal(got.scale, expected.scale)
        if spec.has_zero_point:
            assert got.zero_point.shape == (1, 1)
            assert torch.equal(got.zero_point, expected.zero_point)


def test_observer_input_errors():
    obs = get_observer("minmax")
    with pytest.raises(ValueError, match="seen no data"):
        obs.qparams(INT8_TENSOR)
    with pytest.raises(TypeError, match="torch.Tensor"):
        obs.update([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        obs.update(torch.arange(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
    obs.update(torch.randn(10))
    with pytest.raises(ValueError, match="granularity='token'.*granularity='tensor'"):
        obs.qparams(INT8_TENSOR.replace(granularity="token"))
    obs.update(torch.empty(0))  # an empty batch adds nothing
    assert obs.n_elements == 10


def test_histogram_doubling_keeps_counts_exact():
    g = torch.Generator().manual_seed(1)
    # a power-of-two bound keeps every bin edge exact in float32
    small = (torch.randn(5000, generator=g) * 0.3).clamp(-0.99, 0.99)
    large = torch.randn(5000, generator=g) * 9
    grown = SymmetricHistogram(256)
    grown.bound = 1.0
    grown.update(small)
    first_bound = grown.bound
    grown.update(large)
    assert grown.bound > first_bound and math.log2(grown.bound / first_bound).is_integer()
    direct = SymmetricHistogram(256)
    direct.bound = grown.bound
    direct.update(torch.cat([small, large]))
    assert torch.equal(grown.pos, direct.pos) and torch.equal(grown.neg, direct.neg)
    assert float(grown.absolute().sum()) == 10_000


def _kl_direct(h, levels, kept):
    """TensorRT's procedure for one candidate, written out bin by bin."""
    p = h[:kept].clone()
    p[kept - 1] += h[kept:].sum()
    width = kept // levels
    q = torch.zeros(kept, dtype=torch.float64)
    for c in range(levels):
        s, e = c * width, (kept if c == levels - 1 else (c + 1) * width)
        nonzero = p[s:e] > 0
        if nonzero.any():
            q[s:e][nonzero] = h[s:e].sum() / nonzero.sum()
    p, q = p / p.sum(), q / q.sum()
    if bool(((p > 0) & (q == 0)).any()):
        return math.inf
    used = p > 0
    return float((p[used] * (p[used] / q[used]).log()).sum())


def test_vectorised_kl_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    h = torch.randint(0, 6, (300,), generator=g).double()
    h[50:60] = 0
    h[250:298] = 0  # clipped mass can land in an empty chunk -> inf
    kept = torch.arange(16, 301)
    fast = kl_divergences(h, 16, kept)
    slow = torch.tensor([_kl_direct(h, 16, int(k)) for k in kept], dtype=torch.float64)
    assert torch.equal(torch.isinf(fast), torch.isinf(slow)) and bool(torch.isinf(slow).any())
    finite = torch.isfinite(slow)
    assert torch.allclose(fast[finite], slow[finite], atol=1e-12)
