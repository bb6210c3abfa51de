"""W8A8 kernels: the fbgemm fast path against the exact integer references, and the references
against float math on fake-quantized tensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.kernels import KERNELS, cpu_w8a8, linear, select_kernel
from lowbit.kernels import int8 as int8_kernels
from lowbit.kernels.int8 import int8_fbgemm_linear, int8_reference_linear, quantize_bias
from lowbit.nn.modules import QuantLinear
from lowbit.quant import QParams, fake_quantize
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

needs_engine = pytest.mark.skipif(
    int8_kernels.engine is None, reason="this torch build has no quantized CPU engine"
)
# The fast kernel dispatch picks for dynamic W8A8 on CPU.
DYNAMIC_FAST = "cpu_w8a8" if cpu_w8a8.library() is not None else "int8-fbgemm"

# Every |acc| below stays under 2**24 (K * 128 * 127 < 2**24 for K <= 1032), where float32 holds
# the integer sums exactly; the fast and reference kernels then run the same float32 ops on the
# same integers, so they must agree bit for bit.
SHAPES = [((1, 7), 5), ((3, 77), 33), ((2, 5, 129), 65), ((4, 3, 256), 17), ((16, 1000), 8)]


def _weight(n: int, k: int, spec: str = "w8a8", seed: int = 0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    return QuantizedTensor.from_float(torch.randn(n, k, generator=g), spec)


def _static(qt: QuantizedTensor, x: torch.Tensor, clip: float = 0.8) -> QuantizedTensor:
    """Give a static spec a per-tensor scale that clips the largest inputs (as calibration may)."""
    qt.act_scale = (x.abs().amax() * clip / 127).reshape(1).float()
    return qt


@needs_engine
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("x_shape", "n"), SHAPES)
def test_fast_dynamic_equals_reference(x_shape, n, with_bias):
    torch.manual_seed(1)
    qt = _weight(n, x_shape[-1])
    x = torch.randn(x_shape) * 3
    bias = torch.randn(n) if with_bias else None
    fast = int8_fbgemm_linear(x, qt, bias, {})
    ref = int8_reference_linear(x, qt, bias, {})
    assert fast.shape == (*x_shape[:-1], n) and fast.dtype == torch.float32
    assert torch.equal(fast, ref)


@needs_engine
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(("x_shape", "n"), SHAPES)
def test_fast_static_equals_reference(x_shape, n, with_bias):
    torch.manual_seed(2)
    x = torch.randn(x_shape)
    qt = _static(_weight(n, x_shape[-1], "w8a8-static"), x)
    bias = torch.randn(n) if with_bias else None
    assert torch.equal(int8_fbgemm_linear(x, qt, bias, {}), int8_reference_linear(x, qt, bias, {}))


@needs_engine
def test_fast_equals_reference_for_per_tensor_weight_and_activation_scales():
    act = QuantSpec(format="int8", granularity="tensor", symmetric=True, scale_dtype="float32",
                    dynamic=True)
    spec = QuantSpec(format="int8", granularity="tensor", symmetric=True, scale_dtype="float32",
                     act=act)
    qt = QuantizedTensor.from_float(torch.randn(19, 45), spec)
    x, bias = torch.randn(3, 4, 45), torch.randn(19)
    assert select_kernel(qt, x).name == DYNAMIC_FAST
    assert torch.equal(int8_fbgemm_linear(x, qt, bias, {}), int8_reference_linear(x, qt, bias, {}))


@needs_engine
@pytest.mark.parametrize("spec", ["w7a8", "w8a7"])
@pytest.mark.parametrize(("x_shape", "n"), SHAPES)
def test_one_pass_presets_equal_reference(spec, x_shape, n):
    assert int8_kernels.one_pass_shift(lowbit.preset(spec)) is not None
    torch.manual_seed(3)
    qt = _weight(n, x_shape[-1], spec)
    x, bias = torch.randn(x_shape) * 3, torch.randn(n)
    assert select_kernel(qt, x).name == DYNAMIC_FAST
    assert torch.equal(int8_fbgemm_linear(x, qt, bias, {}), int8_reference_linear(x, qt, bias, {}))


@pytest.mark.parametrize(("spec", "shift"), [("w8a8", None), ("w8a8-static", None),
                                             ("w7a8", 128), ("w8a7", 64)])
def test_one_pass_only_where_no_pair_sum_can_saturate(spec, shift):
    assert int8_kernels.one_pass_shift(lowbit.preset(spec)) == shift


@needs_engine
@pytest.mark.parametrize("spec", ["w7a8", "w8a7"])
def test_one_pass_is_exact_at_the_extreme_codes(spec):
    """All codes at the ends of both ranges: the largest pair sums one pass can meet."""
    k, n = 1000, 3
    w = torch.ones(n, k)
    w[1] = -1
    w[2, ::2] = -1
    qt = QuantizedTensor.from_float(w, spec)
    x = torch.ones(4, k)
    x[1] = -1
    x[2, ::2] = -1
    x[3, 1::2] = -1
    assert torch.equal(int8_fbgemm_linear(x, qt, None, {}), int8_reference_linear(x, qt, None, {}))


def test_stochastic_activation_rounding_stays_on_the_reference():
    spec = lowbit.preset("w8a8")
    spec = spec.replace(act=spec.act.replace(rounding="stochastic"))
    qt = QuantizedTensor.from_float(torch.randn(4, 8), spec)
    assert not KERNELS["int8-fbgemm"].supports(qt, torch.zeros(2, 8))
    assert KERNELS["int8-reference"].supports(qt, torch.zeros(2, 8))


@needs_engine
def test_fast_is_exact_where_a_single_uint8_pass_saturates_int16():
    """Codes at the extremes: pairs 255*127 + 255*127 overflow int16 in fbgemm's AVX2 path; the
    two-half split must still give the exact integer sum 127 * 127 * K (and -128 * -127 * K)."""
    k, n = 1000, 4
    w = torch.ones(n, k)
    w[1] = -1
    qt = QuantizedTensor.from_float(w, "w8a8")  # codes +-127, scale 1/127
    x = torch.ones(3, k)
    x[1] = -1
    x[2, ::2] = -1
    acc = torch.tensor([127.0 * 127 * k, -127.0 * 127 * k, 0.0])
    fast = int8_fbgemm_linear(x, qt, None, {})
    assert torch.equal(fast, int8_reference_linear(x, qt, None, {}))
    scale = qt.scale.float().reshape(-1)[0]
    assert torch.equal(fast[:, 0], (acc * (1 / 127)) * scale)


def test_reference_dynamic_matches_float_math_on_fake_quantized_tensors():
    torch.manual_seed(3)
    qt = _weight(48, 96)
    x = torch.randn(2, 6, 96)
    x[0, 0, 5] = 40.0  # an outlier token: its own scale, the others unaffected
    bias = torch.randn(48)
    act = qt.spec.act
    xq = fake_quantize(x.reshape(-1, 96), act).reshape(x.shape)
    expected = F.linear(xq.double(), qt.dequantize(torch.float64), bias.double())
    got = int8_reference_linear(x, qt, bias, {})
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(got, F.linear(x, qt.dequantize(), bias), atol=1e-3)  # x is quantized


@pytest.mark.parametrize("weight", [
    {"format": "uint4", "granularity": "group", "group_size": 32},  # integer zero-points
    {"format": "uint4", "granularity": "group", "group_size": 32, "zero_point": "float"},
    {"format": "nf4", "granularity": "group", "group_size": 64, "symmetric": True},  # codebook
])
def test_act_reference_is_fake_quantized_float_math_for_other_weights(weight):
    act = {"format": "int8", "granularity": "token", "symmetric": True,
           "scale_dtype": "float32", "dynamic": True}
    spec = QuantSpec.from_dict({**weight, "act": act})
    torch.manual_seed(4)
    qt = QuantizedTensor.from_float(torch.randn(24, 128), spec)
    x, bias = torch.randn(2, 3, 128), torch.randn(24)
    assert select_kernel(qt, x, "reference").name == "act-reference"
    xq = fake_quantize(x.reshape(-1, 128), spec.act).reshape(x.shape)
    expected = F.linear(xq.double(), qt.dequantize(torch.float64), bias.double())
    got = int8_kernels.act_reference_linear(x, qt, bias, {})
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-5)
    assert linear(x, qt, bias).shape == (2, 3, 24)  # some kernel runs it on CPU


@pytest.mark.parametrize("act_kind", ["int8-sym", "uint8-asym"])
def test_reference_static_matches_float_math_up_to_the_bias_rounding(act_kind):
    torch.manual_seed(4)
    spec = lowbit.preset("w8a8-static")
    if act_kind == "uint8-asym":
        spec = spec.replace(act=QuantSpec(format="uint8", granularity="tensor", symmetric=False,
                                          scale_dtype="float32", zero_dtype="float32"))
    qt = QuantizedTensor.from_float(torch.randn(24, 64), spec)
    x = torch.randn(10, 64) + 0.5
    qt.act_scale = torch.tensor([x.abs().amax() / 120], dtype=torch.float32)
    zero = None
    if act_kind == "uint8-asym":
        lo, hi = float(x.min()), float(x.max())
        qt.act_scale = torch.tensor([(hi - lo) / 255], dtype=torch.float32)
        qt.act_zero_point = torch.tensor([round(-lo / float(qt.act_scale))], dtype=torch.float32)
        zero = qt.act_zero_point.reshape(1, 1)
    bias = torch.randn(24)
    qp = QParams(scale=qt.act_scale.reshape(1, 1), zero_point=zero)
    xq = fake_quantize(x, qt.spec.act.replace(granularity="tensor"), qp)
    expected = F.linear(xq.double(), qt.dequantize(torch.float64), bias.double())
    got = int8_reference_linear(x, qt, bias, {})
    bias_step = (qt.act_scale * qt.scale.float().reshape(-1)).double()
    assert ((got.double() - expected).abs() <= bias_step / 2 + 1e-5).all()
    assert not torch.equal(got, int8_reference_linear(x, qt, None, {}) + bias)  # bias is rounded


@pytest.mark.parametrize("weights", ["uint4-g64-asym", "nf4-g64", "int4-g32-asym-fz"])
def test_static_activations_with_group_or_codebook_weights_run_on_the_act_reference(weights):
    torch.manual_seed(5)
    act = QuantSpec(format="int8", granularity="tensor", symmetric=True, scale_dtype="float32")
    qt = QuantizedTensor.from_float(torch.randn(24, 128), lowbit.as_spec(weights).replace(act=act))
    x = torch.randn(3, 128)
    qt.act_scale = torch.tensor([x.abs().amax() * 0.7 / 127], dtype=torch.float32)
    assert select_kernel(qt, x).name == "act-reference"
    bias = torch.randn(24)
    xq = fake_quantize(x, act, QParams(scale=qt.act_scale.reshape(1, 1)))
    expected = F.linear(xq.double(), qt.dequantize(torch.float64), bias.double()).float()
    assert torch.allclose(linear(x, qt, bias), expected, rtol=1e-5, atol=1e-5)


def test_quantize_bias_is_exact_int32():
    act_scale = torch.tensor([0.02], dtype=torch.float32)
    weight_scale = torch.tensor([[0.5], [0.25], [0.125]], dtype=torch.float32)
    step = act_scale * weight_scale.reshape(-1)
    k = torch.tensor([7, -1234567, 0], dtype=torch.int32)
    q = quantize_bias(k.float() * step, act_scale, weight_scale)
    assert q.dtype == torch.int32 and torch.equal(q, k)
    halfway = quantize_bias(torch.tensor([2.5, 3.5, -2.5]) * step, act_scale, weight_scale)
    assert halfway.tolist() == [2, 4, -2]  # round half to even
    huge = quantize_bias(torch.tensor([1e30, -1e30, 0.0]), act_scale, weight_scale)
    assert huge.tolist() == [2**31 - 1, -(2**31), 0]  # saturated, not wrapped
    with pytest.raises(ValueError, match="bias must be a 1-D tensor"):
        quantize_bias(torch.zeros(3, 1), act_scale, weight_scale)
    with pytest.raises(ValueError, match="act_scale must hold one"):
        quantize_bias(torch.zeros(3), torch.ones(2), weight_scale)


def test_static_without_calibrated_scale_is_a_clear_error():
    qt = _weight(4, 8, "w8a8-static")
    for name in ("int8-reference", "int8-fbgemm"):
        if KERNELS[name].supports(qt, torch.zeros(2, 8)):
            with pytest.raises(ValueError, match="act_scale is unset"):
                KERNELS[name].fn(torch.zeros(2, 8), qt, None, {})


@needs_engine
def test_nan_activation_is_a_clear_error():
    qt = _weight(4, 8)
    x = torch.zeros(2, 8)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        int8_fbgemm_linear(x, qt, None, {})


@needs_engine
def test_kernel_selection_and_forcing_the_reference(monkeypatch):
    qt = _weight(8, 16)
    x = torch.randn(3, 16)
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    assert select_kernel(qt, x).name == DYNAMIC_FAST
    assert select_kernel(qt, x.double()).name in ("reference", "int8-reference")
    assert select_kernel(_weight(8, 16, "w8"), x).name != "int8-fbgemm"  # weight-only spec
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert select_kernel(qt, x).name == "int8-reference"  # the oracle for W8A8 specs
    assert torch.equal(linear(x, qt), int8_reference_linear(x, qt, None, {}))
    # the weight-only reference still answers weight-only specs
    w8 = _weight(8, 16, "w8")
    assert torch.equal(linear(x, w8), F.linear(x, w8.dequantize()))


@needs_engine
def test_prepacked_weight_is_cached_and_refreshed_when_the_codes_change():
    qt = _weight(8, 16)
    x = torch.randn(2, 16)
    cache: dict = {}
    first = int8_fbgemm_linear(x, qt, None, cache)
    packed = cache["int8-fbgemm"][1]
    int8_fbgemm_linear(x, qt, None, cache)
    assert cache["int8-fbgemm"][1] is packed
    qt.qdata.bitwise_xor_(1)  # in place: the cache must notice
    second = int8_fbgemm_linear(x, qt, None, cache)
    assert cache["int8-fbgemm"][1] is not packed
    assert torch.equal(second, int8_reference_linear(x, qt, None, {}))
    assert not torch.equal(first, second)


def test_quantize_w8a8_end_to_end_on_a_small_model(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 33, bias=False))
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        ref = model(x)
        lowbit.quantize(model, "w8a8")
        assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
        out = model(x)
        expected = DYNAMIC_FAST if int8_kernels.engine is not None else "int8-reference"
        assert select_kernel(model[0].qweight, x).name == expected
        for layer in (model[0], model[2]):
            layer.kernel = "int8-reference"
        forced = model(x)
    assert torch.equal(out, forced)
    rel = (out - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.02  # int8 weights and activations: close, yet really quantized
