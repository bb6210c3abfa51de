"""HQQ: calibration-free refinement of affine qparams by half-quadratic optimisation.

Minimises the sparsity-promoting loss ``|W - Q^-1(Q(W))|_p^p`` (p < 1) by alternating
(Badri & Shaji, "Half-Quadratic Quantization"):

1. ``W_e = shrink_p(W - W_r, beta)`` — the generalised soft-threshold of the error, which lets a
   few large errors (outliers) go unexplained instead of dragging the whole block;
2. ``z = mean(Q - (W - W_e) / s)`` per block (the closed-form zero-point; rounded for integer
   zero-points), then the least-squares scale ``s = <W - W_e, q - z> / <q - z, q - z>`` (the
   scale step extends the original, which refines only z, to symmetric and integer-zero specs);
3. ``beta *= kappa``.

Every candidate is evaluated through the spec's own maps (stored dtypes, integer zero-points
rounded), and each block keeps the best qparams seen by weight MSE, so HQQ never increases the
weight error of the RTN starting point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, LayerStats, check_number
from lowbit.quant.layout import layout_for
from lowbit.quant.maps import (
    QParams,
    affine_codes,
    affine_values,
    choose_qparams,
    keep_better,
    qrange,
    symmetric_zero,
    to_double_quantized,
)
from lowbit.spec import QuantSpec, torch_dtype
from lowbit.tensor import QuantizedTensor


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|_p^p / beta``: ``sign(x) relu(|x| - |x|^(p-1) / beta)``."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


@dataclass
class HQQ(Algorithm):
    """iters: half-quadratic iterations; p: the l_p exponent (< 1); beta/kappa: penalty schedule."""

    iters: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    name = "hqq"

    def __post_init__(self) -> None:
        check_number("iters", self.iters, 1, float("inf"), integer=True)
        check_number("p", self.p, 0, 1, low_open=True)
        check_number("beta", self.beta, 0, float("inf"), low_open=True, high_open=True)
        check_number("kappa", self.kappa, 1, float("inf"), high_open=True)

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        if spec.kind != "affine":
            raise ValueError(f"HQQ refines affine (intN/uintN) qparams; got {spec}")
        qp = self.refine(weight, spec)
        return QuantizedTensor.from_float(weight, spec, qp)

    def refine(self, weight: torch.Tensor, spec: QuantSpec) -> QParams:
        """HQQ-refined qparams for ``weight`` (same shapes and dtypes as ``choose_qparams``;
        a double-quantized spec's are refined as float, then double-quantized)."""
        start = choose_qparams(weight, spec)
        if spec.double_quantized:  # from the k-quant's own (searched) scales, refined as float
            plain = QParams(scale=start.scale, zero_point=start.zero_point)
            return to_double_quantized(self._refine(weight, spec.plain_scales(), plain), spec)
        return self._refine(weight, spec, start)

    def _refine(self, weight: torch.Tensor, spec: QuantSpec, start: QParams) -> QParams:
        layout = layout_for(weight.shape, spec)
        wb = layout.blocked(layout.to_2d(weight.detach()).float())  # [nr, nc, n]
        qmin, _ = qrange(spec)
        scale_dtype = torch_dtype(spec.scale_dtype)
        zero_dtype = torch_dtype(spec.zero_dtype)

        def evaluate(qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            s = qp.scale.float().unsqueeze(-1)
            z = qp.zero_point.float().unsqueeze(-1) if spec.has_zero_point else (
                symmetric_zero(spec))
            codes = affine_codes(wb, s, z, spec)
            w_r = affine_values(codes, s, z, spec)
            return w_r, codes, ((wb - w_r) ** 2).mean(-1)

        best = QParams(scale=start.scale.clone(),
                       zero_point=None if start.zero_point is None else start.zero_point.clone())
        w_r, codes, best_err = evaluate(best)
        scale = best.scale.float().unsqueeze(-1)
        zero = best.zero_point.float().unsqueeze(-1) if spec.has_zero_point else None
        beta = self.beta
        for _ in range(self.iters):
            w_e = shrink_lp(wb - w_r, beta, self.p)
            q = codes.float() + qmin  # integer levels
            target = wb - w_e
            if spec.has_zero_point:
                zero = (q - target / scale).mean(-1, keepdim=True)
                if spec.zero_point == "int":
                    lo, hi = qrange(spec)
                    zero = zero.round().clamp(lo, hi)
            centred = q - (zero if spec.has_zero_point else symmetric_zero(spec))
            num = (target * centred).sum(-1, keepdim=True)
            den = (centred * centred).sum(-1, keepdim=True)
            # same sign as before (full-range scales are negative where the block's extreme is)
            scale = torch.where((num * scale > 0) & (den > 0), num / den.clamp(min=1e-12), scale)
            cand = QParams(
                scale=scale.squeeze(-1).to(scale_dtype),
                zero_point=zero.squeeze(-1).to(zero_dtype) if spec.has_zero_point else None,
            )
            w_r, codes, err = evaluate(cand)
            best_err = keep_better(best, best_err, cand, err)
            scale = cand.scale.float().unsqueeze(-1)
            beta *= self.kappa
        return best
