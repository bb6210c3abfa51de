"""The Observer interface and the name -> class registry.

An observer sees activations batch by batch (``update``) and turns what it saw into per-tensor
quantization parameters (``qparams``). It only chooses a range: the scale and zero-point always
come from :func:`lowbit.quant.qparams_from_range`, so the grid is the one the maps use.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.quant import QParams, check_finite, qparams_from_range
from lowbit.spec import QuantSpec


class Observer:
    """Collects statistics of a tensor stream and chooses a per-tensor clipping range.

    Subclasses implement ``_observe(x)`` (``x`` float32, flat, finite, non-empty) and
    ``_range(spec) -> (lo, hi)``; the base tracks the exact min/max and element count.
    """

    name = "observer"

    def __init__(self) -> None:
        self.min_val: float = float("inf")
        self.max_val: float = float("-inf")
        self.n_elements: int = 0
        self.n_updates: int = 0

    def update(self, x: torch.Tensor) -> None:
        """Observe a tensor of any shape and float dtype (many calls accumulate)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.numel() == 0:
            return
        flat = x.detach().reshape(-1).float()
        check_finite(flat, "observed tensor")
        self.min_val = min(self.min_val, float(flat.min()))
        self.max_val = max(self.max_val, float(flat.max()))
        self.n_elements += flat.numel()
        self.n_updates += 1
        self._observe(flat)

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        raise NotImplementedError

    def clip_range(self, spec: QuantSpec) -> tuple[float, float]:
        """The chosen ``(lo, hi)`` range for ``spec`` (before ``qparams_from_range``)."""
        if self.n_elements == 0:
            raise ValueError(f"{self.name} observer has seen no data; call update(x) first")
        lo, hi = self._range(spec)
        return float(lo), float(hi)

    def qparams(self, spec: QuantSpec) -> QParams:
        """Per-tensor QParams (scale and zero-point of shape ``[1, 1]``) for ``spec``."""
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if spec.granularity != "tensor":
            raise ValueError(
                f"spec {spec} has granularity={spec.granularity!r}; observers choose one range "
                "per tensor, so use granularity='tensor'"
            )
        if spec.kind == "kmeans":
            raise ValueError(f"spec {spec} learns a codebook; observers need a range-based format")
        lo, hi = self.clip_range(spec)
        return qparams_from_range(torch.tensor([[lo]]), torch.tensor([[hi]]), spec)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_elements={self.n_elements}, "
            f"min={self.min_val:.4g}, max={self.max_val:.4g})"
        )


OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(cls: type[Observer]) -> type[Observer]:
    """Class decorator: register an Observer subclass under its ``name``."""
    OBSERVERS[cls.name] = cls
    return cls


def get_observer(name: str, **kwargs: Any) -> Observer:
    """A new observer by registered name (``minmax``, ``moving_average``, ``percentile``, ...)."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; allowed: {', '.join(sorted(OBSERVERS))}")
    try:
        return OBSERVERS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"observer {name!r}: {e}") from None
