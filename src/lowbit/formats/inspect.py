"""Explain how one number is stored in a format: its code, bits, exact stored value and error.

``explain(0.1, "fp16")`` -> code 0x2E66, bits ``0 01011 1001100110``, stored exactly
0.0999755859375, with the reasons ("rounded to nearest even", ...). Float formats use the same
:meth:`FloatFormat.encode` as the tensor path, so the answer is bit for bit what lowbit (and, for
float32 inputs, torch's own casts) produce. The input is taken as a float64 and rounded once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import torch

from lowbit.formats.codebooks import CodebookFormat
from lowbit.formats.floats import FloatFormat
from lowbit.formats.integers import IntFormat
from lowbit.formats.registry import get_format


@dataclass
class Explanation:
    """How ``value`` is stored in ``format``.

    bits: the code's bits, most significant first, grouped "sign exponent mantissa" for floats.
    sign / exponent / mantissa: the float fields (exponent and mantissa None for ints/codebooks;
    sign None for unsigned ints and codebooks). decoded: the stored value; exact: it as an exact
    decimal string. reason: why the stored value differs (or not) from the input.
    """

    value: float
    format: str
    kind: str
    code: int
    bits: str
    sign: int | None
    exponent: int | None
    mantissa: int | None
    decoded: float
    exact: str
    abs_error: float
    rel_error: float
    saturate: bool = False
    reason: list[str] = field(default_factory=list)

    @property
    def hex(self) -> str:
        """The code in hex, zero-padded to the format's width, e.g. '0x2E66'."""
        width = max(1, (len(self.bits.replace(" ", "")) + 3) // 4)
        return f"0x{self.code:0{width}X}"


def _not_a_number(value: object) -> ValueError:
    return ValueError(
        f"value {value!r} is not a number; give a decimal such as 0.1, 1e-3, inf or nan"
    )


def parse_value(value: float | int | str) -> float:
    """A number from a float or a string such as "0.1", "1e-3", "-0", "inf", "nan", "0x1p-3"."""
    if isinstance(value, bool):
        raise _not_a_number(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        parsed = float(text)
    except ValueError:
        pass
    else:
        _check_representable(text, parsed)
        return parsed
    if "0x" not in text.lower():  # float.fromhex would also take "abc" as 0xabc
        raise _not_a_number(value)
    try:
        return float.fromhex(text)
    except ValueError:
        raise _not_a_number(value) from None


def _check_representable(text: str, parsed: float) -> None:
    """Refuse decimal text that float64 itself overflows to inf or flushes to zero: the
    explanation would describe float64's rounding, not the format's."""
    if math.isinf(parsed) and "inf" not in text.lower():
        raise ValueError(f"value {text!r} is beyond float64's range (max ~1.8e308); write inf "
                         "to inspect infinity")
    if parsed == 0 and any(c in "123456789" for c in text.lower().split("e")[0]):
        raise ValueError(f"value {text!r} underflows float64 to zero (its smallest subnormal is "
                         "~4.9e-324)")


def _exact_decimal(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    return str(Decimal(x))


def _errors(value: float, decoded: float) -> tuple[float, float]:
    if math.isnan(value) or math.isnan(decoded):
        return math.nan, math.nan
    if math.isinf(value) or math.isinf(decoded):
        if value == decoded:
            return 0.0, 0.0
        return math.inf, math.inf
    err = abs(Fraction(decoded) - Fraction(value))
    rel = float(err / abs(Fraction(value))) if value != 0 else (0.0 if err == 0 else math.inf)
    return float(err), rel


def _is_tie(value: float, fmt: FloatFormat, code: int) -> bool:
    """True when ``value`` lies exactly halfway between the stored value and a neighbour."""
    decoded = fmt._value_of(code)
    if not math.isfinite(decoded) or not math.isfinite(value):
        return False
    mag = code & ((1 << (fmt.bits - 1)) - 1)
    sign = code & (1 << (fmt.bits - 1))
    for other in (mag - 1, mag + 1):
        if 0 <= other <= fmt.max_code:
            v = fmt._value_of(other | sign)
            if Fraction(v) + Fraction(decoded) == 2 * Fraction(value):
                return True
    return False


def _explain_float(value: float, fmt: FloatFormat, saturate: bool) -> Explanation:
    code = int(fmt.encode(torch.tensor([value], dtype=torch.float64), saturate=saturate)[0])
    sign, exp, man = fmt.fields(code)
    decoded = fmt._value_of(code)
    reason: list[str] = []
    if math.isnan(value):
        reason.append("nan")
    elif math.isinf(value) and math.isinf(decoded):
        reason.append("exact (infinity)")
    elif decoded == value:
        reason.append("exact")
        if exp == 0 and man != 0:
            reason.append("subnormal")
    else:
        overflow = math.isinf(value) or abs(value) > fmt.max
        if math.isinf(decoded):
            reason.append("overflow to inf")
        elif math.isnan(decoded):
            reason.append(
                f"overflow: {fmt.name} has no inf; this non-saturating cast gives NaN "
                f"(the saturating one gives {fmt.max:g})"
            )
        elif overflow and abs(decoded) == fmt.max:
            max_s = f"{fmt.max:g}"
            if saturate:
                reason.append(f"overflow: saturated to max {max_s}")
            elif fmt.nan_encoding == "fn":
                reason.append(
                    f"overflow: {fmt.name} has no inf; saturated to max {max_s} as this torch's "
                    f"cast does (OCP's non-saturating conversion gives NaN)"
                )
            else:
                reason.append(f"overflow: {fmt.name} has no inf or nan; saturated to max {max_s}")
        elif decoded == 0:
            reason.append("underflow to zero")
        else:
            reason.append("rounded to nearest even")
            if _is_tie(value, fmt, code):
                reason.append("tie: the neighbour with the even mantissa was chosen")
            if exp == 0:
                reason.append("subnormal")
    bits = f"{sign} {exp:0{fmt.exp_bits}b} {man:0{fmt.man_bits}b}"
    abs_err, rel_err = _errors(value, decoded)
    return Explanation(
        value, fmt.name, "float", code, bits, sign, exp, man, decoded, _exact_decimal(decoded),
        abs_err, rel_err, saturate, reason,
    )


def _explain_int(value: float, fmt: IntFormat) -> Explanation:
    if math.isnan(value):
        raise ValueError(f"{fmt.name} has no NaN encoding; cannot store nan")
    reason: list[str] = []
    if value > fmt.qmax:
        q = fmt.qmax
        reason.append(f"overflow: saturated to max {fmt.qmax}")
    elif value < fmt.qmin:
        q = fmt.qmin
        reason.append(f"overflow: saturated to min {fmt.qmin}")
    else:
        q = round(value)  # Python's round is half-to-even
        reason.append("exact" if q == value else "rounded to nearest even integer")
    code = fmt.to_code(q)
    bits = f"{code:0{fmt.bits}b}"
    if fmt.signed and q < 0:
        reason.append(f"two's complement: {q} + 2**{fmt.bits} = {code} = 0b{bits}")
    elif fmt.signed:
        reason.append(f"two's complement: top (sign) bit 0, {q} = 0b{bits}")
    else:
        reason.append(f"unsigned binary: {q} = 0b{bits}")
    sign = code >> (fmt.bits - 1) if fmt.signed else None
    abs_err, rel_err = _errors(value, float(q))
    return Explanation(
        value, fmt.name, "int", code, bits, sign, None, None, float(q), str(q),
        abs_err, rel_err, True, reason,
    )


def _explain_codebook(value: float, fmt: CodebookFormat) -> Explanation:
    if math.isnan(value):
        raise ValueError(f"{fmt.name} has no NaN encoding; cannot store nan")
    code = int(fmt.encode(torch.tensor([value], dtype=torch.float64))[0])
    decoded = fmt.values[code]
    if decoded == value:
        reason = [f"exact: table entry {code}"]
    elif value > fmt.values[-1] or value < fmt.values[0]:
        lo, hi = fmt.values[0], fmt.values[-1]
        reason = [f"outside the table [{lo:g}, {hi:g}]: clipped to entry {code}"]
    else:
        reason = [f"nearest table entry: {code}"]
    abs_err, rel_err = _errors(value, decoded)
    return Explanation(
        value, fmt.name, "codebook", code, f"{code:0{fmt.bits}b}", None, None, None, decoded,
        _exact_decimal(decoded), abs_err, rel_err, True, reason,
    )


def explain(value: float | str, fmt: str, saturate: bool = False) -> Explanation:
    """Explain how ``value`` is stored in format ``fmt`` (a name or alias, see ``list_formats``).

    ``saturate`` applies to float formats (clamp overflow and ±inf to ±max); integer and codebook
    formats always saturate. Raises ValueError for a non-number, an unknown format, or NaN in a
    format without NaN.
    """
    x = parse_value(value)
    f = get_format(fmt)
    if isinstance(f, FloatFormat):
        return _explain_float(x, f, saturate)
    if isinstance(f, IntFormat):
        return _explain_int(x, f)
    return _explain_codebook(x, f)
