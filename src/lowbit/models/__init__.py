"""Model integration: module selection by name pattern (and, later, HF model loading)."""

from lowbit.models.hf import load_hf_model
from lowbit.models.select import matches, resolve_spec

__all__ = ["load_hf_model", "matches", "resolve_spec"]
