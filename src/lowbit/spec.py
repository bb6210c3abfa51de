"""QuantSpec: what a quantized tensor is, as a frozen value, and the named presets.

A spec says *what* the codes mean (format, granularity, symmetric or not, scale dtype); it holds no
data and no algorithm. Presets are a table of specs, not code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

GRANULARITIES = ("tensor", "channel", "group", "block", "token")
ROUNDINGS = ("nearest", "stochastic")
ZERO_POINTS = ("int", "float")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
GRID_KINDS = ("affine", "float", "codebook", "kmeans")


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec's dtype name ("float32", "float16", "bfloat16")."""
    return _TORCH_DTYPES[name]


def _int_format(name: str) -> tuple[bool, int] | None:
    """('int4' -> (True, 4)), ('uint3' -> (False, 3)); None for non-integer names."""
    for prefix, signed in (("uint", False), ("int", True)):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return signed, int(name[len(prefix) :])
    return None


# Formats a spec can name besides intN/uintN; value: (grid kind, bits).
_NON_INT_FORMATS: dict[str, tuple[str, int]] = {
    "nf4": ("codebook", 4),
    "fp8_e4m3fn": ("float", 8),
    "fp8_e5m2": ("float", 8),
    "fp6_e3m2": ("float", 6),
    "fp6_e2m3": ("float", 6),
    "fp4_e2m1": ("float", 4),
    **{f"pow2_{b}": ("codebook", b) for b in range(2, 9)},
    **{f"kmeans{b}": ("kmeans", b) for b in range(1, 9)},
}


