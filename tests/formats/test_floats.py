"""FloatFormat against torch's own dtypes, bit for bit, and against IEEE / OCP facts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats.floats import (
    BF16,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3FN,
    FP8_E5M2,
    FP16,
    FP32,
    FloatFormat,
)

TORCH_FORMATS = [FP16, BF16, FP8_E4M3FN, FP8_E5M2]
SMALL_FORMATS = [FP8_E4M3FN, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1]


def torch_bits(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """torch's cast of float32 ``x`` to ``fmt`` as unsigned int64 bit patterns."""
    y = x.to(fmt.torch_dtype)
    int_dtype = torch.uint8 if fmt.bits == 8 else torch.int16
    return y.view(int_dtype).to(torch.int64) & ((1 << fmt.bits) - 1)


def torch_decode(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    int_dtype = torch.uint8 if fmt.bits == 8 else torch.int16
    return codes.to(int_dtype).view(fmt.torch_dtype).to(torch.float32)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit as float32, except that any NaN equals any NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def is_nan_code(fmt: FloatFormat, codes: torch.Tensor) -> torch.Tensor:
    return torch.isnan(fmt.decode(codes))


E4M3_SATURATES = bool(
    torch.tensor([1000.0, math.inf]).to(torch.float8_e4m3fn).float().eq(448).all()
)


# ---------------------------------------------------------------- facts


@pytest.mark.parametrize(
    "fmt,bias,fmax",
    [
        (FP32, 127, 3.4028234663852886e38),
        (FP16, 15, 65504.0),
        (BF16, 127, 3.3895313892515355e38),
        (FP8_E4M3FN, 7, 448.0),
        (FP8_E5M2, 15, 57344.0),
        (FP6_E3M2, 3, 28.0),
        (FP6_E2M3, 1, 7.5),
        (FP4_E2M1, 1, 6.0),
    ],
)
def test_bias_and_max(fmt: FloatFormat, bias: int, fmax: float) -> None:
    assert fmt.bias == bias
    assert fmt.max == fmax
    assert fmt.bits == 1 + fmt.exp_bits + fmt.man_bits


def test_ieee_facts() -> None:
    assert FP16.eps == 2**-10 and FP16.min_subnormal == 2**-24 and FP16.min_normal == 2**-14
    assert BF16.eps == 2**-7
    assert FP8_E4M3FN.min_subnormal == 2**-9 and FP8_E4M3FN.min_normal == 2**-6
    assert FP8_E5M2.min_subnormal == 2**-16
    assert FP16.decimal_digits == pytest.approx(11 * math.log10(2))
    assert (FP32.bits, FP16.bits, FP8_E5M2.bits, FP6_E2M3.bits, FP4_E2M1.bits) == (32, 16, 8, 6, 4)


@pytest.mark.parametrize("fmt", [FP32, FP16, BF16, FP8_E4M3FN, FP8_E5M2])
def test_facts_match_torch_finfo(fmt: FloatFormat) -> None:
    fi = torch.finfo(fmt.torch_dtype)
    assert fmt.max == fi.max
    assert fmt.min_normal == fi.smallest_normal
    assert fmt.eps == fi.eps
    assert fmt.bits == fi.bits
    assert fmt.min_subnormal == torch.tensor(1, dtype=torch.uint8 if fmt.bits == 8 else (
        torch.int16 if fmt.bits == 16 else torch.int32)).view(fmt.torch_dtype).item()


def test_small_format_value_sets() -> None:
    fp4 = FP4_E2M1.values().tolist()
    assert fp4 == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FP6_E2M3.values().max().item() == 7.5 and len(FP6_E2M3.values()) == 63
    assert FP6_E3M2.values().max().item() == 28 and len(FP6_E3M2.values()) == 63
    assert FP6_E3M2.values()[32].item() == 0.0625  # smallest subnormal of e3m2
    e4m3 = FP8_E4M3FN.values()
    assert len(e4m3) == 253 and e4m3.max().item() == 448  # 256 - 2 NaNs - (-0)
    e5m2 = FP8_E5M2.values()
    assert len(e5m2) == 247 and e5m2.max().item() == 57344  # 256 - 6 NaN - 2 inf - (-0)
    for fmt in SMALL_FORMATS + [FP16]:
        v = fmt.values()
        assert v.dtype == torch.float32 and bool((v[1:] > v[:-1]).all())
        assert not bool(torch.signbit(v[v == 0]).any())


def test_fields_and_specials() -> None:
    assert FP16.fields(0x3C00) == (0, 15, 0)
    assert FP16.fields(0xFE00) == (1, 31, 512)
    assert FP8_E4M3FN.fields(0x7F) == (0, 15, 7)
    assert FP8_E4M3FN.is_nan_code(0x7F) and FP8_E4M3FN.is_nan_code(0xFF)
    assert not FP8_E4M3FN.is_nan_code(0x7E) and not FP8_E4M3FN.is_nan_code(0x78)
    assert FP8_E5M2.is_nan_code(0x7D) and not FP8_E5M2.is_nan_code(0x7C)
    assert FP8_E4M3FN.inf_code is None and FP8_E5M2.inf_code == 0x7C
    with pytest.raises(ValueError, match="fp16"):
        FP16.fields(1 << 16)


# ---------------------------------------------------------------- decode, exhaustive


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_decode_every_pattern_matches_torch(fmt: FloatFormat) -> None:
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    ours = fmt.decode(codes)
    assert ours.dtype == torch.float32
    assert same_floats(ours, torch_decode(codes, fmt))
    # and the NaN patterns are exactly the ones torch calls NaN
    assert torch.equal(torch.isnan(ours), torch.isnan(torch_decode(codes, fmt)))


def test_decode_fp32_and_small_formats() -> None:
    x = torch.tensor([0.1, -2.5, math.inf, 1e-45, -0.0], dtype=torch.float32)
    assert same_floats(FP32.decode(FP32.encode(x)), x)
    assert FP32.encode(torch.tensor([-0.0])).item() == 0x80000000
    assert FP4_E2M1.decode(torch.arange(16)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6,
    ]
    with pytest.raises(ValueError, match="fp4_e2m1"):
        FP4_E2M1.decode(torch.tensor([16]))
    with pytest.raises(TypeError):
        FP16.decode(torch.tensor([1.0]))


# ---------------------------------------------------------------- encode vs torch casts


def _probe_inputs(fmt: FloatFormat, seed: int) -> torch.Tensor:
    """Every value of fmt, every midpoint (ties), the float32 neighbours of each midpoint,
    random float32 bit patterns (subnormals, inf, NaN included) and hand-picked specials."""
    vals = fmt.decode(torch.arange(1 << fmt.bits, dtype=torch.int32))
    vals = vals[torch.isfinite(vals)].to(torch.float64).unique()
    mids64 = (vals[1:] + vals[:-1]) / 2
    mids = mids64.to(torch.float32)
    assert torch.equal(mids.to(torch.float64), mids64)  # midpoints are exact in float32
    # beyond the max: the first "overflow midpoint" and values just around it
    top = torch.tensor([fmt.max * (1 + fmt.eps / 2), fmt.max * (1 + fmt.eps)], dtype=torch.float32)
    near = torch.cat([mids, top])
    up = torch.nextafter(near, torch.tensor(math.inf))
    down = torch.nextafter(near, torch.tensor(-math.inf))
    g = torch.Generator().manual_seed(seed)
    rand_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    rand = rand_bits.to(torch.int32).view(torch.float32)
    # random values scaled into the format's own range, subnormals included
    scaled = torch.randn(100_000, generator=g) * torch.exp2(
        torch.randint(-30, 20, (100_000,), generator=g).float()
    )
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 3e38, -3e38,
         fmt.max, -fmt.max, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, 464.0, 465.0,
         480.0, 61440.0, 65520.0],
        dtype=torch.float32,
    )
    return torch.cat([vals.to(torch.float32), -vals.to(torch.float32), near, -near, up, -up,
                      down, -down, rand, scaled, specials])


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=lambda f: f.name)
def test_encode_matches_torch_cast(fmt: FloatFormat) -> None:
    if fmt is FP8_E4M3FN and not E4M3_SATURATES:
        pytest.skip("this torch casts e4m3fn overflow to NaN (before pytorch#178817)")
    x = _probe_inputs(fmt, seed=fmt.bits)
    ours = fmt.encode(x).to(torch.int64)
    ref = torch_bits(x, fmt)
    nan_in = torch.isnan(x)
    mismatch = (ours != ref) & ~nan_in
    assert not bool(mismatch.any()), (
        f"{fmt.name}: {int(mismatch.sum())} mismatches, e.g. x={x[mismatch][:5].tolist()} "
        f"ours={ours[mismatch][:5].tolist()} torch={ref[mismatch][:5].tolist()}"
    )
    # NaN in -> a NaN pattern out, with the input's sign (torch does the same except bf16 on CPU)
    assert bool(is_nan_code(fmt, ours[nan_in]).all())
    assert torch.equal(ours[nan_in] >> (fmt.bits - 1), torch.signbit(x[nan_in]).to(torch.int64))


