"""AWQ: activation-aware weight quantization (Lin et al.) as per-input-channel scale search.

For the linears ``W_i`` sharing an input ``x`` (e.g. q/k/v after ``input_layernorm``), AWQ picks
``s = mean|x|^alpha`` (normalised so that ``sqrt(max s * min s) = 1``), ``alpha`` on a grid in
[0, 1), minimising the output error of the quantized layers

    sum_i || x W_i^T - (x / s) Q(W_i diag(s))^T ||^2
        = sum_i trace(D_i H D_i^T),   D_i = W_i - Q(W_i diag(s)) diag(1/s),   H = sum_t x_t x_t^T

(exact over every calibration token, from the Hessian the runner collects), or, with
``objective="block"``, the error of the whole block's outputs (``ctx.run_block``). ``alpha = 0``
is plain RTN, so the chosen scales never do worse on the calibration objective. The scales are
folded into the producer of ``x`` through :mod:`lowbit.models.mappings`; then ``quantize_weight``
searches a clip ratio per group (the one minimising that group's output error under the
re-collected Hessian) and rounds to nearest. Q is always the spec's own ``fake_quantize`` /
``choose_qparams``, so the search sees the final packing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, BlockContext, LayerStats, check_number
from lowbit.models.mappings import (
    ResolvedMapping,
    fold_scales,
    linear_weight_2d,
    mappings_for,
    resolve_mappings,
    set_linear_weight_2d,
)
from lowbit.quant.layout import layout_for
from lowbit.quant.maps import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    keep_better,
    quantize,
    to_double_quantized,
)
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

OBJECTIVES = ("layer", "block")


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``trace(D H D^T)``: the summed squared output error of a weight error ``D [out, in]``."""
    return ((delta @ hessian) * delta).sum()


def scaled_fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """``Q(W diag(s)) diag(1/s)``: the float weight a folded, quantized layer acts with."""
    return fake_quantize(weight * scales, spec) / scales


