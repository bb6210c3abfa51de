"""The AVX2 weight-only CPU kernels (cpu_int1/2/3/4/8, cpu_lut, cpu_fp8) against the reference
kernel, their cache and dispatch rules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import cpu_avx2, dispatch
from lowbit.kernels.dispatch import reference_linear
from lowbit.nn.modules import QuantLinear
from lowbit.quant.maps import code_values
from lowbit.spec import QuantSpec, as_spec, preset
from lowbit.tensor import QuantizedTensor

FP6 = QuantSpec("fp6_e3m2", "channel", symmetric=True)  # no fast CPU kernel

# every family, group-wise and per channel: spec -> the kernel that runs it
SPECS = {
    spec: kernel
    for kernel, specs in {
        "cpu_int4": ["w4g128", "w4g64", "w4g128-sym", QuantSpec("uint4", "channel")],
        "cpu_int3": ["w3g128", QuantSpec("int3", "group", group_size=64, symmetric=True)],
        "cpu_int2": ["w2g64", QuantSpec("int2", "channel", symmetric=True)],
        "cpu_int1": [QuantSpec("uint1", "group", group_size=32)],
        "cpu_int5": ["q5_0", "q5_1", QuantSpec("uint5", "channel")],
        "cpu_int6": [QuantSpec("int6", "group", group_size=64, symmetric=True, full_range=True),
                     QuantSpec("uint6", "channel")],
        "cpu_lut": ["nf4g64", "fp4g32", "km4", "km3",
                    QuantSpec("kmeans2", "group", group_size=64)],
        "cpu_fp8": ["fp8", QuantSpec("fp8_e5m2", "group", group_size=32, symmetric=True)],
    }.items()
    for spec in map(as_spec, specs)
}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if cpu_avx2.extension() is None:
        pytest.skip(f"cpu_avx2 extension unavailable here: {cpu_avx2._LIB.error}")


def rounding_tolerance(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Per-output bound on fp32 reassociation error between two correct kernels.

    Both sum K products whose magnitudes are at most |x| * 2**bits * s for affine codes (codes
    and zero-points lie in [0, 2**bits] code units), |x| * |w| for table codes; fp32 rounding
    errors of such sums grow like sqrt(K) * eps in practice (random-walk model, Higham 2002
    sec. 3.4), times a 16x margin. A wrong code, group, table entry or zero-point gives errors
    of the order of the magnitude itself, far above this.
    """
    k = qt.shape[1]
    if qt.spec.kind == "affine":
        s = qt.scale.float().abs().reshape(qt.shape[0], -1)  # full-range scales can be < 0
        bound = (1 << qt.spec.bits) * s.repeat_interleave(k // s.shape[1], dim=1)
    else:
        bound = qt.dequantize(torch.float32).abs()
    magnitude = x.abs().reshape(-1, k) @ bound.T
    return 16 * k**0.5 * torch.finfo(torch.float32).eps * magnitude + 1e-6


def check_close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y - ref).abs().reshape(-1, qt.shape[0])
    tol = rounding_tolerance(x, qt)
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, max tol {tol.max():.3g}"


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 7, cpu_avx2.GEMV_MAX_ROWS + 1])
def test_matches_reference(spec: QuantSpec, m: int) -> None:
    torch.manual_seed(m)
    w = torch.randn(73, 384) * torch.rand(73, 1) * 3  # odd N: M=1 pairs rows, plus a tail
    qt = QuantizedTensor.from_float(w, spec)
    x = torch.randn(m, 384)
    bias = torch.randn(73)
    assert dispatch.select_kernel(qt, x).name == SPECS[spec]
    y = cpu_avx2.cpu_linear(x, qt, bias, {})
    check_close(y, reference_linear(x, qt, bias, {}), x, qt)


