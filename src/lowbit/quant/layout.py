"""The canonical 2-D view of a tensor and its blocking, shared by every map.

Every granularity is a tiling of a 2-D view ``[R, C]`` into blocks of ``(bh, bw)`` elements that
share one scale (and zero-point, or codebook):

- tensor: ``x.reshape(shape[0], -1)``, one block ``(R, C)``
- channel (axis a): ``x.movedim(a, 0).reshape(shape[a], -1)``, blocks ``(1, C)``
- group g: ``x.reshape(shape[0], -1)``, blocks ``(1, g)`` along the last (reduction) dim
- block (bh, bw): ``x.reshape(shape[0], -1)``, blocks ``(bh, bw)``
- token: ``x.reshape(-1, shape[-1])``, blocks ``(1, C)`` (one scale per row of activations)

Quantization parameters keep this natural orientation: ``[R // bh, C // bw]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.spec import QuantSpec


@dataclass(frozen=True)
class Layout:
    """Where a logical tensor's elements sit in the canonical 2-D view and its blocks."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    block_rows: int
    block_cols: int
    channel_axis: int | None = None  # set when the view moved a channel axis to the front

    @property
    def n_blocks(self) -> tuple[int, int]:
        return self.rows // self.block_rows, self.cols // self.block_cols

    def to_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is not None:
            x = x.movedim(self.channel_axis, 0)
        return x.reshape(self.rows, self.cols)

    def from_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is not None:
            moved = list(self.shape)
            moved.insert(0, moved.pop(self.channel_axis))
            return x2d.reshape(moved).movedim(0, self.channel_axis)
        return x2d.reshape(self.shape)

    def blocked(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[R, C] -> [R/bh, C/bw, bh*bw]``: each block's elements on the last dim."""
        nr, nc = self.n_blocks
        return (
            x2d.reshape(nr, self.block_rows, nc, self.block_cols)
            .permute(0, 2, 1, 3)
            .reshape(nr, nc, self.block_rows * self.block_cols)
        )

    def unblocked(self, xb: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`blocked`."""
        nr, nc = self.n_blocks
        return (
            xb.reshape(nr, nc, self.block_rows, self.block_cols)
            .permute(0, 2, 1, 3)
            .reshape(self.rows, self.cols)
        )


def _divisors_hint(n: int, near: int) -> str:
    divs = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))
    return ", ".join(str(d) for d in sorted(divs[:3]))


def layout_for(shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> Layout:
    """The canonical view of ``shape`` under ``spec``; a clear error when it can't be tiled."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {shape})")
    g = spec.granularity
    channel_axis = None
    if g == "channel":
        ndim = max(len(shape), 1)
        if not -ndim <= spec.axis < ndim:
            raise ValueError(
                f"axis={spec.axis} is out of range for a tensor of shape {shape} "
                f"(allowed: {-ndim}..{ndim - 1})"
            )
        axis = spec.axis % ndim
        if len(shape) >= 1 and axis != 0:
            channel_axis = axis
        rows = shape[axis] if shape else 1
        shape_2d = (rows, numel // rows)
    elif g == "token":
        cols = shape[-1] if shape else 1
        shape_2d = (numel // cols, cols)
    else:
        rows = shape[0] if len(shape) >= 2 else 1
        shape_2d = (rows, numel // rows)
    rows, cols = shape_2d
    if g == "tensor":
        bh, bw = rows, cols
    elif g in ("channel", "token"):
        bh, bw = 1, cols
    elif g == "group":
        bh, bw = 1, spec.group_size
        if cols % bw:
            raise ValueError(
                f"group_size={bw} does not divide the reduction dim {cols} of shape {shape}; "
                f"use a divisor of {cols} (e.g. {_divisors_hint(cols, bw)}) or "
                "granularity='channel'"
            )
    else:  # block
        bh, bw = spec.block
        if rows % bh or cols % bw:
            raise ValueError(
                f"block={spec.block} does not tile the 2-D view ({rows}, {cols}) of shape "
                f"{shape}; each side must divide its dim"
            )
    return Layout(shape, rows, cols, bh, bw, channel_axis)
