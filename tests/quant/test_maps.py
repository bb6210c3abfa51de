import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import choose_qparams, dequantize, fake_quantize, layout_for, quantize
from lowbit.spec import QuantSpec, preset
from lowbit.tensor import QuantizedTensor


@st.composite
def affine_specs(draw):
    symmetric = draw(st.booleans())
    return QuantSpec(
        format=draw(st.sampled_from([f"{p}{b}" for p in ("int", "uint") for b in range(2, 9)])),
        granularity=draw(st.sampled_from(["tensor", "channel", "group", "block"])),
        group_size=draw(st.sampled_from([4, 8, 16])),
        block=draw(st.sampled_from([(2, 4), (1, 8), (4, 4)])),
        symmetric=symmetric,
        full_range=symmetric and draw(st.booleans()),
        zero_point=draw(st.sampled_from(["int", "float"])),
        scale_dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        zero_dtype=draw(st.sampled_from(["float32", "float16"])),
    )


def _tensor(seed, shape=(8, 32), heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if heavy:
        x = x / torch.rand(shape, generator=g).clamp(min=0.05)
    return x


def _expanded(param, layout):
    nr, nc = layout.n_blocks
    p = param.float().reshape(nr, 1, nc, 1).expand(nr, layout.block_rows, nc, layout.block_cols)
    return layout.from_2d(p.reshape(layout.rows, layout.cols))


@settings(max_examples=80, deadline=None)
@given(spec=affine_specs(), seed=st.integers(0, 1000), heavy=st.booleans())
def test_fake_quantize_equals_dequantize_of_packed(spec, seed, heavy):
    x = _tensor(seed, heavy=heavy)
    qt = QuantizedTensor.from_float(x, spec)
    assert torch.equal(qt.dequantize(), fake_quantize(x, spec))


@settings(max_examples=80, deadline=None)
@given(spec=affine_specs(), seed=st.integers(0, 1000))
def test_error_at_most_half_a_step_inside_the_range(spec, seed):
    x = _tensor(seed)
    codes, qp, layout = quantize(x, spec)
    err = (x - dequantize(codes, qp, spec, layout)).abs()
    step = _expanded(qp.scale, layout).abs()  # full-range scales may be negative
    # Inside the clip range (no saturation) the error is at most half a step; the float zero-point
    # of a reduced-precision dtype may push the grid by up to half a step of its own rounding.
    slack = 1e-5 * x.abs() + 1e-6
    if spec.has_zero_point and spec.zero_point == "float" and spec.zero_dtype != "float32":
        zero = _expanded(qp.zero_point, layout)
        slack = slack + step * zero.abs() * 2**-10
    # full range: the side opposite the block's extreme reaches one level less, so a value
    # there is clipped by up to half a step more
    bound = step if spec.full_range else step / 2
    assert bool((err <= bound + slack).all())


@pytest.mark.parametrize("bits", range(2, 9))
def test_in_range_integers_survive_exactly(bits):
    top = (1 << (bits - 1)) - 1
    signed = torch.arange(-top, top + 1, dtype=torch.float32).repeat(3, 1)
    spec = QuantSpec(f"int{bits}", "channel", symmetric=True, scale_dtype="float32")
    assert torch.equal(fake_quantize(signed, spec), signed)
    unsigned = torch.arange(0, 1 << bits, dtype=torch.float32).repeat(3, 1)
    spec = QuantSpec(f"uint{bits}", "channel", scale_dtype="float32")
    assert torch.equal(fake_quantize(unsigned, spec), unsigned)
    qt = QuantizedTensor.from_float(unsigned, spec)
    assert torch.equal(qt.int_repr().float(), unsigned)


@pytest.mark.parametrize("spec", [preset("w4g128-sym"), preset("w4g128"), preset("w8")])
def test_zero_maps_to_zero_exactly(spec):
    x = _tensor(3, (4, 256)) + 0.3  # shifted: asymmetric ranges
    x[:, ::7] = 0.0
    assert bool((fake_quantize(x, spec)[:, ::7] == 0).all())


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(["uint", "int"]),
    bits=st.integers(2, 8),
    zero_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    offset=st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3),
    width=st.floats(1e-9, 1e-3),
    seed=st.integers(0, 1000),
)
def test_float_zero_point_of_narrow_range_far_from_zero_stays_finite(
    fmt, bits, zero_dtype, offset, width, seed
):
    """A near-constant row far from 0 (range/|offset| down to 1e-12) once gave an fp16
    zero-point of -inf and NaN weights; now the step widens so the zero stays resolvable."""
    spec = preset("w8").replace(format=f"{fmt}{bits}", symmetric=False, zero_point="float",
                                zero_dtype=zero_dtype)
    x = offset + width * torch.rand(4, 64, generator=torch.Generator().manual_seed(seed))
    codes, qp, layout = quantize(x, spec)
    zero = qp.zero_point.float()
    assert bool(torch.isfinite(zero).all()) and bool(torch.isfinite(qp.scale.float()).all())
    err = (x - dequantize(codes, qp, spec, layout)).abs()
    step = _expanded(qp.scale, layout)
    # half a step, plus the zero's own rounding in zero_dtype (relative eps / 2)
    eps = torch.finfo(getattr(torch, zero_dtype)).eps
    slack = step * _expanded(zero.abs(), layout) * eps / 2 + 1e-6 * x.abs()
    assert bool((err <= step / 2 + slack + 1e-6 * step).all())


