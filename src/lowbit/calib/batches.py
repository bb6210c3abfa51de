"""Turn the many shapes of calibration data into a list of model-input batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

_ALLOWED = (
    "a list of strings (with tokenizer=...), a tensor of token ids [N, T] or [T], a float "
    "tensor of inputs [N, ...], or an iterable (e.g. DataLoader) of tensors or dicts with "
    "'input_ids'"
)


def _tokenize(texts: list[str], tokenizer: Any, n_samples: int, seq_len: int) -> torch.Tensor:
    """Concatenate ``texts`` (blank line between), tokenize, cut into windows ``[n, seq_len]``."""
    if tokenizer is None:
        raise ValueError("calib is a list of strings; pass tokenizer=... to turn it into tokens")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("calib mixes strings and other objects; pass only strings")
    encoded = tokenizer(
        "\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False
    )  # a long stream on purpose: no "longer than the model maximum" warning
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded.input_ids
    ids = ids.reshape(-1)
    n_windows = min(n_samples, ids.numel() // seq_len)
    if n_windows == 0:
        raise ValueError(
            f"calib text gives {ids.numel()} tokens; one window needs seq_len={seq_len} tokens "
            "(pass more text or a smaller seq_len)"
        )
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


def _tensor_rows(t: torch.Tensor) -> torch.Tensor:
    """Token ids ``[T] -> [1, T]``; anything else is taken as ``[rows, ...]``."""
    if t.dim() == 0:
        raise ValueError(f"calib tensor has shape {tuple(t.shape)}; expected [N, T] or [T]")
    if not t.dtype.is_floating_point and t.dim() == 1:
        return t.unsqueeze(0)
    return t


def _unpadded(ids: torch.Tensor, mask: Any, index: int) -> list[torch.Tensor]:
    """The rows of a padded batch without their padding: ``ids [b, T]`` and a 0/1 ``mask
    [b, T]`` -> batches ``[b', T']`` of rows with the same number of real tokens, in order.

    Padding (left or right) is cut rather than masked, so every calibrating algorithm sees only
    real tokens, at the positions they would have unpadded.
    """
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"calib batch {index}: attention_mask of shape "
                         f"{tuple(getattr(mask, 'shape', ()))} does not match input_ids "
                         f"{tuple(ids.shape)}")
    keep = mask != 0
    if bool(keep.all()):
        return [ids]
    if ids.dim() != 2:
        raise ValueError(f"calib batch {index}: padded input_ids must be [batch, tokens], got "
                         f"shape {tuple(ids.shape)}")
    rows: dict[int, list[torch.Tensor]] = {}
    for row, row_keep in zip(ids, keep, strict=True):
        real = row[row_keep]
        if real.numel():
            rows.setdefault(real.numel(), []).append(real)
    return [torch.stack(same) for same in rows.values()]


def as_batches(
    calib: Any,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 512,
    *,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Calibration data -> a list of model inputs, each ``[b, ...]`` with ``b <= batch_size``.

    Strings are joined by a blank line, tokenized (no special tokens) and cut into at most
    ``n_samples`` windows of ``seq_len`` tokens (int64 ``[b, seq_len]``). Tensors and iterables
    are used as given, up to ``n_samples`` rows in all. Dict batches contribute ``input_ids``;
    where their ``attention_mask`` marks padding, the padding is cut and rows are regrouped by
    their real length (a padded batch may become several smaller ones).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}; allowed: a positive int")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}; allowed: a positive int")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: a positive int")
    if calib is None:
        raise ValueError(f"calib is None; pass {_ALLOWED}")
    if isinstance(calib, str):
        calib = [calib]
    if isinstance(calib, (list, tuple)) and calib and isinstance(calib[0], str):
        rows = _tokenize(list(calib), tokenizer, n_samples, seq_len)
        return list(rows.split(batch_size))
    if isinstance(calib, torch.Tensor):
        if calib.numel() == 0:
            raise ValueError(f"calib is empty (a tensor of shape {tuple(calib.shape)})")
        return list(_tensor_rows(calib)[:n_samples].split(batch_size))
    if isinstance(calib, (Mapping, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(f"calib is a {type(calib).__name__}; allowed: {_ALLOWED}")
    batches: list[torch.Tensor] = []
    rows_left = n_samples
    for i, item in enumerate(calib):
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(
                    f"calib batch {i} is a dict without 'input_ids' (keys: {sorted(item)})"
                )
            mask = item.get("attention_mask")
            item = item["input_ids"]
        else:
            mask = None
        if not isinstance(item, torch.Tensor):
            raise TypeError(
                f"calib batch {i} is a {type(item).__name__}; allowed: a tensor or a dict "
                "with 'input_ids'"
            )
        if item.numel() == 0:
            continue
        if mask is not None:
            mask = _tensor_rows(mask) if isinstance(mask, torch.Tensor) else mask
        item = _tensor_rows(item)
        parts = [item] if mask is None else _unpadded(item, mask, i)
        for part in parts:
            part = part[:rows_left]
            batches.append(part)
            rows_left -= part.shape[0]
            if rows_left <= 0:
                break
        if rows_left <= 0:
            break
    if not batches:
        raise ValueError(f"calib is empty (it yielded no non-empty batch); pass {_ALLOWED}")
    return batches


def check_batches(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Raise ValueError for token-id batches the model cannot take: ids outside its vocabulary,
    or sequences longer than a learned position table holds (GPT-2's ``wpe``, BERT's and
    RoBERTa's ``position_embeddings``, whose ids start after ``padding_idx``), which fail deep
    inside the forward. Rotary and relative positions have no table and no such limit."""
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        table = embeddings() if callable(embeddings) else None
    except NotImplementedError:
        table = None
    vocab = getattr(table, "num_embeddings", None)
    limit = position_limit(model)
    for i, batch in enumerate(batches):
        if batch.dtype.is_floating_point or batch.dtype == torch.bool or batch.dim() < 2:
            continue
        low, high = int(batch.min()), int(batch.max())
        if vocab is not None and (low < 0 or high >= vocab):
            raise ValueError(f"calib batch {i} holds token ids in [{low}, {high}]; the model's "
                             f"vocabulary is [0, {vocab})")
        if limit is not None and batch.shape[-1] > limit:
            raise ValueError(f"calib sequences of {batch.shape[-1]} tokens exceed the model's "
                             f"{limit} positions; lower calib_seq_len (CLI: --calib-seq-len)")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence a learned position table holds (GPT-2's ``wpe``, BERT's and
    RoBERTa's ``position_embeddings``, whose ids start after ``padding_idx``, OPT's and
    BioGPT's ``embed_positions``, after their ``offset``), and at most the config's
    ``max_position_embeddings``; None for rotary or relative positions, which have no table."""
    tables = [m.num_embeddings - (0 if m.padding_idx is None else m.padding_idx + 1)
              - int(getattr(m, "offset", 0))
              for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and ("position" in name or name.endswith("wpe"))]
    if not tables:
        return None
    configured = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(tables + ([configured] if isinstance(configured, int) else []))
