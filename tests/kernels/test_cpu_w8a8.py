"""cpu_w8a8: bit-identical to the integer reference at every M; packing; errors and caching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import cpu_w8a8, dispatch, int8
from lowbit.kernels.int8 import int8_reference_linear
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor


@pytest.fixture(scope="module", autouse=True)
def _built():
    if cpu_w8a8.library() is None:
        pytest.skip("cpu_w8a8 could not be built here (no AVX2 or no compiler)")


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["w8a8", "w7a8", "w8a7"]),
    m=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 9, 32]),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    with_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_bit_identical_to_the_reference(name, m, k, n, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    qt = QuantizedTensor.from_float(torch.randn(n, k, generator=g), name)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    x[0] = 0 if m > 1 else x[0]  # an all-zero token: scale 1
    bias = torch.randn(n, generator=g) if with_bias else None
    got = cpu_w8a8.cpu_w8a8_linear(x, qt, bias, {})
    assert torch.equal(got, int8_reference_linear(x, qt, bias, {}))


def test_per_tensor_scales_and_sums_beyond_2_pow_24():
    """One activation scale for all rows; K large enough that float32(acc) rounds (both kernels
    round the same exact integer)."""
    act = QuantSpec(format="int8", granularity="tensor", symmetric=True, scale_dtype="float32",
                    dynamic=True)
    spec = QuantSpec(format="int8", granularity="tensor", symmetric=True, scale_dtype="float32",
                     act=act)
    qt = QuantizedTensor.from_float(torch.ones(3, 4096), spec)
    x = torch.ones(2, 4096)
    x[1] *= -0.5
    assert dispatch.select_kernel(qt, x).name == "cpu_w8a8"
    got = cpu_w8a8.cpu_w8a8_linear(x, qt, None, {})
    assert torch.equal(got, int8_reference_linear(x, qt, None, {}))
    assert abs(float(got[0, 0]) - 4096) < 1


@pytest.mark.parametrize("name", ["w8a8", "w7a8", "int8-ch-sym-full+a:int8-token-sym-dyn"])
def test_many_rows_across_row_chunks_stay_exact(name):
    """More rows than one chunk of the row loop (128), odd K, a partial last panel."""
    torch.manual_seed(1)
    qt = QuantizedTensor.from_float(torch.randn(45, 67), name)
    x, bias = torch.randn(3, 101, 67), torch.randn(45)
    got = cpu_w8a8.cpu_w8a8_linear(x, qt, bias, {})
    assert got.shape == (3, 101, 45)
    assert torch.equal(got, int8_reference_linear(x, qt, bias, {}))


def test_big_seven_bit_calls_go_to_fbgemms_one_pass_and_stay_exact(monkeypatch):
    calls = []
    real = int8.int8_fbgemm_linear
    monkeypatch.setattr(int8, "int8_fbgemm_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_w8a8, "ONE_PASS_MAX_WORK", 0)
    torch.manual_seed(3)
    x = torch.randn(cpu_w8a8.ONE_PASS_MAX_ROWS + 1, 64)
    for name, handed_over in (("w7a8", 1), ("w8a8", 0)):
        qt = QuantizedTensor.from_float(torch.randn(24, 64), name)
        calls.clear()
        got = cpu_w8a8.cpu_w8a8_linear(x, qt, None, {})
        assert len(calls) == handed_over
        assert torch.equal(got, int8_reference_linear(x, qt, None, {}))


def test_no_rows_give_an_empty_output():
    qt = QuantizedTensor.from_float(torch.randn(8, 16), "w8a8")
    assert cpu_w8a8.cpu_w8a8_linear(torch.randn(0, 16), qt, None, {}).shape == (0, 8)


def test_packed_weight_layout():
    """Golden layout: [panel, k pair, channel in panel, k in pair], zero padded."""
    w = torch.arange(9 * 3, dtype=torch.int8).reshape(9, 3)
    packed = cpu_w8a8.pack_weight(w)
    assert packed.shape == (2, 2, 8, 2)
    assert packed[0, 0, 1].tolist() == [3, 4]  # W[1, 0:2]
    assert packed[0, 1, 1].tolist() == [5, 0]  # W[1, 2], padded k
    assert packed[1, 0, 0].tolist() == [24, 25]  # W[8, 0:2]
    assert packed[1, 0, 1:].abs().sum() == 0  # padded channels


def test_static_activations_are_not_taken():
    qt = QuantizedTensor.from_float(torch.randn(8, 16), "w8a8-static")
    assert not dispatch.KERNELS["cpu_w8a8"].supports(qt, torch.randn(1, 16))


@pytest.mark.parametrize("name", ["w8a8", "w4a8"])  # bind_activation_kernel serves both
def test_non_finite_activations_fail_in_one_line(name):
    qt = QuantizedTensor.from_float(torch.randn(8, 128), name)
    x = torch.randn(2, 128)
    x[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"activation of shape \(2, 128\) has 1 NaN/Inf"):
        dispatch.bound_linear(x, qt, None, cache={})(x)


def test_bound_kernel_sees_in_place_code_changes():
    torch.manual_seed(2)
    qt = QuantizedTensor.from_float(torch.randn(8, 32), "w8a8")
    cache: dict = {}
    run = cpu_w8a8.bind_w8a8(qt, None, cache)
    x = torch.randn(1, 32)
    first = run(x)
    qt.qdata.bitwise_xor_(1)
    second = run(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, int8_reference_linear(x, qt, None, {}))


def test_bound_kernel_refuses_inputs_it_was_not_bound_for():
    qt = QuantizedTensor.from_float(torch.randn(8, 64), "w8a8")
    run = dispatch.bound_linear(torch.zeros(1, 64), qt, None, cache={})
    with pytest.raises(ValueError, match=r"float16\) CPU \[\.\.\., 64\]"):
        run(torch.randn(1, 128))
    with pytest.raises(ValueError, match=r"needs float32 \(or bfloat16 / float16\) CPU"):
        run(torch.randn(1, 64, dtype=torch.float64))


@pytest.mark.parametrize("name", ["w8a8", "w4a8"])
def test_half_bias_edits_and_default_device(name):
    """A bf16 bias's float32 copy follows its in-place edits, and outputs land on the CPU
    whatever the default device."""
    torch.manual_seed(3)
    qt = QuantizedTensor.from_float(torch.randn(16, 128), name)
    bias = torch.randn(16).to(torch.bfloat16)
    run = dispatch.bound_linear(torch.randn(1, 128), qt, bias, cache={})
    x = torch.randn(3, 128)
    before = run(x)
    bias.add_(1)
    after = run(x)
    torch.testing.assert_close(after - before, torch.ones(3, 16), atol=0.02, rtol=0)  # bf16 ulps
    with torch.device("meta"):
        y = run(x)
    assert y.is_cpu and torch.equal(y, after)


@pytest.mark.parametrize(("name", "fast", "oracle"), [("w8a8", "cpu_w8a8", "int8-reference"),
                                                      ("w4a8", "cpu_w4a8", "act-reference")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
def test_half_activations_run_the_kernel_as_the_oracle_does(name, fast, oracle, dtype, m):
    """bf16 / fp16 activations (a half-precision model) are quantized from their float32 values
    and the result rounded to x's dtype once: what the oracle gives, bit for bit."""
    torch.manual_seed(4)
    qt = QuantizedTensor.from_float(torch.randn(24, 256), name)
    x, bias = torch.randn(2, m, 256).to(dtype), torch.randn(24).to(dtype)
    assert dispatch.select_kernel(qt, x).name == fast
    y = dispatch.bound_linear(x, qt, bias, cache={})(x)
    assert y.dtype == dtype and y.shape == (2, m, 24)
    assert torch.equal(y, dispatch.KERNELS[oracle].fn(x, qt, bias, {}))
