"""cpu_w4a8: 4-bit weights x dynamic int8 activations against the float64 act-reference oracle;
packing; no int16 saturation at the extremes; errors and caching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import KERNELS, cpu_w4a8, dispatch
from lowbit.kernels.int8 import act_reference_linear
from lowbit.spec import QuantSpec, preset
from lowbit.tensor import QuantizedTensor

_ACT = {"format": "int8", "granularity": "token", "symmetric": True, "scale_dtype": "float32",
        "dynamic": True}


@pytest.fixture(scope="module", autouse=True)
def _built():
    if cpu_w4a8.library() is None:
        pytest.skip("cpu_w4a8 could not be built here (no AVX2 or no compiler)")


def _spec(symmetric: bool, group: int | None, act_granularity: str = "token") -> QuantSpec:
    weight = {"format": "int4" if symmetric else "uint4", "symmetric": symmetric}
    weight.update({"granularity": "group", "group_size": group} if group else
                  {"granularity": "channel"})
    return QuantSpec.from_dict({**weight, "act": {**_ACT, "granularity": act_granularity}})


def _assert_close(got: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, bias) -> None:
    ref = act_reference_linear(x, qt, bias, {})
    # float32 sums of exact integer group dots: reassociation-sized differences only
    mag = x.abs().reshape(-1, qt.shape[1]) @ qt.dequantize(torch.float32).abs().T
    tol = 64 * torch.finfo(torch.float32).eps * (mag + (0 if bias is None else bias.abs())) + 1e-6
    assert got.shape == ref.shape
    assert bool(((got - ref).abs().reshape(tol.shape) <= tol).all())


@settings(max_examples=40, deadline=None)
@given(
    symmetric=st.booleans(),
    group=st.sampled_from([8, 32, 128, None]),
    groups=st.integers(1, 4),
    m=st.sampled_from([1, 2, 3, 4, 5, 9]),
    n=st.integers(1, 40),
    act_granularity=st.sampled_from(["token", "tensor"]),
    with_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_the_act_reference(symmetric, group, groups, m, n, act_granularity, with_bias,
                                   seed):
    k = (group or 16) * groups
    g = torch.Generator().manual_seed(seed)
    qt = QuantizedTensor.from_float(torch.randn(n, k, generator=g),
                                    _spec(symmetric, group, act_granularity))
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    x[0] = 0 if m > 1 else x[0]  # an all-zero token: scale 1
    bias = torch.randn(n, generator=g) if with_bias else None
    # a symmetric per-channel weight goes to the exact cpu_w8a8 (higher priority)
    exact_int8 = symmetric and group is None
    assert dispatch.select_kernel(qt, x).name == ("cpu_w8a8" if exact_int8 else "cpu_w4a8")
    _assert_close(cpu_w4a8.cpu_w4a8_linear(x, qt, bias, {}), x, qt, bias)


def test_many_rows_across_row_chunks():
    torch.manual_seed(5)
    qt = QuantizedTensor.from_float(torch.randn(20, 64), _spec(False, 32))
    x, bias = torch.randn(2, 301, 64), torch.randn(20)
    _assert_close(cpu_w4a8.cpu_w4a8_linear(x, qt, bias, {}), x, qt, bias)


@pytest.mark.parametrize("m", [1, 70])
def test_act_order_group_index(m: int):
    """GPTQ act-order's g_idx: the kernel's codes and the gathered activations in group order."""
    gen = torch.Generator().manual_seed(m)
    qt = QuantizedTensor.from_float(torch.randn(20, 256, generator=gen), preset("w4a8"))
    order = torch.randperm(256, generator=gen)
    qt.g_idx = torch.empty(256, dtype=torch.int32)
    qt.g_idx[order] = torch.arange(256, dtype=torch.int32) // 128
    x, bias = torch.randn(m, 256, generator=gen), torch.randn(20, generator=gen)
    assert dispatch.select_kernel(qt, x).name == "cpu_w4a8"
    run = cpu_w4a8.bind_w4a8(qt, bias, {})
    _assert_close(run(x), x, qt, bias)
    qt.g_idx.copy_(qt.g_idx.flip(0))  # a new order: layout and gather follow it
    _assert_close(run(x), x, qt, bias)
    qt.g_idx.zero_()[:10] = 1  # still valid, but uneven groups: the bound kernel defers
    assert not dispatch.KERNELS["cpu_w4a8"].supports(qt, x)
    assert torch.equal(run(x), act_reference_linear(x, qt, bias, {}))


def test_extreme_codes_do_not_saturate():
    """Every code 15 against activations at +-127: the largest int16 pair sums the kernel
    makes (a saturating sum would be off by thousands)."""
    spec = preset("w4a8")
    qt = QuantizedTensor.from_float(torch.rand(16, 256) + 1.0, spec)  # codes near 15, zero 0
    qt.qdata.fill_(0xFF)  # code 15 in both nibbles
    x = torch.full((2, 256), 127.0)
    x[1] = -127.0
    _assert_close(cpu_w4a8.cpu_w4a8_linear(x, qt, None, {}), x, qt, None)


def test_packed_weight_layout():
    """Golden layout: byte [p, o, 4c + i] = code (8p+c, 8o+i) | code (8p+c, 8o+4+i) << 4."""
    codes = (torch.arange(9 * 16) % 16).to(torch.uint8).reshape(9, 16)
    packed = cpu_w4a8.pack_weight(codes)
    assert packed.shape == (2, 2, 32)
    c, o, i = 1, 1, 2
    low, high = int(codes[c, 8 * o + i]), int(codes[c, 8 * o + 4 + i])
    assert int(packed[0, o, 4 * c + i]) == low | high << 4
    assert int(packed[1, 0, 0]) == int(codes[8, 0]) | int(codes[8, 4]) << 4
    assert packed[1, :, 4:].sum() == 0  # padded channels


def test_preset_runs_on_this_kernel_and_the_oracle_is_selected_as_reference():
    qt = QuantizedTensor.from_float(torch.randn(24, 256), "w4a8")
    x = torch.randn(3, 256)
    assert dispatch.select_kernel(qt, x).name == "cpu_w4a8"
    assert dispatch.select_kernel(qt, x, "reference").name == "act-reference"
    assert not KERNELS["cpu_int4"].supports(qt, x)  # weight-only kernels ignore no act spec


def test_unsupported_layouts_are_not_taken():
    qt = QuantizedTensor.from_float(torch.randn(8, 96), _spec(False, 12))  # group % 8 != 0
    assert not KERNELS["cpu_w4a8"].supports(qt, torch.randn(1, 96))
    static = QuantSpec.from_dict({"format": "uint4", "granularity": "group", "group_size": 32,
                                  "act": {**_ACT, "granularity": "tensor", "dynamic": False}})
    qt = QuantizedTensor.from_float(torch.randn(8, 64), static)
    assert not KERNELS["cpu_w4a8"].supports(qt, torch.randn(1, 64))


def test_groups_too_wide_for_exact_int32_sums_are_not_taken(monkeypatch):
    qt = QuantizedTensor.from_float(torch.randn(8, 64), _spec(False, None))  # per channel: K
    assert KERNELS["cpu_w4a8"].supports(qt, torch.randn(1, 64))
    monkeypatch.setattr(cpu_w4a8, "MAX_GROUP", 32)
    assert not KERNELS["cpu_w4a8"].supports(qt, torch.randn(1, 64))


def test_output_is_float32_on_cpu_whatever_the_defaults():
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4a8")
    x = torch.randn(2, 128)
    expected = cpu_w4a8.cpu_w4a8_linear(x, qt, None, {})
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = cpu_w4a8.cpu_w4a8_linear(x, qt, None, {})
    finally:
        torch.set_default_dtype(saved)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_no_rows_give_an_empty_output():
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4a8")
    assert cpu_w4a8.cpu_w4a8_linear(torch.randn(0, 128), qt, None, {}).shape == (0, 8)


def test_bound_kernel_follows_in_place_edits_and_refuses_misfits():
    torch.manual_seed(2)
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4a8")
    run = dispatch.bound_linear(torch.zeros(1, 128), qt, None, cache={})
    x = torch.randn(1, 128)
    first = run(x)
    qt.qdata.bitwise_xor_(0x11)
    second = run(x)
    assert not torch.equal(first, second)
    _assert_close(second, x, qt, None)
    with pytest.raises(ValueError, match=r"float16\) CPU \[\.\.\., 128\]"):
        run(torch.randn(1, 64))