@pytest.mark.parametrize("name", ["w8", "w4g128", "w3g128", "w2g64", "w4g128-sym"])
@pytest.mark.parametrize("value", [0.0, 3.0, -1e-3])
def test_constant_tensor_has_no_division_by_zero(name, value):
    x = torch.full((4, 128), value)
    fq = fake_quantize(x, preset(name))
    assert bool(torch.isfinite(fq).all())
    assert torch.allclose(fq, x, rtol=1e-2, atol=0)  # fp16 scales of tiny ranges are subnormal


def test_1bit_asymmetric_keeps_min_and_max():
    x = torch.tensor([[-2.0, -1.0, 0.6, 3.0]])
    spec = QuantSpec("uint1", "tensor", zero_point="float", scale_dtype="float32",
                     zero_dtype="float32")
    assert fake_quantize(x, spec).tolist() == [[-2.0, -2.0, 3.0, 3.0]]


def test_clip_ratio_shrinks_the_scale():
    x = _tensor(1, (4, 128))
    full = choose_qparams(x, preset("w4g128-sym"))
    clipped = choose_qparams(x, preset("w4g128-sym").replace(clip_ratio=0.8))
    assert torch.allclose(clipped.scale.float(), full.scale.float() * 0.8, rtol=2e-3)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    spec = QuantSpec("int4", "tensor", symmetric=True, rounding="stochastic",
                     scale_dtype="float32")
    x = torch.linspace(-0.9, 0.9, 64).reshape(1, -1)
    x[0, 0] = 7.0  # scale = 1
    qp = choose_qparams(x, spec)
    draws = torch.stack([
        fake_quantize(x, spec, qp, generator=torch.Generator().manual_seed(i)) for i in range(400)
    ])
    assert (draws.mean(0) - x).abs().max() < 0.12
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = QuantizedTensor.from_float(x, spec, generator=g1).dequantize()
    assert torch.equal(a, fake_quantize(x, spec, generator=g2))


def test_granularities_shapes_and_any_channel_axis():
    x = _tensor(2, (6, 4, 8))
    for axis, n in [(0, 6), (1, 4), (2, 8), (-1, 8)]:
        spec = QuantSpec("int8", "channel", axis=axis, symmetric=True)
        qp = choose_qparams(x, spec)
        assert qp.scale.shape == (n, 1)
        # Each slice along the axis has its own absmax.
        amax = x.abs().movedim(axis, 0).reshape(n, -1).amax(1)
        assert torch.allclose(qp.scale.float()[:, 0], amax / 127, rtol=1e-3)
        assert QuantizedTensor.from_float(x, spec).dequantize().shape == x.shape
    assert choose_qparams(x, QuantSpec("uint4", "group", 8)).scale.shape == (6, 4)
    assert choose_qparams(x, QuantSpec("uint4", "tensor")).scale.shape == (1, 1)
    assert choose_qparams(x, QuantSpec("uint4", "block", None, (3, 16))).scale.shape == (2, 2)
    tok = QuantSpec("int8", "token", symmetric=True)
    assert choose_qparams(x, tok).scale.shape == (24, 1)


