"""The QAT training loop: the model run forward and backward on windows of a token stream.

It lives in calib/ with the other code that runs the model; ``lowbit.qat`` re-exports it.
Batches are a pure function of (seed, step), so a resumed run sees the batches an uninterrupted
one would.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DivergedError(ValueError):
    """The training loss became NaN/Inf; ``step`` is the step that produced it."""

    def __init__(self, step: int, loss: float, what: str | None = None) -> None:
        what = what or f"loss is {loss}"
        super().__init__(f"{what} at step {step}; training diverged (lower the learning rate)")
        self.step, self.loss = step, loss


def check_stream(ids: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """``ids`` as a 1-D int64 stream long enough for one batch of ``batch_size x seq_len``."""
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}; allowed: >= 1 and >= 2")
    ids = ids.reshape(-1).long()
    need = batch_size * seq_len
    if ids.numel() < need:
        raise ValueError(
            f"training text has {ids.numel()} tokens, shorter than one batch of {batch_size} x "
            f"{seq_len} = {need}; give more text or a smaller batch size / sequence length"
        )
    return ids


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, step: int,
                 seed: int = 0) -> torch.Tensor:
    """``[batch_size, seq_len]`` windows at random starts, a pure function of (seed, step), so a
    resumed run sees the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def qat_loss(
    model: nn.Module, batch: torch.Tensor, teacher: nn.Module | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on ``batch [B, T]``, or with a ``teacher`` the mean per-token
    KL(teacher || model) of the next-token distributions (distillation)."""
    logits = _logits(model, batch)[:, :-1]
    if teacher is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    with torch.no_grad():
        target = _logits(teacher, batch)[:, :-1].log_softmax(-1)
    logp = logits.log_softmax(-1)
    return F.kl_div(logp.reshape(-1, logp.shape[-1]), target.reshape(-1, target.shape[-1]),
                    log_target=True, reduction="batchmean")


def train(
    model: nn.Module,
    ids: torch.Tensor,
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    teacher: nn.Module | None = None,
    start_step: int = 0,
    seed: int = 0,
    on_step: Any = None,
) -> list[float]:
    """Run steps ``start_step .. steps-1`` of QAT on the token stream ``ids``; returns the losses.

    on_step(step, loss) is called after each optimizer step (checkpoints, progress bars).
    Raises DivergedError (before the optimizer touches the weights) on a NaN/Inf loss.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps={steps!r}; allowed: a positive int")
    ids = check_stream(ids, batch_size, seq_len)
    # the student trains (dropout on), the teacher gives targets in eval mode; every module's
    # own mode is put back afterwards, also when a step fails
    modes = [(m, m.training) for net in (model, teacher) if net is not None for m in net.modules()]
    model.train()
    if teacher is not None:
        teacher.eval()
    losses = []
    try:
        for step in range(start_step, steps):
            batch = sample_batch(ids, batch_size, seq_len, step, seed)
            loss = qat_loss(model, batch, teacher)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DivergedError(step, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not all(bool(torch.isfinite(p).all()) for g in optimizer.param_groups
                       for p in g["params"]):
                raise DivergedError(step, float("nan"), "the update made parameters NaN/Inf")
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
    finally:
        for module, training in modes:
            module.training = training
    return losses
