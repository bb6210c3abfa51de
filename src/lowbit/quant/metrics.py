"""Error metrics between a reference tensor and its quantized approximation."""

from __future__ import annotations

import math

import torch


def _pair(ref: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs {tuple(approx.shape)}")
    return ref.detach().double().flatten(), approx.detach().double().flatten()


def mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error."""
    r, a = _pair(ref, approx)
    return float(((r - a) ** 2).mean())


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref-approx)^2)`` in dB.

    ``inf`` when the approximation is exact.
    """
    r, a = _pair(ref, approx)
    noise = float(((r - a) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Largest absolute elementwise error."""
    r, a = _pair(ref, approx)
    return float((r - a).abs().max())


def cosine_similarity(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors (1.0 for two zero tensors)."""
    r, a = _pair(ref, approx)
    denom = float(r.norm() * a.norm())
    if denom == 0.0:
        return 1.0 if float(r.norm()) == float(a.norm()) else 0.0
    return float(r @ a) / denom


def error_report(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """All four metrics at once."""
    return {
        "mse": mse(ref, approx),
        "sqnr_db": sqnr_db(ref, approx),
        "max_abs": max_abs_error(ref, approx),
        "cosine": cosine_similarity(ref, approx),
    }
