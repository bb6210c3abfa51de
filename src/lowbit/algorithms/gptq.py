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
    order of decreasing diag(H) (stored with ``g_idx``); static_groups: choose every group's
    qparams up front from the unmodified weight (with act_order, groups then stay in natural
    order: no g_idx, fast kernels apply); None = only for specs of <= 2 bits, where ranges
    taken from the error-compensated weights were measured to hurt (w2g64 on the 19M fixture:
    KL 0.339 static vs 0.387; at 3-4 bits the two were within noise); block: lazy-batch
    width; sequential: Hessians of a block's later linears from inputs through its earlier
    linears already quantized (GPTQModel's ``true_sequential``), at the cost of one block
    forward per group of linears."""

    damp: float = 0.01
    act_order: bool = False
    static_groups: bool | None = None
    block: int = 128
    sequential: bool = True
    name = "gptq"
    needs_calibration = True
    needs_hessian = True

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp={self.damp}; allowed: 0 < damp < 1")
        if self.block < 1:
            raise ValueError(f"block={self.block}; allowed: a positive int")
        self.sequential_in_block = self.sequential

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
        static = self.static_groups if self.static_groups is not None else spec.bits <= 2
        # Per-tensor / per-channel qparams, and static groups, come from the unmodified weight;
        # other groups are chosen when the loop reaches them, from the updated weight.
        fixed = choose_qparams(W, spec) if group is None or static else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]

        Hinv = _inverse_hessian_cholesky(H, self.damp)
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        scales = torch.zeros(rows, n_groups, dtype=torch_dtype(spec.scale_dtype))
        zeros = torch.zeros(rows, n_groups, dtype=torch_dtype(spec.zero_dtype))
        # The column loop is the hot path: Python-level work per column is kept to a few ops.
        order = perm.tolist() if perm is not None else None
        if fixed is not None:
            fixed_scale = fixed.scale.float().expand(rows, -1)
            fixed_zero = fixed.zero_point.float().expand(rows, -1) if spec.has_zero_point else None
        s_col = z_col = None
        for i1 in range(0, cols, self.block):
            i2 = min(i1 + self.block, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            diag = Hinv1.diagonal().tolist()
            for i in range(i2 - i1):
                col = i1 + i
                if fixed is not None:
                    gi = 0 if group is None else (order[col] if order else col) // group
                    s_col = fixed_scale[:, gi : gi + 1]
                    z_col = fixed_zero[:, gi : gi + 1] if spec.has_zero_point else (
                        symmetric_zero(spec))
                elif col % group == 0:  # a new group: qparams from the updated weight ahead
                    gi = col // group
                    ahead = W1[:, i : i + group]
                    if ahead.shape[1] < group:
                        ahead = torch.cat([ahead, W[:, i2 : i2 + group - ahead.shape[1]]], 1)
                    qp = choose_qparams(ahead, column_spec)
                    scales[:, gi] = qp.scale[:, 0]
                    s_col = qp.scale.float()
                    if spec.has_zero_point:
                        zeros[:, gi] = qp.zero_point[:, 0]
                        z_col = qp.zero_point.float()
                    else:
                        z_col = symmetric_zero(spec)
                w = W1[:, i : i + 1]
                c = affine_codes(w, s_col, z_col, spec)
                codes[:, col] = c[:, 0]
                err = (w - affine_values(c, s_col, z_col, spec)).div_(diag[i])
                W1[:, i:].addmm_(err, Hinv1[i : i + 1, i:], alpha=-1)
                Err1[:, i : i + 1] = err
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

        if group is not None and self.act_order and not static:
            g_idx = torch.empty(cols, dtype=torch.int32)  # natural column -> its group
            g_idx[perm] = torch.arange(cols, dtype=torch.int32) // group
        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse]
        qt = QuantizedTensor(
            qdata=pack(codes, spec.bits),
            spec=spec,
            shape=(rows, cols),
            dtype=weight.dtype,
            scale=fixed.scale if fixed is not None else scales,
            zero_point=None if not spec.has_zero_point
            else (fixed.zero_point if fixed is not None else zeros),
        )
        if group is not None and self.act_order and not static:
            qt.g_idx = g_idx
        qt.validate()
        return qt


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1``; raises damping if needed."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(6):
        factor = damp * (10**attempt)
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * eye)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 from one triangular solve (torch.cholesky_inverse is ~20x slower
            # on this CPU), then its upper Cholesky factor.
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            U, info = torch.linalg.cholesky_ex(L_inv.t() @ L_inv, upper=True)
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
