import torch

from lowbit.formats import NF4_VALUES, pow2_values
from lowbit.quant import choose_qparams, fake_quantize, mse
from lowbit.spec import QuantSpec, preset
from lowbit.tensor import QuantizedTensor


def test_fp8_grid_equals_torch_cast_of_the_scaled_tensor():
    w = torch.randn(64, 256) * 3
    spec = preset("fp8")
    scale = choose_qparams(w, spec).scale.float()  # [64, 1], absmax / 448
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quantize(w, spec), expected)
    e5m2 = QuantSpec("fp8_e5m2", "tensor", symmetric=True, scale_dtype="float32")
    s = choose_qparams(w, e5m2).scale.float()
    assert torch.equal(fake_quantize(w, e5m2), (w / s).to(torch.float8_e5m2).float() * s)


def test_nf4_values_times_absmax():
    w = torch.randn(8, 64)
    fq = fake_quantize(w, preset("nf4g64"))
    absmax = w.abs().amax(1, keepdim=True)
    grid = torch.tensor(NF4_VALUES)
    ratios = fq / choose_qparams(w, preset("nf4g64")).scale.float()
    assert bool(torch.isclose(ratios.unsqueeze(-1), grid, atol=1e-6).any(-1).all())
    # the group's absmax itself is exact up to the fp16 scale
    assert torch.allclose(fq.abs().amax(1, keepdim=True), absmax, rtol=1e-3)


def test_nf4_picks_the_nearest_entry():
    x = torch.tensor([[1.0, 0.5, -0.2, 0.0]])
    fq = fake_quantize(x, QuantSpec("nf4", "tensor", symmetric=True, scale_dtype="float32"))
    grid = torch.tensor(NF4_VALUES)
    nearest = grid[(x.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.equal(fq, nearest)


def test_pow2_grid_is_powers_of_two():
    x = torch.randn(4, 64)
    spec = QuantSpec("pow2_4", "channel", symmetric=True, scale_dtype="float32")
    fq = fake_quantize(x, spec)
    scale = x.abs().amax(1, keepdim=True)
    mags = (fq / scale).abs()
    nonzero = mags[mags > 0]
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())
    assert len(pow2_values(4)) == 16


def test_kmeans_recovers_few_levels_whose_quantiles_coincide():
    """100 of 128 values on one level: the quantile initialisation puts three of four
    centroids there; the empty clusters must move to the levels left uncovered."""
    row = torch.tensor([-3.0] * 100 + [-0.5] * 20 + [0.25] * 4 + [4.0] * 4)
    x = torch.stack([row, row.flip(0), -row])
    spec = QuantSpec("kmeans2", "channel", scale_dtype="float32")
    assert torch.equal(fake_quantize(x, spec), x)


def test_kmeans_is_exact_when_levels_suffice_and_beats_uniform():
    torch.manual_seed(59)  # a draw whose quantile initialisation left a level uncovered
    levels = torch.tensor([-3.0, -0.5, 0.25, 4.0])
    x = levels[torch.randint(0, 4, (16, 128))]
    spec = QuantSpec("kmeans2", "channel", scale_dtype="float32")
    assert torch.equal(fake_quantize(x, spec), x)
    w = torch.randn(64, 256)
    km = fake_quantize(w, QuantSpec("kmeans3", "channel", scale_dtype="float32"))
    uni = fake_quantize(w, QuantSpec("uint3", "channel", scale_dtype="float32"))
    assert mse(w, km) < mse(w, uni)


def test_kmeans_per_tensor_and_per_group_codebooks():
    w = torch.randn(16, 128)
    per_tensor = QuantizedTensor.from_float(w, QuantSpec("kmeans3", "tensor"))
    assert per_tensor.codebook.shape == (1, 1, 8)
    per_group = QuantizedTensor.from_float(w, QuantSpec("kmeans3", "group", 64))
    assert per_group.codebook.shape == (16, 2, 8)
    assert per_group.nbytes == 16 * 128 * 3 // 8 + 16 * 2 * 8 * 2
    assert mse(w, per_group.dequantize()) < mse(w, per_tensor.dequantize())


def test_codebook_state_dict_round_trip():
    w = torch.randn(8, 64)
    for name in ("nf4g64", "km4", "fp4g32", "fp8"):
        qt = QuantizedTensor.from_float(w, name)
        back = QuantizedTensor.from_state_dict(qt.state_dict(), qt.spec)
        assert torch.equal(back.dequantize(), qt.dequantize())


def test_quantization_and_inspect_pick_the_same_codebook_entry_at_midpoints():
    from lowbit.formats.codebooks import NF4
    from lowbit.formats.inspect import explain
    from lowbit.quant import quantize
    from lowbit.quant.maps import QParams

    values = torch.tensor(NF4.values, dtype=torch.float32)
    mids = (values[1:] + values[:-1]) / 2  # ties, up to float32 rounding
    spec = QuantSpec("nf4", "tensor", symmetric=True, scale_dtype="float32")
    codes, _, _ = quantize(mids.reshape(1, -1), spec, QParams(scale=torch.ones(1, 1)))
    assert [explain(m, "nf4").code for m in mids.tolist()] == codes[0].tolist()