def test_default_nan_bits() -> None:
    nan = torch.tensor([math.nan, -math.nan])
    assert FP16.encode(nan).tolist() == torch_bits(nan, FP16).tolist() == [0x7E00, 0xFE00]
    assert FP8_E4M3FN.encode(nan).tolist() == torch_bits(nan, FP8_E4M3FN).tolist() == [0x7F, 0xFF]
    assert FP8_E5M2.encode(nan).tolist() == torch_bits(nan, FP8_E5M2).tolist() == [0x7F, 0xFF]
    # torch's scalar/float64 bf16 path writes 0x7FC0 (its vectorized float32 path 0xFFFF)
    assert BF16.encode(nan).tolist() == [0x7FC0, 0xFFC0]
    assert torch_bits(torch.tensor([math.nan], dtype=torch.float64), BF16).item() == 0x7FC0


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E4M3FN, FP8_E5M2], ids=lambda f: f.name)
def test_saturating_encode_is_clamp_then_cast(fmt: FloatFormat) -> None:
    x = _probe_inputs(fmt, seed=7)
    x = x[~torch.isnan(x)]
    ours = fmt.encode(x, saturate=True).to(torch.int64)
    ref = torch_bits(x.clamp(-fmt.max, fmt.max), fmt)
    assert torch.equal(ours, ref)