INT8_SPECS = {
    "w8": preset("w8"),
    "uint8-g64-asym": preset("w4g64").replace(format="uint8"),
    "int8-g32-sym": preset("w4g128-sym").replace(format="int8", group_size=32,
                                                 full_range=False),
    "uint8-ch-float-zero": preset("w8").replace(format="uint8", symmetric=False,
                                                zero_point="float"),
}


@pytest.mark.parametrize("name", sorted(INT8_SPECS))
@pytest.mark.parametrize("m", [1, 5, cpu_avx2.GEMV_MAX_ROWS + 1])
def test_int8_matches_reference(name: str, m: int) -> None:
    torch.manual_seed(m)
    qt = QuantizedTensor.from_float(torch.randn(41, 256) * torch.rand(41, 1) + 0.3,
                                    INT8_SPECS[name])
    x = torch.randn(2, m, 256)
    assert dispatch.select_kernel(qt, x).name == "cpu_int8"
    bias = torch.randn(41)
    check_close(cpu_avx2.cpu_linear(x, qt, bias, {}), reference_linear(x, qt, bias, {}), x, qt)


def test_int8_needs_32_wide_rows() -> None:
    qt = QuantizedTensor.from_float(torch.randn(8, 48), "w8")
    assert not cpu_avx2.spec_supported(qt)
    assert dispatch.select_kernel(qt, torch.randn(1, 48)).name == "reference"


def test_float_zero_point_and_3d_input() -> None:
    torch.manual_seed(1)
    spec = preset("w4g64").replace(zero_point="float")
    qt = QuantizedTensor.from_float(torch.randn(40, 256) + 0.5, spec)
    x = torch.randn(2, 5, 256)
    y = cpu_avx2.cpu_linear(x, qt, None, {})
    assert y.shape == (2, 5, 40)
    check_close(y, reference_linear(x, qt, None, {}), x, qt)


def test_wrong_nibble_order_would_fail() -> None:
    """The tolerance is tight enough to catch swapped nibbles (the test can fail)."""
    torch.manual_seed(2)
    qt = QuantizedTensor.from_float(torch.randn(32, 128), "w4g128")
    swapped = QuantizedTensor(
        qdata=(qt.qdata >> 4) | (qt.qdata << 4), spec=qt.spec, shape=qt.shape,
        scale=qt.scale, zero_point=qt.zero_point,
    )
    x = torch.randn(3, 128)
    err = (cpu_avx2.cpu_linear(x, swapped, None, {}) - reference_linear(x, qt, None, {}))
    assert bool((err.abs() > rounding_tolerance(x, qt)).any())


def test_execution_layout_is_cached_not_saved() -> None:
    torch.manual_seed(3)
    layer = QuantLinear.from_float(torch.nn.Linear(128, 48), "w4g128")
    keys_before = set(layer.state_dict())
    x = torch.randn(2, 128)
    layer(x)
    entry = layer._kernel_cache["cpu_int4"]
    layer(x)
    assert layer._kernel_cache["cpu_int4"] is entry  # built once, reused
    assert set(layer.state_dict()) == keys_before  # never saved


