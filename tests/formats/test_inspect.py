"""explain(): codes, bits, exact values and reasons; agreement with torch's casts."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats.inspect import explain, parse_value

TORCH = {
    "fp16": (torch.float16, torch.int16),
    "bf16": (torch.bfloat16, torch.int16),
    "fp8_e4m3fn": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
    "fp32": (torch.float32, torch.int32),
}


def torch_code(v: float, name: str) -> int:
    dtype, int_dtype = TORCH[name]
    bits = {torch.int16: 16, torch.uint8: 8, torch.int32: 32}[int_dtype]
    return int(torch.tensor([v], dtype=torch.float32).to(dtype).view(int_dtype)[0]) & (
        (1 << bits) - 1
    )


def test_point_one_in_fp16() -> None:
    e = explain("0.1", "fp16")
    assert e.code == 0x2E66 == torch_code(0.1, "fp16")
    assert e.hex == "0x2E66"
    assert e.bits == "0 01011 1001100110"
    assert (e.sign, e.exponent, e.mantissa) == (0, 11, 0x266)
    assert e.exact == "0.0999755859375" and e.decoded == 0.0999755859375
    assert e.abs_error == pytest.approx(0.1 - 0.0999755859375, rel=1e-12)
    assert e.rel_error == pytest.approx(e.abs_error / 0.1)
    assert e.reason == ["rounded to nearest even"]


def test_one_is_exact_and_grouped() -> None:
    e = explain(1.0, "fp16")
    assert e.bits == "0 01111 0000000000" and e.reason == ["exact"] and e.abs_error == 0


def test_underflow_overflow_subnormal() -> None:
    e = explain("1e-8", "fp16")
    assert e.code == 0 == torch_code(1e-8, "fp16") and e.reason == ["underflow to zero"]
    e = explain(70000, "fp16")
    assert e.code == 0x7C00 == torch_code(70000, "fp16") and e.reason == ["overflow to inf"]
    assert math.isinf(e.decoded) and e.exact == "inf"
    e = explain(2**-20, "fp16")
    assert e.code == 0x0010 and "subnormal" in e.reason and "exact" in e.reason
    e = explain(2**-20 * 1.3, "fp16")
    assert "subnormal" in e.reason and "rounded to nearest even" in e.reason


def test_e4m3fn_overflow() -> None:
    e = explain(500, "e4m3fn")
    # torch 2.13's cast saturates (no inf in e4m3fn); the reason says so and names 448
    assert e.code == 0x7E == torch_code(500, "fp8_e4m3fn") and e.decoded == 448
    assert e.reason[0].startswith("overflow: fp8_e4m3fn has no inf; saturated to max 448")
    s = explain(500, "e4m3fn", saturate=True)
    assert s.code == 0x7E and s.reason == ["overflow: saturated to max 448"]
    assert explain("-inf", "e4m3fn").code == 0xFE == torch_code(-math.inf, "fp8_e4m3fn")


def test_nan_inf_zero() -> None:
    e = explain("nan", "fp8")
    assert e.code == 0x7F == torch_code(math.nan, "fp8_e4m3fn") and e.reason == ["nan"]
    assert math.isnan(e.decoded) and math.isnan(e.abs_error)
    assert explain("inf", "e5m2").code == 0x7C
    assert explain("inf", "e5m2", saturate=True).decoded == 57344
    z = explain("-0", "bf16")
    assert z.code == 0x8000 and z.exact == "-0" and z.reason == ["exact"]
    with pytest.raises(ValueError, match="fp4_e2m1"):
        explain("nan", "fp4")


def test_ties_and_small_formats() -> None:
    e = explain(1.25, "fp4")  # between 1 (m=0) and 1.5 (m=1): even wins
    assert e.decoded == 1.0 and "tie" in e.reason[-1]
    e = explain(100, "fp6_e3m2")
    assert e.decoded == 28 and e.reason[0].startswith("overflow")
    assert explain(-7.5, "fp6_e2m3").bits == "1 11 111"


def test_agrees_with_torch_on_random_float32() -> None:
    g = torch.Generator().manual_seed(3)
    vals = (torch.randn(60, generator=g) * torch.exp2(torch.randint(-24, 18, (60,), generator=g)))
    vals = torch.cat([vals, torch.tensor([0.1, 1e-3, 3.14159, 65519.0, 465.0, 1e-45])])
    for v in vals.tolist():  # float32 values, exact in float64
        for name, (dtype, _) in TORCH.items():
            e = explain(v, name)
            assert e.code == torch_code(v, name), (v, name)
            ref = torch.tensor([v], dtype=torch.float32).to(dtype).float().item()
            assert e.decoded == ref or (math.isnan(ref) and math.isnan(e.decoded))


def test_integer_and_codebook() -> None:
    e = explain(-3, "int4")
    assert e.code == 0b1101 and e.bits == "1101" and e.reason[0] == "exact"
    assert "two's complement" in e.reason[1]
    e = explain(2.5, "int4")
    assert e.decoded == 2 and e.reason[0] == "rounded to nearest even integer"
    e = explain(300, "uint8")
    assert e.code == 255 and e.reason[0] == "overflow: saturated to max 255"
    assert explain(-300, "int8").reason[0] == "overflow: saturated to min -128"
    e = explain(0.3, "nf4")
    assert e.code == 11 and e.decoded == 0.33791524171829224 and e.kind == "codebook"
    assert explain(-2, "nf4").reason[0].startswith("outside the table")
    assert explain("0.125", "pow2_4").reason == ["exact: table entry 12"]


def test_parse_value() -> None:
    assert parse_value("1e-3") == 1e-3 and parse_value(" 0.1 ") == 0.1
    assert math.isinf(parse_value("-inf")) and math.isnan(parse_value("nan"))
    assert math.copysign(1, parse_value("-0")) == -1
    assert parse_value("0x1p-3") == 0.125
    for bad in ("abc", "", "1..2", "0x"):
        with pytest.raises(ValueError, match="is not a number; give a decimal such as 0.1"):
            parse_value(bad)
    with pytest.raises(ValueError, match="value 'abc' is not a number"):
        explain("abc", "fp16")
    with pytest.raises(ValueError, match="unknown format 'fp7'"):
        explain("1", "fp7")


def test_values_float64_cannot_hold_are_refused_not_explained() -> None:
    with pytest.raises(ValueError, match="beyond float64's range"):
        parse_value("1e400")
    with pytest.raises(ValueError, match="underflows float64 to zero"):
        parse_value("-1e-400")
    assert parse_value("0.0e5") == 0 and parse_value("1e-320") == 1e-320
