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

from dataclasses import dataclass, fields

import torch

from lowbit.algorithms.base import Algorithm, LayerStats, check_number
from lowbit.quant.layout import layout_for
from lowbit.quant.maps import (
    QParams,
    ScaleCodes,
    affine_codes,
    affine_values,
    choose_qparams,
    qparams_from_range,
    qrange,
    symmetric_zero,
)
from lowbit.spec import QuantSpec
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
    linears already quantized (GPTQModel's ``true_sequential``; the block runs once per
    batch, each batch paused before a group of linears until that group is quantized).

    clip_grid: search each group's (or channel's) clipping range instead of taking min-max:
    the range ``r * [min, max]`` with ``r`` in ``1 - max_shrink * i / clip_grid``,
    ``i = 0..clip_grid``, that minimises the group's weight error, chosen where GPTQ picks the
    group's qparams (at the group's first column from the error-updated weight, or up front
    with static groups); 0 = min-max. clip_weight: the error weights each column by its
    ``diag(H)`` (its mean squared input; "hessian") or equally ("uniform"). Measured on the
    19M fixture LM (``--quick``, ppl / KL): min-max 71.35 / 0.0699 (w3g128), 68.21 / 0.0142
    (w4g128), 79.32 / 0.338 (w2g64); grid 20, shrink 0.4: 68.52 / 0.0519, 68.68 / 0.0134,
    70.61 / 0.221. Shrink 0.2 was as good at 3-4 bits and worse at 2 bits (KL 0.230); at
    w4g128 the search lowers KL but not perplexity (see benchmarks/results/llm.md)."""

    damp: float = 0.01
    act_order: bool = False
    static_groups: bool | None = None
    block: int = 128
    sequential: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.4
    clip_weight: str = "hessian"
    name = "gptq"
    needs_calibration = True
    needs_hessian = True

    def __post_init__(self) -> None:
        check_number("damp", self.damp, 0, 1, low_open=True, high_open=True)
        check_number("block", self.block, 1, float("inf"), integer=True)
        check_number("clip_grid", self.clip_grid, 0, float("inf"), integer=True)  # 0: min-max
        check_number("max_shrink", self.max_shrink, 0, 1, low_open=True, high_open=True)
        if self.clip_weight not in ("hessian", "uniform"):
            raise ValueError(f"clip_weight={self.clip_weight!r}; allowed: 'hessian', 'uniform'")
        self.sequential_in_block = self.sequential

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        return self.quantize_weights([weight], spec, stats)[0]

    def quantize_weights(
        self, weights: list[torch.Tensor], spec: QuantSpec, stats: LayerStats | None = None
    ) -> list[QuantizedTensor]:
        """Several weights ``[out_i, in]`` fed the same input (one Hessian), as one stacked
        ``[sum out_i, in]`` matrix: GPTQ treats rows independently given H, so each result is
        the one ``quantize_weight`` gives (up to float summation order in the updates), from a
        single column loop. Per-tensor specs (one range over all rows) run one by one."""
        if not weights:
            return []
        if len(weights) > 1 and spec.granularity == "tensor":
            return [self.quantize_weights([w], spec, stats)[0] for w in weights]
        for w in weights:
            if w.dim() != 2 or w.shape[1] != weights[0].shape[1]:
                raise ValueError(
                    f"GPTQ takes 2-D weights [out, in] sharing in_features; got shapes "
                    f"{[tuple(x.shape) for x in weights]}"
                )
        sizes = [w.shape[0] for w in weights]
        weight = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
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

        perm = torch.argsort(torch.diag(H), descending=True) if self.act_order else None
        static = self.static_groups if self.static_groups is not None else spec.bits <= 2
        # Per-tensor / per-channel qparams, and static groups, come from the unmodified weight;
        # other groups are chosen when the loop reaches them, from the updated weight.
        hdiag = torch.diag(H).clone() if self.clip_weight == "hessian" else torch.ones(cols)
        fixed = self._qparams(W, spec, hdiag) if group is None or static else None
        if perm is not None:
            hdiag = hdiag[perm]
            W, H = W[:, perm], H[perm][:, perm]

        Hinv = _inverse_hessian_cholesky(H, self.damp)
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        # Groups' qparams are chosen a chunk at a time: one group, or the groups of a
        # double-quantized spec's super-block (their scale codes share one scale).
        span = group * spec.super_group if group and spec.double_quantized else group
        chunk_spec = spec if spec.double_quantized else spec.replace(
            granularity="channel", group_size=None, axis=0)
        chunks: list[QParams] = []
        # The column loop is the hot path: Python-level work per column is kept to a few ops.
        order = perm.tolist() if perm is not None else None
        if fixed is not None:
            fixed_scale = fixed.scale.float().expand(rows, -1)
            fixed_zero = fixed.zero_point.float().expand(rows, -1) if spec.has_zero_point else None
        s_col = z_col = None
        qmin, qmax = qrange(spec)
        # nearest rounding with an integer zero-point: the column's Q and Q^-1 in a few
        # in-place ops on float codes (v - z is exact on integers, so the values equal
        # affine_values' bit for bit); otherwise the spec's own affine_codes/affine_values
        inline = spec.rounding == "nearest" and (spec.symmetric or spec.zero_point == "int")
        for i1 in range(0, cols, self.block):
            i2 = min(i1 + self.block, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Q1 = torch.empty_like(W1)  # float codes in [qmin, qmax] (inline path)
            Hinv1 = Hinv[i1:i2, i1:i2]
            diag = Hinv1.diagonal().tolist()
            for i in range(i2 - i1):
                col = i1 + i
                if fixed is not None:
                    gi = 0 if group is None else (order[col] if order else col) // group
                    s_col = fixed_scale[:, gi : gi + 1]
                    z_col = fixed_zero[:, gi : gi + 1] if spec.has_zero_point else (
                        symmetric_zero(spec))
                elif col % group == 0:  # a new group
                    if col % span == 0:  # a new chunk: its qparams from the updated weight
                        width = min(span, cols - col)
                        ahead = W1[:, i : i + width]
                        if ahead.shape[1] < width:
                            tail = W[:, i2 : i2 + width - ahead.shape[1]]
                            if i:  # columns past the block lack its pending lazy updates so far
                                tail = tail - Err1[:, :i] @ Hinv[i1 : i1 + i,
                                                                 i2 : i2 + tail.shape[1]]
                            ahead = torch.cat([ahead, tail], 1)
                        chunks.append(self._qparams(ahead, chunk_spec, hdiag[col : col + width]))
                        chunk_col = col
                    j = (col - chunk_col) // group
                    s_col = chunks[-1].scale[:, j : j + 1].float()
                    z_col = (chunks[-1].zero_point[:, j : j + 1].float() if spec.has_zero_point
                             else symmetric_zero(spec))
                w = W1[:, i : i + 1]
                if inline:
                    v = w.div(s_col)
                    if not isinstance(z_col, int) or z_col:
                        v.add_(z_col)
                    v.round_().clamp_(qmin, qmax)
                    Q1[:, i : i + 1] = v
                    err = w.sub(v.sub_(z_col).mul_(s_col)).div_(diag[i])
                else:
                    c = affine_codes(w, s_col, z_col, spec)
                    codes[:, col] = c[:, 0]
                    err = (w - affine_values(c, s_col, z_col, spec)).div_(diag[i])
                W1[:, i:].addmm_(err, Hinv1[i : i + 1, i:], alpha=-1)
                Err1[:, i : i + 1] = err
            if inline:
                codes[:, i1:i2] = Q1.sub_(qmin).to(torch.uint8)
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

        if group is not None and self.act_order and not static:
            g_idx = torch.empty(cols, dtype=torch.int32)  # natural column -> its group
            g_idx[perm] = torch.arange(cols, dtype=torch.int32) // group
        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse]
        qparams = fixed if fixed is not None else _concat(chunks)
        out, start = [], 0
        for w, n in zip(weights, sizes, strict=True):
            part = slice(start, start + n) if qparams.scale.shape[0] == rows else slice(None)
            qt = QuantizedTensor.from_codes(codes[start : start + n], _rows(qparams, part),
                                            spec, (n, cols), w.dtype)
            if group is not None and self.act_order and not static:
                qt.g_idx = g_idx if len(weights) == 1 else g_idx.clone()
            qt.validate()
            out.append(qt)
            start += n
        return out

    def _qparams(self, w: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor) -> QParams:
        """Qparams of ``w [rows, cols]`` under ``spec``: min-max, or with ``clip_grid`` the
        range shrunk per block by the ratio in ``1 - max_shrink * i / clip_grid`` (i = 0..grid)
        that minimises the block's error ``sum_j col_weight[j] * (w - Q(w))[:, j]^2`` (the
        first such ratio on ties, so min-max is kept unless a shrink is strictly better). The
        ratios are tried in batches of up to ``SEARCH_ELEMENTS`` quantized elements."""
        plain = choose_qparams(w, spec)
        if not self.clip_grid:
            return plain
        layout = layout_for(w.shape, spec)
        xb = layout.blocked(layout.to_2d(w).float())  # [R', C', n]
        cw = layout.blocked(col_weight.float().expand(w.shape[0], -1).contiguous())
        lo, hi = xb.amin(-1), xb.amax(-1)
        qmin, qmax = qrange(spec)
        ratios = 1 - self.max_shrink * torch.arange(self.clip_grid + 1) / self.clip_grid
        ratios[0] = 1.0
        best_err = best_ratio = None
        step = max(1, SEARCH_ELEMENTS // xb.numel())
        for r in ratios.split(step):
            rr = r.view(-1, 1, 1)
            qp = qparams_from_range(lo * rr, hi * rr, spec)
            scale = qp.scale.float().unsqueeze(-1)
            zero = (qp.zero_point.float().unsqueeze(-1) if qp.zero_point is not None
                    else symmetric_zero(spec))
            # Q^-1(Q(x)) with nearest rounding in place (only ranks the candidates)
            v = xb.unsqueeze(0) / scale
            if not isinstance(zero, int) or zero:
                v.add_(zero)
            v.round_().clamp_(qmin, qmax).sub_(zero).mul_(scale)
            err = v.sub_(xb).pow_(2).mul_(cw).sum(-1)
            err, idx = err.min(0)  # first minimum: the larger ratio on ties
            chosen = r[idx]
            if best_err is None:
                best_err, best_ratio = err, chosen
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, chosen, best_ratio)
        return qparams_from_range(lo * best_ratio, hi * best_ratio, spec)


def _concat(chunks: list[QParams]) -> QParams:
    """Qparams of consecutive column chunks ``[R, G_i]`` as one ``[R, sum G_i]``."""
    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts, 1)

    codes = None
    if chunks[0].scale_codes is not None:
        parts = [c.scale_codes for c in chunks]
        codes = ScaleCodes(*(cat([getattr(p, f.name) for p in parts]) for f in fields(ScaleCodes)))
    return QParams(scale=cat([c.scale for c in chunks]),
                   zero_point=cat([c.zero_point for c in chunks]), scale_codes=codes)


def _rows(qp: QParams, part: slice) -> QParams:
    """The rows ``part`` of group qparams (stacked weights are quantized together)."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[part].contiguous()

    codes = None
    if qp.scale_codes is not None:
        codes = ScaleCodes(*(pick(getattr(qp.scale_codes, f.name))
                             for f in fields(ScaleCodes)))
    return QParams(scale=pick(qp.scale), zero_point=pick(qp.zero_point), scale_codes=codes)


SEARCH_ELEMENTS = 1 << 22
"""Elements quantized at once in GPTQ's clip search (memory: a few float32 copies of them)."""


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