def test_dispatch_picks_the_cpu_kernels_only_where_supported(monkeypatch) -> None:
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    qt = QuantizedTensor.from_float(torch.randn(16, 128), "w4g128")
    assert dispatch.select_kernel(qt, torch.randn(1, 128)).name == "cpu_int4"
    assert dispatch.select_kernel(qt, torch.randn(1, 128, dtype=torch.bfloat16)).name == (
        "cpu_int4"
    )
    assert dispatch.select_kernel(qt, torch.randn(1, 128, dtype=torch.float64)).name == (
        "reference"
    )
    # fp4 e2m1's values are bf16 numbers: two byte planes of its table are looked up, not four
    assert cpu_avx2.family(QuantizedTensor.from_float(torch.randn(16, 128), "fp4g32")) == (
        "lut4bf16")
    assert cpu_avx2.family(QuantizedTensor.from_float(torch.randn(16, 128), "nf4g64")) == "lut4"
    fp6 = QuantizedTensor.from_float(torch.randn(16, 128), FP6)  # a 6-bit float grid
    assert dispatch.select_kernel(fp6, torch.randn(1, 128)).name == "reference"
    for spec in (preset("w4g64").replace(group_size=16), QuantSpec("uint4", "tensor"),
                 QuantSpec("nf4", "block", block=(2, 64), symmetric=True)):
        assert not cpu_avx2.spec_supported(QuantizedTensor.from_float(torch.randn(16, 128), spec))
    with pytest.raises(ValueError, match="no cpu_int / cpu_lut / cpu_fp8 kernel"):
        cpu_avx2.bind_cpu_linear(QuantizedTensor.from_float(torch.randn(8, 128), FP6), None, {})


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e5m2"])
@pytest.mark.parametrize("flush_denormals", [False, True])
@pytest.mark.parametrize("m", [32, 33])  # the GEMV; the dequantized weight
def test_fp8_decodes_every_finite_code_exactly(fmt: str, flush_denormals: bool, m: int) -> None:
    """All 256 bit patterns but inf / NaN, subnormals included, come out bit for bit (x holds
    unit rows: y = W^T), also where torch flushes denormals to zero."""
    spec = QuantSpec(fmt, "channel", symmetric=True, scale_dtype="float32")
    values = code_values(spec)
    finite = torch.nonzero(torch.isfinite(values))[:, 0].to(torch.uint8)
    codes = finite.repeat(-(-8 * 32 // finite.numel()))[: 8 * 32].reshape(8, 32)
    qt = QuantizedTensor(qdata=codes, spec=spec, shape=(8, 32), scale=torch.rand(8, 1) + 0.5)
    x = torch.eye(32).repeat(2, 1)[:m]
    torch.set_flush_denormal(flush_denormals)
    try:
        y = cpu_avx2.cpu_linear(x, qt, None, {})
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(y.T[:, :32], qt.dequantize())


@pytest.mark.parametrize(("fmt", "pattern"), [("fp8_e4m3fn", 0x7F), ("fp8_e4m3fn", 0xFF),
                                              ("fp8_e5m2", 0x7C), ("fp8_e5m2", 0xFE)])
def test_fp8_inf_and_nan_codes_keep_the_reference_path(fmt: str, pattern: int) -> None:
    """An fp8 weight holding an inf / NaN pattern (an imported checkpoint; lowbit's Q never
    writes one) gives what the reference gives, through the bound kernel and the embedding
    lookup alike, also when the pattern is written after binding; once it is gone the kernel
    runs again."""
    spec = QuantSpec(fmt, "channel", symmetric=True, scale_dtype="float32")
    qt = QuantizedTensor.from_float(torch.randn(8, 64), spec)
    cache: dict = {}
    run = cpu_avx2.bind_cpu_linear(qt, None, cache)
    x = torch.randn(2, 64)
    run(x)
    qt.qdata[3, 5] = pattern
    expected = reference_linear(x, qt, None, {})
    assert not torch.isfinite(expected[:, 3]).any()
    assert torch.equal(run(x).isnan(), expected.isnan())
    assert not torch.isfinite(run(x)[:, 3]).any() and torch.isfinite(run(x)[:, :3]).all()
    assert cpu_avx2.embedding_rows(qt, torch.tensor([3]), cache) is None
    qt.qdata[3, 5] = 0x01
    check_close(run(x), reference_linear(x, qt, None, {}), x, qt)
    assert run.held[3] is False  # the kernel, not the reference
    assert cpu_avx2.embedding_rows(qt, torch.tensor([3]), cache) is not None


def test_outputs_are_on_the_cpu_under_another_default_device() -> None:
    """The bound kernels allocate their outputs on the CPU whatever the default device."""
    qt = QuantizedTensor.from_float(torch.randn(64, 128), "w4g128")
    run = cpu_avx2.bind_cpu_linear(qt, None, {})
    x = torch.randn(2, 128)
    with torch.device("meta"):
        y = run(x)
    assert y.is_cpu
    check_close(y, reference_linear(x, qt, None, {}), x, qt)


def test_wrong_3bit_window_would_fail() -> None:
    """3-bit codes cross byte boundaries: the tolerance catches a chunk read one window off."""
    torch.manual_seed(5)
    qt = QuantizedTensor.from_float(torch.randn(16, 128), "w3g128")
    shifted = QuantizedTensor(qdata=qt.qdata.roll(3, dims=1), spec=qt.spec, shape=qt.shape,
                              scale=qt.scale, zero_point=qt.zero_point)
    x = torch.randn(1, 128)
    err = cpu_avx2.cpu_linear(x, shifted, None, {}) - reference_linear(x, qt, None, {})
    assert bool((err.abs() > rounding_tolerance(x, qt)).any())


def test_inputs_needing_gradients_go_to_the_reference(monkeypatch) -> None:
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    layer = QuantLinear.from_float(torch.nn.Linear(128, 16), "w4g128")
    x = torch.randn(2, 128, requires_grad=True)
    assert dispatch.select_kernel(layer.qweight, x).name == "reference"
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert dispatch.select_kernel(layer.qweight, x).name == "cpu_int4"


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("name", ["w4g128", "w8", "w3g128", "nf4g64", "km4"])
def test_many_rows_dequantize_whole_or_in_blocks(monkeypatch, name: str, whole: bool) -> None:
    """Above GEMV_MAX_ROWS the weight is dequantized (in stored column order) into the shared
    scratch buffer: whole, or block by block (here 5 rows a block, with a short last block)."""
    monkeypatch.setattr(cpu_avx2, "DEQUANT_BLOCK_ROWS", 5)
    if not whole:
        monkeypatch.setattr(cpu_avx2, "DEQUANT_WHOLE_MAX", 0)
    torch.manual_seed(4)
    qt = QuantizedTensor.from_float(torch.randn(73, 384), name)
    x, bias = torch.randn(2, cpu_avx2.GEMV_MAX_ROWS, 384), torch.randn(73)
    check_close(cpu_avx2.cpu_linear(x, qt, bias, {}), reference_linear(x, qt, bias, {}), x, qt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["w4g128", "w3g128", "nf4g64"])
def test_half_activations_are_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs (a half-precision model) run the kernel in float32 and round once:
    the float32 answer in x's dtype, closer to exact than the reference's half F.linear."""
    torch.manual_seed(6)
    qt = QuantizedTensor.from_float(torch.randn(40, 256), name)
    x = torch.randn(2, 5, 256).to(dtype)
    bias = torch.randn(40).to(dtype)
    y = dispatch.linear(x, qt, bias, cache={})
    assert y.dtype == dtype
    exact = reference_linear(x.double(), qt, bias.double(), {})
    assert torch.equal(y, cpu_avx2.cpu_linear(x.float(), qt, bias, {}).to(dtype))
    assert (y.double() - exact).abs().max() <= (reference_linear(x, qt, bias, {}).double()
                                                  - exact).abs().max()


def test_bound_kernel_refuses_inputs_it_was_not_bound_for() -> None:
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4g128")
    run = cpu_avx2.bind_cpu_linear(qt, None, {})
    with pytest.raises(ValueError, match=r"CPU \[\.\.\., 128\]"):
        run(torch.randn(1, 256))
    with pytest.raises(ValueError, match=r"needs float32 \(or bfloat16 / float16\) CPU"):
        run(torch.randn(1, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias has 3 elements"):
        cpu_avx2.bind_cpu_linear(qt, torch.zeros(3), {})


def test_memo_keeps_one_kernel_per_input_kind() -> None:
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4g128")
    cache: dict = {}
    x = torch.randn(1, 128)
    for _ in range(5):
        dispatch.linear(x, qt, torch.randn(8), cache=cache)
    assert sum(1 for key in cache if key[0] == "bound") == 1


def _act_order(qt: QuantizedTensor, generator: torch.Generator) -> QuantizedTensor:
    """``qt`` with GPTQ act-order's kind of group index: a random column order cut into groups."""
    k, group = qt.shape[1], qt.spec.group_size
    order = torch.randperm(k, generator=generator)
    qt.g_idx = torch.empty(k, dtype=torch.int32)
    qt.g_idx[order] = torch.arange(k, dtype=torch.int32) // group
    qt.validate()
    return qt


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "nf4g64"])
@pytest.mark.parametrize("m", [1, 6, cpu_avx2.GEMV_MAX_ROWS + 1])
def test_group_index_regroups_the_columns(name: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    qt = _act_order(QuantizedTensor.from_float(torch.randn(41, 256, generator=gen), name), gen)
    x, bias = torch.randn(2, m, 256, generator=gen), torch.randn(41, generator=gen)
    assert dispatch.select_kernel(qt, x).name in ("cpu_int4", "cpu_int3", "cpu_lut")
    check_close(cpu_avx2.cpu_linear(x, qt, bias, {}), reference_linear(x, qt, bias, {}), x, qt)


def test_group_index_in_natural_order_needs_no_copy() -> None:
    qt = QuantizedTensor.from_float(torch.randn(8, 256), "w4g128")
    qt.g_idx = torch.arange(256, dtype=torch.int32) // 128
    assert cpu_avx2.group_order(qt) is None
    cache: dict = {}
    x = torch.randn(2, 256)
    check_close(cpu_avx2.cpu_linear(x, qt, None, cache), reference_linear(x, qt, None, {}), x, qt)
    assert cache["cpu_int4"][1][0] is qt.qdata  # the stored codes, read in place


def test_group_index_with_uneven_groups_goes_to_the_reference() -> None:
    qt = QuantizedTensor.from_float(torch.randn(8, 256), "w4g128")
    qt.g_idx = torch.zeros(256, dtype=torch.int32)
    qt.g_idx[:10] = 1  # valid, but group 0 has 246 columns
    qt.validate()
    assert not cpu_avx2.spec_supported(qt)
    assert dispatch.select_kernel(qt, torch.randn(1, 256)).name == "reference"


def test_regrouped_codes_follow_in_place_edits() -> None:
    gen = torch.Generator().manual_seed(9)
    qt = _act_order(QuantizedTensor.from_float(torch.randn(8, 256, generator=gen), "w4g128"), gen)
    run = cpu_avx2.bind_cpu_linear(qt, None, {})
    x = torch.randn(1, 256, generator=gen)
    run(x)
    qt.qdata.bitwise_xor_(0x11)  # every code changes
    check_close(run(x), reference_linear(x, qt, None, {}), x, qt)
    qt.g_idx.zero_()[:10] = 1  # still valid, but uneven groups: the bound kernel defers
    assert not cpu_avx2.spec_supported(qt)
    assert torch.equal(run(x), reference_linear(x, qt, None, {}))


def test_kmeans_group_index_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(10)
    spec = QuantSpec("kmeans4", "group", group_size=64)
    qt = _act_order(QuantizedTensor.from_float(torch.randn(8, 256, generator=gen), spec), gen)
    x = torch.randn(3, 256, generator=gen)
    check_close(cpu_avx2.cpu_linear(x, qt, None, {}), reference_linear(x, qt, None, {}), x, qt)


_FUZZ_FORMATS = ["uint1", "uint2", "int2", "uint3", "int3", "uint4", "int4", "uint5", "int5",
                 "uint6", "int6", "uint8", "int8",
                 "nf4", "fp4_e2m1", "kmeans2", "kmeans4", "fp8_e4m3fn", "fp8_e5m2"]


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(_FUZZ_FORMATS),
    group=st.sampled_from([32, 64, 128, None]),
    groups=st.integers(1, 3),
    symmetric=st.booleans(),
    m=st.integers(1, cpu_avx2.GEMV_MAX_ROWS + 8),
    n=st.integers(1, 40),
    act_order=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_any_weight_only_spec_matches_the_reference(fmt, group, groups, symmetric, m, n,
                                                    act_order, seed) -> None:
    """Random specs of every family (affine of 1-8 bits, tables, fp8; groups or per channel;
    act-order group indices) against the reference kernel, through dispatch's bound path."""
    fixed_grid = fmt in ("nf4", "fp4_e2m1") or fmt.startswith("fp8")
    symmetric = symmetric or fixed_grid or fmt.startswith("kmeans")
    if fmt == "uint1":
        symmetric = False  # a 1-bit grid has no level above zero
    granularity = {"granularity": "group", "group_size": group} if group else {
        "granularity": "channel"}
    spec = QuantSpec(fmt, symmetric=symmetric, **granularity)
    k = (group or 32) * groups
    gen = torch.Generator().manual_seed(seed)
    qt = QuantizedTensor.from_float(torch.randn(n, k, generator=gen) * 2, spec)
    if act_order and group:
        qt = _act_order(qt, gen)
    x = torch.randn(m, k, generator=gen)
    assert dispatch.select_kernel(qt, x).name.startswith("cpu_")
    y = dispatch.linear(x, qt, None, cache={})
    check_close(y, reference_linear(x, qt, None, {}), x, qt)


@pytest.mark.parametrize("name", ["w4g128", "w3g128", "w2g64", "w8", "nf4g64", "fp8", "km4",
                                  "q5_1", QuantSpec("int6", "channel", symmetric=True),
                                  QuantSpec("uint1", "group", group_size=32),
                                  QuantSpec("fp8_e5m2", "group", group_size=32, symmetric=True)],
                         ids=str)
@pytest.mark.parametrize(("n", "m"), [(24, 6), (25, 7), (25, 8), (24, 13), (25, 16)])
def test_wide_layers_at_several_rows_run_pairs_of_channels(name: str | QuantSpec, n: int, m: int,
                                                           monkeypatch) -> None:
    """From 6 rows and 2048 columns the GEMV takes output channels in pairs (an odd last one
    alone; table formats, nf4 and km4, keep one at a time) against 4 activation rows at a
    time, decoded a vector at a time (row remainders of 2, 3, 0 and 1)."""
    # these small weights would hand more than 8 rows to dequantize + F.linear
    monkeypatch.setattr(cpu_avx2, "GEMV_SMALL_MAX_ROWS", cpu_avx2.GEMV_MAX_ROWS)
    torch.manual_seed(8)
    qt = QuantizedTensor.from_float(torch.randn(n, 2048), name)
    x, bias = torch.randn(m, 2048), torch.randn(n)
    check_close(cpu_avx2.cpu_linear(x, qt, bias, {}), reference_linear(x, qt, bias, {}), x, qt)


def test_e4m3_weights_with_scales_near_the_float32_limit() -> None:
    """e4m3 codes are decoded as value / 256 and the 256 multiplied back into each group's sum,
    not into the scales: a scale above FLT_MAX / 256 (an imported checkpoint) whose weights are
    finite gives finite outputs and bit-exact embedding rows."""
    torch.manual_seed(11)
    qt = QuantizedTensor.from_float(torch.randn(8, 64), "fp8")
    qt.qdata = torch.randn(8, 64).clamp(-2, 2).to(torch.float8_e4m3fn).view(torch.uint8)
    qt.scale = torch.full_like(qt.scale, 1e37)
    ids = torch.arange(8)
    assert torch.equal(cpu_avx2.embedding_rows(qt, ids, {}), qt.dequantize()[ids])
    x = torch.randn(3, 64) * 1e-30
    y = cpu_avx2.cpu_linear(x, qt, None, {})
    assert bool(torch.isfinite(y).all())
    check_close(y, reference_linear(x, qt, None, {}), x, qt)
