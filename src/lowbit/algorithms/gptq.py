"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar et al.).

For a layer ``y = W x`` and calibration inputs X, GPTQ quantizes W column by column (input
feature by input feature) and spreads each column's rounding error over the not-yet-quantized
columns through the inverse Hessian ``H^-1``, ``H = 2 X X^T``, minimising ||W X - Q X||^2.
Columns are processed in lazy blocks (``block`` columns at a time, rank-``block`` update of the
rest), with the upper Cholesky factor of ``H^-1``. Each column is quantized with the spec's own
map (``quantize`` with the column's group qparams), so the result equals the final packing bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, LayerStats
from lowbit.formats.packing import pack
from lowbit.quant.maps import (
    QParams,
    affine_codes,
    affine_values,
    choose_qparams,
    symmetric_zero,
)
from lowbit.spec import QuantSpec, torch_dtype
from lowbit.tensor import QuantizedTensor


@dataclass
class GPTQ(Algorithm):
    """damp: fraction of mean(diag H) added to the diagonal; act_order: quantize columns in
    order of decreasing diag(H) (stored with ``g_idx``); static_groups: with act_order, choose
    every group's qparams up front from the unmodified weight so groups stay in natural order
    (no g_idx, fast kernels apply); block: lazy-batch width."""

    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block: int = 128
    name = "gptq"
    needs_calibration = True
    needs_hessian = True

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp={self.damp}; allowed: 0 < damp < 1")
        if self.block < 1:
            raise ValueError(f"block={self.block}; allowed: a positive int")

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        if stats is None or stats.hessian is None:
            raise ValueError("GPTQ needs calibration statistics with a Hessian (stats.hessian)")
        if spec.kind != "affine":
            raise ValueError(f"GPTQ here supports integer (affine) specs; got {spec}")
        if spec.granularity not in ("tensor", "channel", "group") or (
            spec.granularity == "channel" and spec.axis != 0
        ):
            raise ValueError(
                f"GPTQ needs per-tensor, per-output-channel or group granularity; got {spec}"
            )
        if weight.dim() != 2:
            raise ValueError(f"GPTQ takes a 2-D weight [out, in]; got shape {tuple(weight.shape)}")
        rows, cols = weight.shape
        if stats.hessian.shape != (cols, cols):
            raise ValueError(
                f"Hessian shape {tuple(stats.hessian.shape)} does not match in_features={cols}"
            )
        W = weight.detach().float().clone()
        H = stats.hessian.detach().float().clone() * (2.0 / max(stats.tokens, 1))
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        group = spec.group_size if spec.granularity == "group" else None
        if group is not None and cols % group:
            raise ValueError(f"group_size={group} does not divide in_features={cols}")
        n_groups = cols // group if group else 1
        column_spec = spec.replace(granularity="channel", group_size=None, axis=0)

        perm = torch.argsort(torch.diag(H), descending=True) if self.act_order else None
        # Per-tensor / per-channel qparams, and static groups, come from the unmodified weight;
        # other groups are chosen when the loop reaches them, from the updated weight.
        fixed = choose_qparams(W, spec) if group is None or self.static_groups else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]

        Hinv = _inverse_hessian_cholesky(H, self.damp)
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        scales = torch.zeros(rows, n_groups, dtype=torch_dtype(spec.scale_dtype))
        zeros = torch.zeros(rows, n_groups, dtype=torch_dtype(spec.zero_dtype))
        g_idx = torch.zeros(cols, dtype=torch.int32)
        current: QParams | None = None
        last: QParams | None = None
        for i1 in range(0, cols, self.block):
            i2 = min(i1 + self.block, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                natural = int(perm[col]) if perm is not None else col
                if group is None:
                    gi = 0
                    if current is None:
                        current = _rows(fixed, rows)
                elif fixed is not None:
                    gi = natural // group
                    current = _rows(fixed, rows, gi)
                else:
                    gi = col // group
                    if col % group == 0:
                        ahead = W1[:, i : i + group]
                        if ahead.shape[1] < group:
                            ahead = torch.cat([ahead, W[:, i2 : i2 + group - ahead.shape[1]]], 1)
                        current = choose_qparams(ahead, column_spec)
                if group is not None:
                    scales[:, gi] = current.scale[:, 0]
                    if current.zero_point is not None:
                        zeros[:, gi] = current.zero_point[:, 0]
                g_idx[natural] = gi
                if current is not last:
                    last = current
                    s_col = current.scale.float()
                    z_col = current.zero_point.float() if spec.has_zero_point else (
                        symmetric_zero(spec))
                w = W1[:, i : i + 1]
                c = affine_codes(w, s_col, z_col, spec)
                q = affine_values(c, s_col, z_col, spec)
                codes[:, col] = c[:, 0]
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
                Err1[:, i : i + 1] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse]
        qt = QuantizedTensor(
            qdata=pack(codes, spec.bits),
            spec=spec,
            shape=(rows, cols),
            dtype=weight.dtype,
            scale=fixed.scale if group is None else scales,
            zero_point=None if not spec.has_zero_point
            else (fixed.zero_point if group is None else zeros),
        )
        if group is not None and self.act_order and not self.static_groups:
            qt.g_idx = g_idx
        qt.validate()
        return qt


def _rows(qp: QParams, rows: int, group: int | None = None) -> QParams:
    """Column qparams ``[rows, 1]`` from per-tensor ``[1, 1]``, per-channel or group qparams."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t[:, group : group + 1] if group is not None else t
        return t.expand(rows, 1) if t.shape[0] == 1 else t

    return QParams(scale=pick(qp.scale), zero_point=pick(qp.zero_point))


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1``; raises damping if needed."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(6):
        factor = damp * (10**attempt)
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if attempt:
                    import warnings

                    warnings.warn(
                        f"GPTQ: Hessian not positive definite with damp={damp}; "
                        f"used damp={factor:g}",
                        stacklevel=3,
                    )
                return U
    raise ValueError(
        f"GPTQ: Hessian is not positive definite even with damp={damp * 1e5:g}; "
        "the calibration inputs may be degenerate (all zeros or NaN)"
    )
