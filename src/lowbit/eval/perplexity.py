"""Sliding-window perplexity of a causal LM and the KL divergence of its logits from a reference.

Protocol (as in the fixture models' README and Hugging Face's perplexity guide): the token stream is
cut into windows of ``context`` tokens whose starts move by ``stride``. The first window scores all
of its ``context - 1`` targets; every later window scores only the targets not scored before (the
last ``stride``, fewer in the final window), so each target after the first token is scored exactly
once and, past the first window, with at least ``context - stride`` tokens of context. A window
holds ``context`` tokens, so it predicts ``context - 1`` targets; with ``stride == context`` each
window therefore starts one token before the first target it scores (scoring ``context - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Window:
    """Tokens ``ids[begin:end]`` go in; targets ``ids[score_from:end]`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean next-token cross-entropy, nats per token
    tokens: int  # targets scored
    context: int
    stride: int
    windows: int


@dataclass(frozen=True)
class LogitComparison:
    """A model's next-token distribution against a reference's, on the same scored targets."""

    ppl: float
    reference_ppl: float
    kl_mean: float  # mean over targets of KL(reference || model), nats
    kl_p99: float
    kl_max: float
    top1_agreement: float  # share of targets where both models' argmax token is the same
    tokens: int
    context: int
    stride: int
    windows: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows over a stream of ``n_tokens`` tokens; targets 1..n_tokens-1 each scored once."""
    _check_protocol(context, stride)
    if n_tokens < 2:
        raise ValueError(f"ids must hold at least 2 tokens to score one, got {n_tokens}")
    windows: list[Window] = []
    scored_until = 1  # target index 0 has no context and is never scored
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        # The next window must hold the token before its first target (matters when
        # stride == context: it then starts one token early).
        begin = min(begin + stride, scored_until - 1)
    return windows


def _check_protocol(context: int, stride: int) -> None:
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2 tokens, got {context!r}")
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an integer in 1..context ({context}), got {stride!r}")


def _as_stream(ids: torch.Tensor, context: int, max_tokens: int | None) -> torch.Tensor:
    """``ids`` as a 1-D int64 tensor, cut to ``max_tokens``, at least one full window long."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"ids must be a 1-D (or [1, N]) integer tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < context:
        raise ValueError(
            f"text has {ids.numel()} tokens; one window of context={context} needs at least "
            f"{context}"
        )
    return ids.long()


def _check_positions(model: nn.Module, context: int) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and context > limit:
        raise ValueError(f"context={context} exceeds the model's max_position_embeddings={limit}")


def _logits(model: Callable, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` ids -> ``[B, T, V]`` float32 logits (HF output objects or plain tensors)."""
    out = model(input_ids=input_ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.float()


def _batches(
    ids: torch.Tensor, windows: list[Window], batch_size: int
) -> Iterator[tuple[torch.Tensor, list[Window]]]:
    """Equal-length windows stacked ``batch_size`` at a time; the short final window alone."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group: list[Window] = []
    for w in windows:
        if group and (len(group) == batch_size or w.end - w.begin != group[0].end - group[0].begin):
            yield torch.stack([ids[g.begin : g.end] for g in group]), group
            group = []
        group.append(w)
    if group:
        yield torch.stack([ids[g.begin : g.end] for g in group]), group


def _scored(logits: torch.Tensor, group: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``logits [B, T, V]`` that predict scored targets, flattened ``[n, V]``, and their
    positions within each window ``(batch index, position)`` as an index pair."""
    rows, cols = [], []
    for b, w in enumerate(group):
        # logits at position p predict token p + 1 of the window.
        first = w.score_from - w.begin - 1
        n = w.n_scored
        rows.append(torch.full((n,), b, dtype=torch.long))
        cols.append(torch.arange(first, first + n))
    r, c = torch.cat(rows), torch.cat(cols)
    return logits[r, c], torch.stack([r, c])


def _targets(batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return batch[index[0], index[1] + 1]


@torch.inference_mode()
def perplexity(
    model: Callable,
    ids: torch.Tensor,
    context: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    *,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on one token stream.

    model: called as ``model(input_ids=[B, context] int64)``; returns logits ``[B, T, V]`` (or an
        object with ``.logits``).
    ids: ``[N]`` or ``[1, N]`` token ids; ``max_tokens`` keeps only the first ``max_tokens``.
    progress: called with (windows done, windows total) after each batch.
    """
    _check_protocol(context, stride)
    stream = _as_stream(ids, context, max_tokens)
    if isinstance(model, nn.Module):
        _check_positions(model, context)
    windows = sliding_windows(stream.numel(), context, stride)
    total_nll = 0.0
    total = 0
    done = 0
    for batch, group in _batches(stream, windows, batch_size):
        logits = _logits(model, batch)
        rows, index = _scored(logits, group)
        nll = F.cross_entropy(rows, _targets(batch, index), reduction="sum")
        total_nll += float(nll.double())
        total += rows.shape[0]
        done += len(group)
        if progress is not None:
            progress(done, len(windows))
    mean = total_nll / total
    return PerplexityResult(math.exp(mean), mean, total, context, stride, len(windows))


@torch.inference_mode()
def compare_logits(
    model: Callable,
    reference: Callable,
    ids: torch.Tensor,
    context: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    *,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> LogitComparison:
    """KL(reference || model) of the next-token distributions and top-1 agreement (as llama.cpp's
    ``--kl-divergence``), plus both perplexities, over the targets ``perplexity`` scores."""
    _check_protocol(context, stride)
    stream = _as_stream(ids, context, max_tokens)
    for m in (model, reference):
        if isinstance(m, nn.Module):
            _check_positions(m, context)
    windows = sliding_windows(stream.numel(), context, stride)
    kls: list[torch.Tensor] = []
    nll = ref_nll = 0.0
    agree = 0
    done = 0
    for batch, group in _batches(stream, windows, batch_size):
        rows, index = _scored(_logits(model, batch), group)
        ref_rows, _ = _scored(_logits(reference, batch), group)
        if rows.shape != ref_rows.shape:
            raise ValueError(
                f"model logits {tuple(rows.shape)} and reference logits {tuple(ref_rows.shape)} "
                "differ in shape (different vocabularies?)"
            )
        logp = F.log_softmax(rows, dim=-1)
        ref_logp = F.log_softmax(ref_rows, dim=-1)
        targets = _targets(batch, index)
        nll += float(-logp.gather(1, targets[:, None]).double().sum())
        ref_nll += float(-ref_logp.gather(1, targets[:, None]).double().sum())
        kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0))
        agree += int((rows.argmax(-1) == ref_rows.argmax(-1)).sum())
        done += len(group)
        if progress is not None:
            progress(done, len(windows))
    kl = torch.cat(kls).double()
    n = kl.numel()
    return LogitComparison(
        ppl=math.exp(nll / n),
        reference_ppl=math.exp(ref_nll / n),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)) if n <= 16_000_000 else float("nan"),
        kl_max=float(kl.max()),
        top1_agreement=agree / n,
        tokens=n,
        context=context,
        stride=stride,
        windows=len(windows),
    )
