"""Every number format by name: ``get_format``, ``list_formats`` and the facts ``format_table``.

Canonical names: fp32 fp16 bf16 fp8_e4m3fn fp8_e5m2 fp6_e3m2 fp6_e2m3 fp4_e2m1, int1..int8,
int16, int32, uint1..uint8, nf4, pow2_2..pow2_8. Aliases: float32, float16, half, bfloat16,
e4m3fn, e4m3, fp8, e5m2, e3m2, e2m3, e2m1, fp4.
"""

from __future__ import annotations

from typing import Any

from lowbit.formats.codebooks import NF4, POW2_FORMATS, CodebookFormat
from lowbit.formats.floats import FLOAT_FORMATS, FloatFormat
from lowbit.formats.integers import INT_FORMATS, IntFormat

Format = FloatFormat | IntFormat | CodebookFormat

_FORMATS: dict[str, Format] = {
    f.name: f for f in (*FLOAT_FORMATS, *INT_FORMATS, NF4, *POW2_FORMATS)
}

_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "e4m3fn": "fp8_e4m3fn",
    "e4m3": "fp8_e4m3fn",
    "fp8": "fp8_e4m3fn",
    "e5m2": "fp8_e5m2",
    "e3m2": "fp6_e3m2",
    "e2m3": "fp6_e2m3",
    "e2m1": "fp4_e2m1",
    "fp4": "fp4_e2m1",
}


def list_formats() -> list[str]:
    """Canonical format names, floats first (widest first), then integers, then codebooks."""
    return list(_FORMATS)


def canonical_name(name: str) -> str:
    """Resolve an alias (case-insensitive) to its canonical name; ValueError if unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _FORMATS:
        raise ValueError(f"unknown format {name!r}; allowed: {', '.join(list_formats())}")
    return key


def get_format(name: str) -> Format:
    """The format object for a canonical name or alias, e.g. ``get_format("e4m3fn")``."""
    return _FORMATS[canonical_name(name)]


def _float_specials(f: FloatFormat) -> str:
    e_ones = "1" * f.exp_bits
    if f.nan_encoding == "ieee":
        return "±inf, nan"
    if f.nan_encoding == "fn":
        return f"nan only (S.{e_ones}.{'1' * f.man_bits})"
    return "none (saturate)"


def format_row(fmt: Format) -> dict[str, Any]:
    """One row of facts for a format; keys as in :func:`format_table`.

    Values that do not apply to a kind are None (ints and codebooks have no exponent).
    """
    row: dict[str, Any] = {"name": fmt.name, "bits": fmt.bits}
    if isinstance(fmt, FloatFormat):
        row.update(
            kind="float",
            sign_bits=1,
            exponent_bits=fmt.exp_bits,
            mantissa_bits=fmt.man_bits,
            bias=fmt.bias,
            max=fmt.max,
            min_normal=fmt.min_normal,
            min_subnormal=fmt.min_subnormal,
            eps=fmt.eps,
            decimal_digits=fmt.decimal_digits,
            specials=_float_specials(fmt),
            torch_dtype=str(fmt.torch_dtype).removeprefix("torch.") if fmt.torch_dtype else "-",
        )
    elif isinstance(fmt, IntFormat):
        row.update(
            kind="int",
            sign_bits=1 if fmt.signed else 0,
            exponent_bits=0,
            mantissa_bits=fmt.bits - (1 if fmt.signed else 0),
            bias=None,
            max=float(fmt.qmax),
            min_normal=None,
            min_subnormal=None,
            eps=1.0,
            decimal_digits=None,
            specials="none (saturate)",
            torch_dtype={8: "int8" if fmt.signed else "uint8", 16: "int16", 32: "int32"}.get(
                fmt.bits, "-"
            ),
        )
    else:
        row.update(
            kind="codebook",
            sign_bits=None,
            exponent_bits=None,
            mantissa_bits=None,
            bias=None,
            max=fmt.max,
            min_normal=None,
            min_subnormal=None,
            eps=None,
            decimal_digits=None,
            specials=f"none ({fmt.levels}-entry table, clip to ends)",
            torch_dtype="-",
        )
    return row


def format_table() -> list[dict[str, Any]]:
    """One dict per format: name, kind (float/int/codebook), bits, sign_bits, exponent_bits,
    mantissa_bits, bias, max, min_normal, min_subnormal, eps, decimal_digits, specials,
    torch_dtype ("-" when torch has none)."""
    return [format_row(f) for f in _FORMATS.values()]
