"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al.).

Per input channel j of the linears sharing an input x,
``s_j = max|x_j|^alpha / max_i max_r |W_i[r, j]|^(1 - alpha)``; then ``x -> x / s`` is folded
into the producer (the preceding LayerNorm/RMSNorm) and ``W_i[:, j] *= s_j``, leaving the float
output unchanged while flattening the per-channel activation ranges that per-tensor or per-token
activation quantization must cover. The weights are then rounded to nearest with their spec, and
activations are quantized as usual (dynamic at run time, or static from statistics re-collected
after smoothing — hence ``restat_after_prepare``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, BlockContext, LayerStats, check_number
from lowbit.models.mappings import fold_scales, linear_weight_2d, mappings_for, resolve_mappings
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``act_max^alpha / weight_max^(1-alpha)`` per channel; 1 where either range is 0."""
    a, w = act_max.float(), weight_max.float()
    s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class SmoothQuant(Algorithm):
    """alpha: migration strength (1: every channel's range onto the weights, 0: onto the
    activations, weights scaled to max 1; 0.5 splits it evenly); fold_linear_pairs: also
    smooth linear -> linear pairs of the mapping table (v_proj -> o_proj, up_proj -> down_proj),
    not only norm -> linear ones as in the paper."""

    alpha: float = 0.5
    fold_linear_pairs: bool = False
    name = "smoothquant"
    needs_calibration = True
    restat_after_prepare = True

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, 0, 1)

    def check_specs(self, specs: Mapping[str, QuantSpec]) -> None:
        if specs and all(spec.act is None for spec in specs.values()):
            name, spec = next(iter(specs.items()))
            raise ValueError(
                f"SmoothQuant moves activation outliers into the weights, for specs that "
                f"quantize activations (w8a8, w8a8-static, w4a8); every selected spec is "
                f"weight-only (e.g. {spec} for {name!r}): use algorithm='awq' or 'gptq'"
            )

    def prepare_block(self, ctx: BlockContext) -> list[str]:
        if mappings_for(ctx.arch) is None:
            return [f"no SmoothQuant mapping for model_type {ctx.arch!r}: activations not "
                    "smoothed, plain W8A8 used"]
        mappings, notes = resolve_mappings(ctx.block, ctx.arch)
        weight_only: list[tuple[str, QuantSpec]] = []
        for m in mappings:
            label = f"{m.prev_name} -> {', '.join(m.next_names)}"
            if m.prev_kind != "norm" and not self.fold_linear_pairs:
                continue
            specs = [ctx.spec_for(n) for n in m.next_names if ctx.spec_for(n) is not None]
            if not specs:
                continue
            if all(spec.act is None for spec in specs):  # smoothing only hurts weight-only
                weight_only.append((label, specs[0]))
                continue
            stats = next((ctx.stats[n] for n in m.next_names
                          if n in ctx.stats and ctx.stats[n].abs_max is not None), None)
            if stats is None:
                raise ValueError(f"SmoothQuant needs activation ranges (abs_max) for one of "
                                 f"{', '.join(m.next_names)}; none were collected")
            w_max = torch.stack([linear_weight_2d(n).abs().amax(0) for n in m.nexts]).amax(0)
            s = smoothing_scales(stats.abs_max, w_max, self.alpha)
            before = _outlier_ratio(stats.abs_max)
            fold_scales(m, s)
            after = _outlier_ratio(stats.abs_max / s)
            notes.append(f"{label}: activation max/mean over channels {before:.1f} -> {after:.1f}")
        notes += [f"{label}: not smoothed ({spec} is weight-only)" for label, spec in weight_only]
        return notes

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        return QuantizedTensor.from_float(weight, spec)


def _outlier_ratio(channel_max: torch.Tensor) -> float:
    """max over channels of the per-channel range divided by its mean."""
    c = channel_max.float()
    return float(c.max() / c.mean().clamp(min=1e-12))
