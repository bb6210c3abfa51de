"""Select modules by name: glob patterns (``model.layers.*.mlp.*``) or regexes (``re:...``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lowbit.spec import QuantSpec, as_spec


def matches(name: str, pattern: str) -> bool:
    """Glob match on the full module name, or ``re:`` regex search."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def patterns(value: str | Iterable[str] | None) -> list[str] | None:
    """``include`` / ``exclude`` as a list: one pattern may be given as a plain string (a string
    is an iterable of one-character patterns otherwise)."""
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if matches(name, p):
            return p
    return None


def resolve_spec(
    name: str, spec: str | QuantSpec | Mapping[str, Any]
) -> tuple[QuantSpec | None, str | None]:
    """The spec for module ``name``: one spec for all, or the first matching ``{pattern: spec}``.

    Returns ``(spec, pattern)``; ``(None, None)`` when no pattern of a mapping matches. A mapping
    value of ``None`` leaves matching modules unquantized.
    """
    if isinstance(spec, Mapping) and not _looks_like_spec_fields(spec):
        for pattern, value in spec.items():
            if matches(name, pattern):
                return (None if value is None else as_spec(value)), pattern
        return None, None
    return as_spec(spec), None


def check_specs(spec: str | QuantSpec | Mapping[str, Any]) -> None:
    """Raise ValueError now for a spec, or a value of a ``{pattern: spec}`` mapping, that does
    not parse (before any module is looked at: a model with nothing to quantize still fails)."""
    if isinstance(spec, Mapping) and not _looks_like_spec_fields(spec):
        for pattern, value in spec.items():
            if value is not None:
                try:
                    as_spec(value)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"spec for {pattern!r}: {e}") from None
        return
    as_spec(spec)


def _looks_like_spec_fields(d: Mapping[str, Any]) -> bool:
    return "format" in d and not any(k.startswith("re:") or "*" in k for k in d)


def choose_spec(
    name: str,
    spec: str | QuantSpec | Mapping[str, Any],
    include: Iterable[str] | None,
    exclude: Iterable[str],
) -> tuple[QuantSpec | None, str]:
    """The spec for module ``name`` after include/exclude, or ``(None, why it is skipped)``."""
    if include is not None and first_match(name, include) is None:
        return None, "not matched by include"
    hit = first_match(name, exclude)
    if hit is not None:
        return None, f"excluded by {hit!r}"
    layer_spec, _ = resolve_spec(name, spec)
    if layer_spec is None:
        return None, "no spec pattern matches"
    return layer_spec, ""