def spec_format_names() -> list[str]:
    """Every format name a QuantSpec accepts."""
    ints = [f"{p}{b}" for p in ("int", "uint") for b in range(1, 9)]
    return ints + list(_NON_INT_FORMATS)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized.

    format: "int1".."int8", "uint1".."uint8" (uniform affine grid); "fp8_e4m3fn", "fp8_e5m2",
        "fp6_e3m2", "fp6_e2m3", "fp4_e2m1" (float value grids times a scale); "nf4", "pow2_B"
        (fixed codebooks times an absmax scale); "kmeansB" (a learned 2**B-entry codebook per
        block).
    granularity: "tensor" | "channel" (one scale per index of ``axis``) | "group" (``group_size``
        consecutive elements along the last, reduction, dim) | "block" (``block`` = (rows, cols)
        tiles of the 2-D view) | "token" (one scale per row of the last dim; for activations).
    symmetric: zero maps to code zero and the scale comes from absmax; otherwise min-max with a
        zero-point, integer (``zero_point="int"``) or float (``"float"``, as HQQ).
    full_range: (symmetric integer weights) the block's largest-magnitude value lands on the
        grid's extra negative level, ``s = v / -2**(b-1)`` with ``v``'s sign (negative when
        ``v > 0``), so all ``2**b`` levels are used instead of ``2**b - 1`` (llama.cpp's
        Q4_0 / Q5_0 rule); spec-string flag ``-full``.
    scale_bits, super_group: (integer group specs) double quantization, as llama.cpp's k-quants:
        each group's scale (and, asymmetric, its minimum) is itself stored as a ``scale_bits``-bit
        code times one ``scale_dtype`` scale per ``super_group`` consecutive groups of a row
        (Q4_K: ``uint4-g32-asym-fz-dq6x8``); spec-string flag ``-dqBxS``. Asymmetric specs need
        ``zero_point="float"``: the minimum is stored in value units (``x~ = s*q - m``).
    act: the activation spec of a W*A* scheme (quantized at run time when ``act.dynamic``).
    """

    format: str = "uint4"
    granularity: str = "group"
    group_size: int | None = 128
    block: tuple[int, int] | None = None
    axis: int = 0
    symmetric: bool = False
    zero_point: str = "int"
    scale_dtype: str = "float16"
    zero_dtype: str = "float16"
    clip_ratio: float = 1.0
    rounding: str = "nearest"
    dynamic: bool = False
    full_range: bool = False
    scale_bits: int | None = None
    super_group: int | None = None
    act: QuantSpec | None = field(default=None)

    def __post_init__(self) -> None:
        if self.format not in spec_format_names():
            raise ValueError(
                f"format={self.format!r} is not a known format; allowed: "
                f"{', '.join(spec_format_names())}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={self.granularity!r}; allowed: {', '.join(GRANULARITIES)}"
            )
        for name in ("symmetric", "dynamic", "full_range"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: True, False")
        if not _is_int(self.axis):
            raise ValueError(f"axis={self.axis!r}; allowed: an int (a dim of the weight)")
        if not isinstance(self.clip_ratio, (int, float)) or isinstance(self.clip_ratio, bool):
            raise ValueError(f"clip_ratio={self.clip_ratio!r}; allowed: 0 < clip_ratio <= 1")
        if self.granularity == "group":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(
                    f"group_size={self.group_size!r}; granularity='group' needs a positive int"
                )
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.granularity == "block":
            if (
                self.block is None
                or len(self.block) != 2
                or not all(_is_int(b) and b >= 1 for b in self.block)
            ):
                raise ValueError(
                    f"block={self.block!r}; granularity='block' needs (rows, cols), "
                    "two positive ints"
                )
            object.__setattr__(self, "block", tuple(self.block))
        elif self.block is not None:
            object.__setattr__(self, "block", None)
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point={self.zero_point!r}; allowed: int, float")
        for name in ("scale_dtype", "zero_dtype"):
            if getattr(self, name) not in FLOAT_DTYPES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}; allowed: {', '.join(FLOAT_DTYPES)}"
                )
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"clip_ratio={self.clip_ratio!r}; allowed: 0 < clip_ratio <= 1")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r}; allowed: nearest, stochastic")
        kind = self.kind
        if kind == "affine" and self.symmetric and self.bits == 1:
            raise ValueError(
                f"format={self.format!r} with symmetric=True: a 1-bit grid has no level above "
                "zero; use symmetric=False (levels {min, max}) or bits >= 2"
            )
        if self.full_range and kind != "affine":
            raise ValueError(f"full_range=True with format={self.format!r}: it is for integer "
                             "grids (intN / uintN)")
        if self.full_range and not self.symmetric:
            raise ValueError(f"full_range=True with symmetric=False ({self.format}): it needs "
                             "a symmetric grid (-sym)")
        if self.full_range and self.dynamic:
            raise ValueError("full_range=True with dynamic=True: it is for weights (kernels "
                             "quantize activations with absmax / qmax)")
        self._check_double_quantization(kind)
        if kind == "kmeans" and not self.symmetric:
            # a learned codebook has no zero-point: one value keeps equal specs equal
            object.__setattr__(self, "symmetric", True)
        if kind in ("float", "codebook") and not self.symmetric:
            raise ValueError(
                f"format={self.format!r} is a fixed signed grid scaled by absmax; it needs "
                "symmetric=True"
            )
        # fields a spec does not use take one value, so specs that quantize alike compare equal
        if self.granularity != "channel":
            object.__setattr__(self, "axis", 0)
        if not self.has_zero_point:
            object.__setattr__(self, "zero_point", "int")
            object.__setattr__(self, "zero_dtype", "float16")
        if self.act is not None and not isinstance(self.act, QuantSpec):
            raise TypeError(f"act must be a QuantSpec or None, got {type(self.act).__name__}")
        if self.rounding == "stochastic" and kind != "affine":
            raise ValueError(f"rounding='stochastic' is implemented for integer formats; "
                             f"{self.format!r} rounds to nearest")
        if self.act is not None and self.act.full_range:
            raise ValueError(f"act={self.act}: full_range is for weights, not activations")
        if self.act is not None and not self.act.dynamic and self.act.granularity != "tensor":
            raise ValueError(f"a static activation spec has one calibrated scale per layer "
                             f"input: granularity='tensor', not {self.act.granularity!r} (or "
                             "dynamic=True)")

    def _check_double_quantization(self, kind: str) -> None:
        if self.scale_bits is None:
            if self.super_group is not None:
                raise ValueError(f"super_group={self.super_group!r} without scale_bits: it "
                                 "counts the groups sharing one scale of the scale codes")
            return
        if not _is_int(self.scale_bits) or not 2 <= self.scale_bits <= 8:
            raise ValueError(f"scale_bits={self.scale_bits!r}; allowed: None or an int from 2 "
                             "to 8")
        if self.super_group is None:
            object.__setattr__(self, "super_group", 8)
        if not _is_int(self.super_group) or self.super_group < 1:
            raise ValueError(f"super_group={self.super_group!r}; allowed: a positive int "
                             "(groups per super-block)")
        if kind != "affine" or self.granularity != "group":
            raise ValueError(f"scale_bits={self.scale_bits} with format={self.format!r}, "
                             f"granularity={self.granularity!r}: double quantization is for "
                             "integer formats with granularity='group'")
        if self.dynamic:
            raise ValueError(f"scale_bits={self.scale_bits} with dynamic=True: double "
                             "quantization is for weights")
        if self.has_zero_point and self.zero_point != "float":
            raise ValueError(f"scale_bits={self.scale_bits} with zero_point='int': a "
                             "double-quantized asymmetric spec stores each group's minimum as "
                             "a code; use zero_point='float' (-fz)")

    def plain_scales(self) -> QuantSpec:
        """This spec with float group scales (and zero-points) in place of double-quantized
        codes: what algorithms that refine float qparams work on."""
        return dataclasses.replace(self, scale_bits=None, super_group=None)

    @property
    def double_quantized(self) -> bool:
        """Whether group scales (and minimums) are stored as codes under super-block scales."""
        return self.scale_bits is not None

    # ---- derived facts -------------------------------------------------------------------
    @cached_property
    def kind(self) -> str:
        """'affine' (intN/uintN), 'float' (fp grids), 'codebook' (nf4, pow2) or 'kmeans'."""
        return "affine" if _int_format(self.format) else _NON_INT_FORMATS[self.format][0]

    @cached_property
    def bits(self) -> int:
        parsed = _int_format(self.format)
        return parsed[1] if parsed else _NON_INT_FORMATS[self.format][1]

    @cached_property
    def signed(self) -> bool:
        """Signed integer range (int) or unsigned (uint); fixed grids count as signed."""
        parsed = _int_format(self.format)
        return parsed[0] if parsed else True

    @property
    def has_zero_point(self) -> bool:
        return self.kind == "affine" and not self.symmetric

    @property
    def has_scale(self) -> bool:
        return self.kind != "kmeans"

    def __str__(self) -> str:
        gran = {
            "tensor": "tensor",
            "channel": "ch" if self.axis == 0 else f"ch{self.axis}",
            "group": f"g{self.group_size}",
            "block": f"b{self.block[0]}x{self.block[1]}" if self.block else "b",
            "token": "token",
        }[self.granularity]
        parts = [self.format, gran]
        if self.kind == "affine":
            parts.append("sym" if self.symmetric else "asym")
            if self.full_range:
                parts.append("full")
            if not self.symmetric and self.zero_point == "float":
                parts.append("fz")
            if self.scale_bits is not None:
                parts.append(f"dq{self.scale_bits}x{self.super_group}")
        if self.clip_ratio != 1.0:  # positional: an exponent's "-" would split the string
            parts.append("clip" + np.format_float_positional(self.clip_ratio, trim="-"))
        if self.rounding == "stochastic":
            parts.append("sr")
        if self.dynamic:
            parts.append("dyn")
        text = "-".join(parts)
        return f"{text}+a:{self.act}" if self.act is not None else text

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("full_range", "scale_bits", "super_group") and not value:
                continue  # absent unless set: checkpoints stay readable by older lowbit
            if f.name == "act":
                value = None if value is None else value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        if not isinstance(data, dict):
            raise TypeError(f"QuantSpec.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantSpec fields {unknown}; allowed: {sorted(known)}")
        kwargs = dict(data)
        if kwargs.get("act") is not None:
            kwargs["act"] = cls.from_dict(kwargs["act"])
        if kwargs.get("block") is not None:
            kwargs["block"] = tuple(kwargs["block"])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)


_ACT_INT8_TOKEN = {
    "format": "int8",
    "granularity": "token",
    "symmetric": True,
    "scale_dtype": "float32",
    "dynamic": True,
}

# Presets as data: name -> QuantSpec fields (and a one-line description for tables and --help).
PRESETS: dict[str, dict[str, Any]] = {
    "w8": {
        "doc": "int8 symmetric, one scale per output channel",
        "spec": {"format": "int8", "granularity": "channel", "symmetric": True},
    },
    "w4g128": {
        "doc": "uint4 asymmetric, groups of 128, fp16 scale + zero",
        "spec": {"format": "uint4", "granularity": "group", "group_size": 128},
    },
    "w4g64": {
        "doc": "uint4 asymmetric, groups of 64, fp16 scale + zero",
        "spec": {"format": "uint4", "granularity": "group", "group_size": 64},
    },
    "w4g128-sym": {
        "doc": "int4 symmetric, groups of 128, fp16 scale (full range: all 16 levels)",
        "spec": {"format": "int4", "granularity": "group", "group_size": 128, "symmetric": True,
                 "full_range": True},
    },
    "w3g128": {
        "doc": "uint3 asymmetric, groups of 128, fp16 scale + zero",
        "spec": {"format": "uint3", "granularity": "group", "group_size": 128},
    },
    "w2g64": {
        "doc": "uint2 asymmetric, groups of 64, fp16 scale + zero",
        "spec": {"format": "uint2", "granularity": "group", "group_size": 64},
    },
    "nf4g64": {
        "doc": "NormalFloat-4 codebook, absmax per group of 64 (QLoRA)",
        "spec": {"format": "nf4", "granularity": "group", "group_size": 64, "symmetric": True},
    },
    "fp4g32": {
        "doc": "fp4 e2m1 values, absmax scale per group of 32 (MXFP4-like, fp16 scale)",
        "spec": {"format": "fp4_e2m1", "granularity": "group", "group_size": 32,
                 "symmetric": True},
    },
    "fp8": {
        "doc": "fp8 e4m3fn values, absmax scale per output channel",
        "spec": {"format": "fp8_e4m3fn", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32"},
    },
    "km4": {
        "doc": "k-means 16-entry codebook per output channel (palettization)",
        "spec": {"format": "kmeans4", "granularity": "channel", "symmetric": True},
    },
    "km3": {
        "doc": "k-means 8-entry codebook per output channel (palettization)",
        "spec": {"format": "kmeans3", "granularity": "channel", "symmetric": True},
    },
    # llama.cpp's block types (GGUF): groups of 32 with an fp16 scale (lowbit.io.gguf)
    "q4_0": {
        "doc": "int4 symmetric, groups of 32, fp16 scale (GGUF Q4_0, llama.cpp's full range)",
        "spec": {"format": "int4", "granularity": "group", "group_size": 32, "symmetric": True,
                 "full_range": True},
    },
    "q4_1": {
        "doc": "uint4 asymmetric, groups of 32, fp16 scale + zero (GGUF Q4_1)",
        "spec": {"format": "uint4", "granularity": "group", "group_size": 32},
    },
    "q5_0": {
        "doc": "int5 symmetric, groups of 32, fp16 scale (GGUF Q5_0, llama.cpp's full range)",
        "spec": {"format": "int5", "granularity": "group", "group_size": 32, "symmetric": True,
                 "full_range": True},
    },
    "q5_1": {
        "doc": "uint5 asymmetric, groups of 32, fp16 scale + zero (GGUF Q5_1)",
        "spec": {"format": "uint5", "granularity": "group", "group_size": 32},
    },
    "q8_0": {
        "doc": "int8 symmetric, groups of 32, fp16 scale (GGUF Q8_0)",
        "spec": {"format": "int8", "granularity": "group", "group_size": 32, "symmetric": True},
    },
    # llama.cpp's k-quants: group scales (and minimums) stored as 6- or 8-bit codes under one
    # fp16 scale per super-block of 256 weights ("double quantization")
    "q4_k": {
        "doc": "uint4 asymmetric, groups of 32, 6-bit scale and minimum codes, fp16 per 256 "
               "(GGUF Q4_K, 4.5 bits per weight)",
        "spec": {"format": "uint4", "granularity": "group", "group_size": 32,
                 "zero_point": "float", "scale_bits": 6, "super_group": 8},
    },
    "q5_k": {
        "doc": "uint5 asymmetric, groups of 32, 6-bit scale and minimum codes, fp16 per 256 "
               "(GGUF Q5_K, 5.5 bits per weight)",
        "spec": {"format": "uint5", "granularity": "group", "group_size": 32,
                 "zero_point": "float", "scale_bits": 6, "super_group": 8},
    },
    "q2_k": {
        "doc": "uint2 asymmetric, groups of 16, 4-bit scale and minimum codes, fp16 per 256 "
               "(GGUF Q2_K, 2.625 bits per weight)",
        "spec": {"format": "uint2", "granularity": "group", "group_size": 16,
                 "zero_point": "float", "scale_bits": 4, "super_group": 16},
    },
    "q3_k": {
        "doc": "int3 symmetric full range, groups of 16, signed 6-bit scale codes, fp16 per 256 "
               "(GGUF Q3_K, 3.4375 bits per weight)",
        "spec": {"format": "int3", "granularity": "group", "group_size": 16, "symmetric": True,
                 "full_range": True, "scale_bits": 6, "super_group": 16},
    },
    "q6_k": {
        "doc": "int6 symmetric full range, groups of 16, signed 8-bit scale codes, fp16 per 256 "
               "(GGUF Q6_K, 6.5625 bits per weight)",
        "spec": {"format": "int6", "granularity": "group", "group_size": 16, "symmetric": True,
                 "full_range": True, "scale_bits": 8, "super_group": 16},
    },
    "w8a8": {
        "doc": "int8 per-channel weights, int8 per-token dynamic activations",
        "spec": {"format": "int8", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32", "act": _ACT_INT8_TOKEN},
    },
    "w4a8": {
        "doc": "uint4 asymmetric weights in groups of 128 (as w4g128), int8 per-token dynamic "
               "activations (integer dot products on AVX2 CPUs)",
        "spec": {"format": "uint4", "granularity": "group", "group_size": 128,
                 "act": _ACT_INT8_TOKEN},
    },
    # One side at 7 bits: no uint8 x int8 pair sum can saturate int16 in fbgemm's AVX2 int8 GEMM
    # (vpmaddubsw without VNNI), so its exact path runs one pass instead of two (cpu_w8a8 hands
    # big calls to it; below that these presets run at w8a8's speed).
    "w7a8": {
        "doc": "int7 per-channel weights, int8 per-token dynamic activations (one-pass int8 "
               "GEMM on AVX2 CPUs)",
        "spec": {"format": "int7", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32", "act": _ACT_INT8_TOKEN},
    },
    "w8a7": {
        "doc": "int8 per-channel weights, int7 per-token dynamic activations (one-pass int8 "
               "GEMM on AVX2 CPUs)",
        "spec": {"format": "int8", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32", "act": {**_ACT_INT8_TOKEN, "format": "int7"}},
    },
    "fp8a8": {
        "doc": "fp8 e4m3fn per-channel weights, fp8 e4m3fn per-token dynamic activations "
               "(torch._scaled_mm on sm_89+ GPUs)",
        "spec": {"format": "fp8_e4m3fn", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32",
                 "act": {"format": "fp8_e4m3fn", "granularity": "token", "symmetric": True,
                         "scale_dtype": "float32", "dynamic": True}},
    },
    "w8a8-static": {
        # Symmetric int8 activations: the int8 x int8 GEMM needs no zero-point correction term,
        # and the inputs of transformer Linears (normed residual stream, attention output,
        # SiLU(gate) * up) are signed and roughly centred, so uint8's extra level buys little.
        "doc": "int8 per-channel weights, int8 per-tensor static activations (calibrated, "
               "symmetric)",
        "spec": {"format": "int8", "granularity": "channel", "symmetric": True,
                 "scale_dtype": "float32",
                 "act": {"format": "int8", "granularity": "tensor", "symmetric": True,
                         "scale_dtype": "float32", "dynamic": False}},
    },
}


def preset(name: str) -> QuantSpec:
    """The QuantSpec of a named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return QuantSpec.from_dict(PRESETS[name]["spec"])