def test_per_block_scales_cover_their_tiles():
    x = torch.zeros(4, 4)
    x[0, 0], x[3, 3] = 1.0, 10.0
    qp = choose_qparams(x, QuantSpec("int8", "block", None, (2, 2), symmetric=True,
                                     scale_dtype="float32"))
    assert torch.allclose(qp.scale, torch.tensor([[1.0, 0.0], [0.0, 10.0]]) / 127 +
                          torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # empty tiles: scale 1


@pytest.mark.parametrize(
    "x,spec,err,match",
    [
        (torch.tensor([[1.0, float("nan")]]), preset("w8"), ValueError, "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), preset("w8"), ValueError, "NaN/Inf"),
        (torch.zeros(0, 4), preset("w8"), ValueError, "empty"),
        (torch.zeros(4, 100), preset("w4g128"), ValueError, "group_size=128 does not divide"),
        (torch.zeros(4, 8, dtype=torch.int32), preset("w8"), TypeError, "floating-point"),
        (torch.zeros(3, 8), QuantSpec("int8", "block", None, (2, 8), symmetric=True),
         ValueError, "does not tile"),
        (torch.zeros(3, 8), QuantSpec("int8", "channel", axis=2, symmetric=True),
         ValueError, "axis=2"),
    ],
)
def test_bad_input_one_line_errors(x, spec, err, match):
    with pytest.raises(err, match=match) as info:
        fake_quantize(x, spec)
    assert "\n" not in str(info.value)


def test_group_error_suggests_divisors():
    with pytest.raises(ValueError, match=r"e.g. 25, 50, 100"):
        layout_for((4, 100), preset("w4g128"))


def test_bf16_and_fp16_inputs_keep_their_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        x = _tensor(4, (4, 128)).to(dtype)
        fq = fake_quantize(x, preset("w4g128"))
        assert fq.dtype == dtype
        assert torch.equal(QuantizedTensor.from_float(x, "w4g128").dequantize(), fq)


@pytest.mark.parametrize("name", ["nf4g64", "w4g64", "w2g64"])
def test_a_scale_beyond_the_stored_dtype_is_refused_not_clamped(name):
    x = torch.randn(4, 64)
    x[0, 0] = 1e6  # fp16 scales top out at 65504: a clamped scale would clip this block
    with pytest.raises(ValueError, match="beyond torch.float16's largest value.*float32"):
        choose_qparams(x, preset(name))
    wide = preset(name).replace(scale_dtype="float32")
    assert fake_quantize(x, wide)[0, 0] == pytest.approx(1e6, rel=0.01)


def test_values_float32_cannot_hold_and_codebooks_fp16_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="beyond float32's range"):
        choose_qparams(torch.tensor([[1e300] + [1.0] * 63], dtype=torch.float64), preset("w8"))
    with pytest.raises(ValueError, match="codebook entry.*float16"):
        choose_qparams(torch.full((4, 64), 7e4), QuantSpec(format="kmeans4",
                                                           granularity="channel"))


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 1000),
       flip=st.booleans())
def test_full_range_puts_each_blocks_extreme_on_the_lowest_level(bits, signed, seed, flip):
    spec = QuantSpec(format=f"{'int' if signed else 'uint'}{bits}", granularity="group",
                     group_size=16, symmetric=True, full_range=True)
    x = _tensor(seed, (6, 64)) * (-1 if flip else 1)
    qt = QuantizedTensor.from_float(x, spec)
    blocks = x.reshape(6, 4, 16)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    codes = qt.codes().reshape(6, 4, 16).gather(-1, blocks.abs().argmax(-1, keepdim=True))
    assert bool((codes == 0).all())  # stored q - qmin: the lowest level
    scale = qt.scale.float().unsqueeze(-1)
    assert torch.equal(scale < 0, extreme > 0)  # the scale takes the extreme's sign, flipped
    back = qt.dequantize().reshape(6, 4, 16).gather(-1, blocks.abs().argmax(-1, keepdim=True))
    assert torch.allclose(back, extreme, rtol=2e-3)  # up to the fp16 scale's rounding


@pytest.mark.parametrize("bits, at_most", [(2, 0.45), (3, 0.8), (4, 0.9)])
def test_full_range_lowers_the_error_of_gaussian_weights(bits, at_most):
    """2**b levels instead of 2**b - 1: the step shrinks by (2**(b-1) - 1) / 2**(b-1)."""
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    absmax = QuantSpec(format=f"int{bits}", granularity="group", group_size=32, symmetric=True)
    errors = [(fake_quantize(x, s) - x).pow(2).mean() for s in
              (absmax, absmax.replace(full_range=True))]
    assert errors[1] < at_most * errors[0]


def test_full_range_on_a_constant_or_zero_block_is_exact():
    for value in (0.0, 2.5, -2.5):
        x = torch.full((4, 32), value)
        assert torch.equal(fake_quantize(x, preset("q4_0")), x)