def test_overflow_policies() -> None:
    x = torch.tensor([70000.0, -math.inf, 1e6, 500.0])
    assert FP16.decode(FP16.encode(x)).tolist() == [math.inf, -math.inf, math.inf, 500.0]
    assert FP16.decode(FP16.encode(x, saturate=True)).tolist() == [65504, -65504, 65504, 500]
    assert FP8_E5M2.decode(FP8_E5M2.encode(x)).tolist() == [math.inf, -math.inf, math.inf, 512]
    # e4m3fn: torch 2.13 saturates even without saturate=True
    assert FP8_E4M3FN.decode(FP8_E4M3FN.encode(x)).tolist() == [448, -448, 448, 448]
    assert FP8_E4M3FN.encode(torch.tensor([464.0, 465.0])).tolist() == [0x7E, 0x7E]
    assert FP4_E2M1.decode(FP4_E2M1.encode(x)).tolist() == [6, -6, 6, 6]
    assert FP32.decode(FP32.encode(torch.tensor([1e300], dtype=torch.float64))).item() == math.inf
    big = torch.tensor([1e300, -math.inf], dtype=torch.float64)
    assert FP32.decode(FP32.encode(big, saturate=True)).tolist() == [FP32.max, -FP32.max]


def test_no_nan_formats_reject_nan() -> None:
    for fmt in (FP4_E2M1, FP6_E2M3, FP6_E3M2):
        with pytest.raises(ValueError, match=fmt.name):
            fmt.encode(torch.tensor([1.0, math.nan]))