SPEC_STRING_SYNTAX = ("FORMAT-GRANULARITY[-sym[-full]|-asym[-fz]][-dqBxS][-clipR][-sr][-dyn]"
                      "[+a:ACTIVATION SPEC], granularity tensor, ch, chAXIS, gN, bRxC or token, "
                      "-dqBxS: B-bit scale codes, S groups per super-block, e.g. "
                      "'uint4-g128-asym', 'uint4-g32-asym-fz-dq6x8' or "
                      "'int8-ch-sym+a:int8-token-sym-dyn'")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SPEC_STRING = re.compile(
    r"(?P<format>[^-]+)-(?P<gran>tensor|token|ch(?:-?\d+)?|g\d+|b\d+x\d+)(?P<flags>(?:-.+)?)")


@functools.lru_cache(maxsize=1)
def _preset_strings() -> dict[str, QuantSpec]:
    return {str(spec): spec for spec in map(preset, PRESETS)}


def parse_spec(text: str, *, activation: bool = False) -> QuantSpec:
    """The QuantSpec a spec string (``str(spec)``, as summaries and checkpoints print it) names:
    a preset's own spec when a preset prints the same (so its scale dtypes come along), else
    the fields the string gives with the defaults for the rest (float32 scales for the
    activation part, as every preset's and the integer-activation kernels take)."""
    if text in _preset_strings():
        return _preset_strings()[text]
    weight, _, act = text.partition("+a:")
    match = _SPEC_STRING.fullmatch(weight)
    if match is None or match["format"] not in spec_format_names():
        if weight.split("-")[0] in spec_format_names():
            raise ValueError(f"spec string {text!r}: no granularity after the format (tensor, "
                             f"ch, chAXIS, gN, bRxC, token); syntax: {SPEC_STRING_SYNTAX}")
        raise ValueError(f"unknown preset or spec string {text!r}; allowed: a preset "
                         f"({', '.join(PRESETS)}) or a spec string {SPEC_STRING_SYNTAX}")
    fields: dict[str, Any] = {"format": match["format"]}
    if activation:
        fields["scale_dtype"] = "float32"
    gran = match["gran"]
    if gran in ("tensor", "token"):
        fields["granularity"] = gran
    elif gran.startswith("ch"):
        fields.update(granularity="channel", axis=int(gran[2:] or 0))
    elif gran.startswith("g"):
        fields.update(granularity="group", group_size=int(gran[1:]))
    else:
        rows, cols = gran[1:].split("x")
        fields.update(granularity="block", block=(int(rows), int(cols)))
    for flag in match["flags"].split("-")[1:]:
        if flag in ("sym", "asym"):
            fields["symmetric"] = flag == "sym"
        elif flag == "fz":
            fields["zero_point"] = "float"
        elif flag == "full":
            fields["full_range"] = True
        elif flag == "sr":
            fields["rounding"] = "stochastic"
        elif flag == "dyn":
            fields["dynamic"] = True
        elif re.fullmatch(r"dq\d+x\d+", flag):
            bits, groups = flag[2:].split("x")
            fields.update(scale_bits=int(bits), super_group=int(groups))
        elif re.fullmatch(r"clip\d*\.?\d+", flag):
            fields["clip_ratio"] = float(flag[4:])
        else:
            raise ValueError(f"spec string {text!r}: unknown part {flag!r}; syntax: "
                             f"{SPEC_STRING_SYNTAX}")
    if "symmetric" not in fields and match["format"] in _NON_INT_FORMATS:
        fields["symmetric"] = True  # fixed grids and codebooks: no zero-point
    if act:
        fields["act"] = parse_spec(act, activation=True)
    return QuantSpec(**fields)


def as_spec(spec: str | QuantSpec | dict[str, Any]) -> QuantSpec:
    """Accept a preset name, a spec string (:func:`parse_spec`), a QuantSpec, or a dict of
    QuantSpec fields."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        if spec in PRESETS or "-" not in spec:
            return preset(spec)
        return parse_spec(spec)
    if isinstance(spec, dict):
        return QuantSpec.from_dict(spec)
    raise TypeError(
        f"spec must be a preset name, QuantSpec or dict, got {type(spec).__name__}"
    )
