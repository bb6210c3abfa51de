"""Format registry, integer formats and codebooks (NF4, pow2)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats.codebooks import (
    NF4,
    NF4_VALUES,
    CodebookFormat,
    nf4_construction,
    pow2_values,
)
from lowbit.formats.floats import FP8_E4M3FN, FloatFormat
from lowbit.formats.integers import IntFormat
from lowbit.formats.registry import format_table, get_format, list_formats

REQUIRED = (
    ["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4"]
    + [f"int{b}" for b in range(1, 9)]
    + [f"uint{b}" for b in range(1, 9)]
    + [f"pow2_{b}" for b in range(2, 9)]
)


def test_list_formats_has_every_name() -> None:
    names = list_formats()
    assert set(REQUIRED) <= set(names)
    assert len(names) == len(set(names))
    for name in names:
        assert get_format(name).name == name


@pytest.mark.parametrize(
    "alias,name",
    [
        ("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"), ("e4m3fn", "fp8_e4m3fn"),
        ("fp8", "fp8_e4m3fn"), ("e5m2", "fp8_e5m2"), ("fp4", "fp4_e2m1"), ("FP16", "fp16"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert get_format(alias).name == name


def test_unknown_format_is_one_line_listing_allowed() -> None:
    with pytest.raises(ValueError) as err:
        get_format("xyz")
    msg = str(err.value)
    assert msg.startswith("unknown format 'xyz'; allowed: fp32, fp16")
    assert "\n" not in msg and "nf4" in msg and "uint8" in msg


def test_kinds() -> None:
    assert isinstance(get_format("fp8"), FloatFormat)
    assert isinstance(get_format("int4"), IntFormat)
    assert isinstance(get_format("nf4"), CodebookFormat)
    assert get_format("e4m3fn") is FP8_E4M3FN


def test_format_table_rows() -> None:
    rows = {r["name"]: r for r in format_table()}
    assert set(rows) == set(list_formats())
    keys = {"name", "kind", "bits", "sign_bits", "exponent_bits", "mantissa_bits", "bias", "max",
            "min_normal", "min_subnormal", "eps", "decimal_digits", "specials", "torch_dtype"}
    assert all(set(r) == keys for r in rows.values())
    fp32 = rows["fp32"]
    assert fp32["max"] == torch.finfo(torch.float32).max and fp32["torch_dtype"] == "float32"
    assert (fp32["exponent_bits"], fp32["mantissa_bits"], fp32["bias"]) == (8, 23, 127)
    e4 = rows["fp8_e4m3fn"]
    assert e4["max"] == 448 and e4["min_subnormal"] == 2**-9
    assert e4["specials"] == "nan only (S.1111.111)"
    assert rows["fp16"]["specials"] == "±inf, nan" and rows["fp16"]["eps"] == 2**-10
    assert rows["fp4_e2m1"]["specials"] == "none (saturate)"
    assert rows["fp4_e2m1"]["torch_dtype"] == "-"
    assert rows["int4"]["kind"] == "int" and rows["int4"]["max"] == 7
    assert rows["nf4"]["kind"] == "codebook" and rows["nf4"]["bits"] == 4
    assert rows["bf16"]["decimal_digits"] == pytest.approx(8 * math.log10(2))


# ---------------------------------------------------------------- integers


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_ranges_and_codes(bits: int) -> None:
    s, u = get_format(f"int{bits}"), get_format(f"uint{bits}")
    assert (s.qmin, s.qmax, s.levels) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2**bits)
    assert (u.qmin, u.qmax, u.levels) == (0, 2**bits - 1, 2**bits)
    values = torch.arange(s.qmin, s.qmax + 1)
    codes = s.encode(values.double())
    assert codes.min() >= 0 and codes.max() < 2**bits
    assert torch.equal(s.decode(codes), values)
    if bits == 8:  # two's complement == torch's int8 <-> uint8 reinterpretation
        assert torch.equal(codes, values.to(torch.int8).view(torch.uint8).to(torch.int64))


def test_int_encode_rounds_half_even_and_saturates() -> None:
    i4 = get_format("int4")
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 100.0, -100.0, math.inf, -math.inf])
    assert i4.decode(i4.encode(x)).tolist() == [0, 2, 2, -2, 7, -8, 7, -8]
    assert i4.to_code(-1) == 0b1111 and i4.from_code(0b1000) == -8
    assert get_format("int1").decode(torch.tensor([0, 1])).tolist() == [0, -1]
    with pytest.raises(ValueError, match="int4"):
        i4.encode(torch.tensor([math.nan]))
    with pytest.raises(ValueError):
        i4.to_code(8)
    assert get_format("uint3").describe()["encoding"] == "unsigned binary"


# ---------------------------------------------------------------- codebooks


def test_nf4_table() -> None:
    assert len(NF4_VALUES) == 16 and NF4_VALUES[0] == -1.0 and NF4_VALUES[-1] == 1.0
    assert NF4_VALUES[7] == 0.0 and NF4_VALUES[1] == -0.6961928009986877
    assert NF4_VALUES[14] == 0.7229568362236023
    assert sum(v > 0 for v in NF4_VALUES) == 8 and sum(v < 0 for v in NF4_VALUES) == 7
    # every entry is a float32 constant
    assert torch.tensor(NF4_VALUES, dtype=torch.float32).tolist() == list(NF4_VALUES)


def test_nf4_construction_reproduces_table() -> None:
    # N(0,1) quantiles, 8 positive / 7 negative + 0, normalized: the same recipe as bitsandbytes.
    rebuilt = nf4_construction()
    assert max(abs(a - b) for a, b in zip(rebuilt, NF4_VALUES, strict=True)) <= 1e-6
    assert rebuilt == NF4_VALUES  # in fact bit for bit
    # and it really depends on the offset (the test can fail)
    assert max(abs(a - b) for a, b in zip(nf4_construction(0.97), NF4_VALUES, strict=True)) > 1e-3


@pytest.mark.parametrize("bits", range(2, 9))
def test_pow2_grid(bits: int) -> None:
    v = pow2_values(bits)
    assert len(v) == 2**bits and list(v) == sorted(set(v))
    assert v[0] == -1.0 and v[-1] == 1.0 and 0.0 in v
    for x in v:
        if x != 0:
            assert math.log2(abs(x)).is_integer()
    assert sum(x > 0 for x in v) == sum(x < 0 for x in v) + 1  # extra level on the + side
    assert get_format(f"pow2_{bits}").values == v


def test_pow2_4_values() -> None:
    assert pow2_values(4) == tuple(
        [-(2.0**-k) for k in range(7)] + [0.0] + [2.0**-k for k in range(7, -1, -1)]
    )
    with pytest.raises(ValueError):
        pow2_values(1)


def test_codebook_encode_decode() -> None:
    grid = NF4.grid()
    assert torch.equal(NF4.encode(grid), torch.arange(16))
    assert torch.equal(NF4.decode(torch.arange(16)), grid)
    x = torch.tensor([-5.0, 5.0, 0.01, -0.04])
    assert NF4.encode(x).tolist() == [0, 15, 7, 7]
    mid = (NF4_VALUES[8] + NF4_VALUES[9]) / 2  # a tie goes to the smaller magnitude
    assert NF4.encode(torch.tensor([mid], dtype=torch.float64)).item() == 8
    mid_neg = (NF4_VALUES[5] + NF4_VALUES[6]) / 2
    assert NF4.encode(torch.tensor([mid_neg], dtype=torch.float64)).item() == 6
    # brute-force nearest on random inputs
    g = torch.Generator().manual_seed(1)
    r = torch.rand(5000, generator=g) * 2.4 - 1.2
    brute = (r[:, None].double() - grid[None, :].double()).abs().argmin(1)
    assert torch.equal(NF4.encode(r), brute)
    with pytest.raises(ValueError, match="nf4"):
        NF4.encode(torch.tensor([math.nan]))
    with pytest.raises(ValueError):
        CodebookFormat("bad", 2, (0.0, 1.0, 0.5, 2.0))
    with pytest.raises(ValueError):
        CodebookFormat("bad", 2, (0.0, 1.0))
