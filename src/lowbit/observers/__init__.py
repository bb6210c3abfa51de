"""Observers: calibration statistics -> per-tensor quantization ranges, registered by name."""

from lowbit.observers.base import OBSERVERS, Observer, get_observer, register_observer
from lowbit.observers.histogram import (
    HistogramObserver,
    MSEObserver,
    PercentileObserver,
    SymmetricHistogram,
)
from lowbit.observers.kl import KLObserver, kl_divergences, kl_threshold_bins
from lowbit.observers.minmax import MinMaxObserver, MovingAverageObserver

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "SymmetricHistogram",
    "get_observer",
    "kl_divergences",
    "kl_threshold_bins",
    "register_observer",
]
