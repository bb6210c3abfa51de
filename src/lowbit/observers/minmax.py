"""Range observers without histograms: running min/max and its moving average."""

from __future__ import annotations

import torch

from lowbit.observers.base import Observer, register_observer
from lowbit.spec import QuantSpec


@register_observer
class MinMaxObserver(Observer):
    """The exact min and max of everything observed: covers every value, outliers included."""

    name = "minmax"

    def _observe(self, x: torch.Tensor) -> None:
        pass  # the base class already tracks the exact min/max

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        return self.min_val, self.max_val


@register_observer
class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max.

    ``momentum`` is the weight of the new batch: ``m <- (1 - momentum) * m + momentum * batch``;
    the first batch sets ``m`` directly. A single outlier batch moves the range by only
    ``momentum`` of its excess, unlike min-max.
    """

    name = "moving_average"

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum={momentum!r}; allowed: 0 < momentum <= 1")
        self.momentum = float(momentum)
        self.avg_min: float | None = None
        self.avg_max: float | None = None

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.avg_min is None or self.avg_max is None:
            self.avg_min, self.avg_max = lo, hi
            return
        m = self.momentum
        self.avg_min = (1.0 - m) * self.avg_min + m * lo
        self.avg_max = (1.0 - m) * self.avg_max + m * hi

    def _range(self, spec: QuantSpec) -> tuple[float, float]:
        return float(self.avg_min), float(self.avg_max)