@dataclass
class AWQ(Algorithm):
    """grid: number of alpha values tried in [0, 1); clip: search a clip ratio per group;
    clip_grid / max_shrink: clip ratios 1, ..., 1 - max_shrink; duo_scaling: divide by the
    weights' normalised column magnitude too, ``s = x^a / w^(1-a)``; objective: "layer"
    (Hessian of the shared input) or "block" (run the block on the calibration inputs)."""

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    duo_scaling: bool = False
    objective: str = "layer"
    name = "awq"
    needs_calibration = True
    needs_hessian = True
    restat_after_prepare = True  # the clip search needs the Hessian of the scaled inputs

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid={self.grid!r}; allowed: a positive int")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise ValueError(f"clip_grid={self.clip_grid!r}; allowed: a positive int")
        check_number("max_shrink", self.max_shrink, 0, 1, high_open=True)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; allowed: {', '.join(OBJECTIVES)}")

    # ---- block transform -----------------------------------------------------------------
    def prepare_block(self, ctx: BlockContext) -> list[str]:
        if mappings_for(ctx.arch) is None:
            return [f"no AWQ mapping for model_type {ctx.arch!r}: scales not applied, "
                    "RTN" + (" with clip search" if self.clip else "") + " used"]
        mappings, notes = resolve_mappings(ctx.block, ctx.arch)
        reference = ctx.run_block() if self.objective == "block" else None
        for m in mappings:
            specs = [ctx.spec_for(n) for n in m.next_names]
            if all(s is None for s in specs):
                continue
            hessian, x_mean = _shared_input(ctx, m)
            scales, alpha, err, err_rtn = self.search_scales(
                m, specs, hessian, x_mean, ctx.run_block if reference is not None else None,
                reference,
            )
            label = f"{m.prev_name} -> {', '.join(m.next_names)}"
            if alpha == 0.0:
                notes.append(f"{label}: alpha=0 (no scaling beats RTN)")
                continue
            fold_scales(m, scales)
            gain = 1 - err / err_rtn if err_rtn > 0 else 0.0
            notes.append(f"{label}: alpha={alpha:.2f}, error {gain:.0%} below RTN")
        return notes

    def candidate_alphas(self) -> list[float]:
        return [i / self.grid for i in range(self.grid)]

    def search_scales(
        self,
        mapping: ResolvedMapping,
        specs: list[QuantSpec | None],
        hessian: torch.Tensor,
        x_mean: torch.Tensor,
        run_block: Callable[[], list[torch.Tensor]] | None = None,
        reference: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, float, float, float]:
        """Best scales ``[width]`` for one mapping: (scales, alpha, error, RTN's error)."""
        weights = [linear_weight_2d(n) for n in mapping.nexts]
        w_mean = None
        if self.duo_scaling:
            rows = [w.abs() / w.abs().amax(1, keepdim=True).clamp(min=1e-12) for w in weights]
            w_mean = torch.cat(rows, 0).mean(0)
        best_err, best_alpha, best_s = float("inf"), 0.0, torch.ones_like(x_mean)
        err_rtn = 0.0
        for alpha in self.candidate_alphas():
            s = x_mean.clamp(min=1e-8).pow(alpha)
            if w_mean is not None:
                s = s / w_mean.clamp(min=1e-8).pow(1 - alpha)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if alpha == 0.0:
                s = torch.ones_like(s)
            if run_block is None:
                err = sum(
                    float(output_error(w - scaled_fake_quantize(w, s, spec), hessian))
                    for w, spec in zip(weights, specs, strict=True)
                    if spec is not None
                )
            else:
                err = _block_error(mapping, weights, specs, s, run_block, reference)
            if alpha == 0.0:
                err_rtn = err
            if err < best_err:
                best_err, best_alpha, best_s = err, alpha, s
        return best_s, best_alpha, best_err, err_rtn

    # ---- per-layer core --------------------------------------------------------------------
    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        if not self.clip or stats is None or stats.hessian is None:
            return QuantizedTensor.from_float(weight, spec)
        return QuantizedTensor.from_float(weight, spec, self.search_clip(weight, spec, stats))

    def search_clip(self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QParams:
        """Per-block qparams from the clip ratio (1 down to ``1 - max_shrink``) that minimises
        each block's output error ``d H_bb d^T`` (blocks along the input dim: group/channel;
        a double-quantized spec's float qparams are searched, then double-quantized)."""
        if spec.double_quantized:
            return to_double_quantized(self.search_clip(weight, spec.plain_scales(), stats), spec)
        start = choose_qparams(weight, spec)
        layout = layout_for(weight.shape, spec)
        if (
            weight.dim() != 2
            or spec.kind == "kmeans"
            or layout.block_rows != 1
            or layout.channel_axis is not None
            or stats.hessian.shape != (weight.shape[1],) * 2
        ):
            return start
        w = weight.detach().float()
        bw = layout.block_cols
        nb = w.shape[1] // bw
        h = stats.hessian.float()
        h_blocks = torch.stack([h[i * bw:(i + 1) * bw, i * bw:(i + 1) * bw] for i in range(nb)])

        def block_errors(qp: QParams) -> torch.Tensor:
            codes, _, lay = quantize(w, spec, qp)
            d = (w - dequantize(codes, qp, spec, lay)).reshape(w.shape[0], nb, bw)
            return torch.einsum("rbi,bij,rbj->rb", d, h_blocks, d)

        best_err = block_errors(start)
        best = QParams(scale=start.scale.clone(),
                       zero_point=None if start.zero_point is None else start.zero_point.clone())
        for i in range(1, self.clip_grid + 1):
            ratio = 1 - self.max_shrink * i / self.clip_grid
            if ratio <= 0:
                break
            qp = choose_qparams(w, spec.replace(clip_ratio=spec.clip_ratio * ratio))
            err = block_errors(qp)
            best_err = keep_better(best, best_err, qp, err)
        return best


def _shared_input(ctx: BlockContext, m: ResolvedMapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian ``[in, in]`` and mean |x| ``[in]`` of the input shared by ``m``'s consumers."""
    for name in m.next_names:
        st = ctx.stats.get(name)
        if st is not None and st.tokens > 0:
            if st.hessian is not None:
                return st.hessian.float(), st.abs_mean.float()
            xs = ctx.inputs.get(name)
            if xs:
                x = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in xs])
                return x.t() @ x, st.abs_mean.float()
    raise ValueError(
        f"AWQ needs calibration statistics (Hessian or captured inputs) for one of "
        f"{', '.join(m.next_names)}; none were collected"
    )


@torch.no_grad()
def _block_error(
    m: ResolvedMapping,
    weights: list[torch.Tensor],
    specs: list[QuantSpec | None],
    s: torch.Tensor,
    run_block: Callable[[], list[torch.Tensor]],
    reference: list[torch.Tensor],
) -> float:
    """Squared error of the block outputs with ``m``'s consumers acting as if folded+quantized."""
    saved = [n.weight.detach().clone() for n in m.nexts]
    try:
        for n, w, spec in zip(m.nexts, weights, specs, strict=True):
            if spec is not None:
                set_linear_weight_2d(n, scaled_fake_quantize(w, s, spec))
        outs = run_block()
    finally:
        for n, w in zip(m.nexts, saved, strict=True):
            n.weight.copy_(w)
    return float(sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outs, reference,
                                                                           strict=True)))