def test_signed_zero_and_input_dtypes() -> None:
    for fmt in (FP16, BF16, FP8_E4M3FN, FP8_E5M2, FP4_E2M1, FP6_E2M3):
        codes = fmt.encode(torch.tensor([0.0, -0.0, -1e-60], dtype=torch.float64))
        sign = 1 << (fmt.bits - 1)
        assert codes.tolist() == [0, sign, sign]
    x = torch.tensor([0.1, -3.7, 1e-5, 300.0])
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xd = x.to(dt)
        assert torch.equal(FP8_E5M2.encode(xd), FP8_E5M2.encode(xd.to(torch.float64)))
    with pytest.raises(TypeError, match="int64"):
        FP16.encode(torch.tensor([1, 2]))


def test_float64_input_is_rounded_once() -> None:
    # 1 + 2**-11 + 2**-40 is just above the fp16 tie 1 + 2**-11; via float32 it *becomes* the tie
    # and rounds to even (1.0). lowbit rounds the float64 once: up to 1 + 2**-10.
    x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert FP16.encode(x).item() == 0x3C01
    assert FP16.encode(x.to(torch.float32)).item() == 0x3C00


def test_large_and_strided_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 400, generator=g) * 100  # more than one internal chunk
    for fmt in (FP8_E4M3FN, FP16):
        codes = fmt.encode(x.t())
        assert codes.shape == (400, 300) and codes.dtype == torch.int32
        assert torch.equal(codes.to(torch.int64), torch_bits(x.t().contiguous(), fmt))
        assert torch.equal(fmt.decode(codes), x.t().to(fmt.torch_dtype).float())


# ---------------------------------------------------------------- nearest value, property


def brute_force_nearest(x: float, fmt: FloatFormat) -> float:
    """Nearest value of ``fmt`` to x (clamped to ±max); ties to the even mantissa."""
    x = min(max(x, -fmt.max), fmt.max)
    vals = fmt.values().to(torch.float64)
    d = (vals - x).abs()
    cands = vals[d == d.min()].tolist()
    if len(cands) == 1:
        return cands[0]
    # a tie: pick the neighbour whose code has an even last mantissa bit
    even = [v for v in cands if int(fmt.encode(torch.tensor([abs(v)]))[0]) & 1 == 0]
    assert len(even) == 1
    return even[0]


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(SMALL_FORMATS),
    x=st.one_of(
        st.floats(min_value=-600, max_value=600, allow_nan=False, width=32),
        st.floats(min_value=-1, max_value=1, allow_nan=False, width=32),
        st.floats(allow_nan=False, allow_infinity=True, width=32),
        st.integers(min_value=-255, max_value=255).map(lambda i: i / 64),  # hits ties
    ),
)
def test_saturating_encode_is_nearest(fmt: FloatFormat, x: float) -> None:
    got = fmt.decode(fmt.encode(torch.tensor([x], dtype=torch.float32), saturate=True)).item()
    assert got == brute_force_nearest(x, fmt)


@settings(max_examples=100, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_fp32_round_trip_and_fp16_nearest(x: float) -> None:
    t = torch.tensor([x], dtype=torch.float32)
    assert same_floats(FP32.decode(FP32.encode(t)), t)
    got = FP16.decode(FP16.encode(t, saturate=True)).item()
    assert got == t.clamp(-65504, 65504).to(torch.float16).item()


def test_overflow_nan_policy_and_validation() -> None:
    import dataclasses

    ocp = dataclasses.replace(FP8_E4M3FN, name="e4m3_ocp_nonsat", overflow="nan")
    x = torch.tensor([448.0, 464.0, 465.0, -500.0, math.inf])
    assert ocp.encode(x).tolist() == [0x7E, 0x7E, 0x7F, 0xFF, 0x7F]
    assert ocp.encode(x, saturate=True).tolist() == [0x7E, 0x7E, 0x7E, 0xFE, 0x7E]
    with pytest.raises(ValueError, match="has_inf"):
        FloatFormat("bad", 2, 1, 1, False, "none", None, "inf")
    with pytest.raises(ValueError, match="NaN encoding"):
        FloatFormat("bad", 2, 1, 1, False, "none", None, "nan")
