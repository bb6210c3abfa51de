"""Model integration: module selection by name pattern (and, later, HF model loading)."""

from lowbit.models.select import matches, resolve_spec

__all__ = ["matches", "resolve_spec"]
