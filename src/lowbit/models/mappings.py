"""Scale-folding tables, kept as data: which modules of a block share an input and what feeds it.

A per-input-channel scale ``s`` on the input of some linears ``next`` (``x -> x / s``, weight
columns ``W[:, j] * s_j``) leaves the float output unchanged when the producer of ``x`` can absorb
the ``1 / s``: a norm (weight and bias ``/= s``) or a linear (output rows and bias ``/= s``) whose
output goes *only* to ``next`` (no residual branch, no nonlinearity in between). AWQ and
SmoothQuant both fold through these tables.

Names are relative to one decoder/encoder block (``model.model.layers[i]`` for Llama,
``transformer.h[i]`` for GPT-2, ``encoder.layer[i]`` for BERT). ``prev_part=(k, n)`` folds into
the k-th of n equal slices of the producer's outputs (GPT-2's fused ``c_attn`` emits q, k, v).

Pairs that are deliberately absent:

- llama-like: ``mlp.gate_proj -> mlp.down_proj`` (the input of down_proj is SiLU(gate) * up: only
  the linear ``up`` factor can absorb a scale, hence ``up_proj -> down_proj``).
  ``self_attn.v_proj -> self_attn.o_proj`` is listed but resolved only when v_proj's outputs are
  o_proj's inputs one to one; with grouped-query attention (fewer key/value heads) each v channel
  feeds several o_proj inputs, so it is skipped with a note.
- gpt2: ``mlp.c_fc -> mlp.c_proj`` is through a GELU (not scale-equivariant).
- bert (post-LN): the block input (previous LayerNorm's output) and ``attention.output.LayerNorm``
  both feed a residual add as well as the next linears, so scaling them would change the residual
  stream: no norm -> linear pair is foldable. ``intermediate.dense -> output.dense`` is through a
  GELU. Only ``attention.self.value -> attention.output.dense`` folds (attention mixes tokens, not
  channels, so a per-channel scale on v passes through softmax(QK^T) V unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleMapping:
    """``prev`` produces the input shared by the linears ``nexts`` (names relative to a block)."""

    prev: str
    nexts: tuple[str, ...]
    prev_part: tuple[int, int] | None = None


_LLAMA = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
)

MAPPINGS: dict[str, tuple[ScaleMapping, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": (
        ScaleMapping("ln_1", ("attn.c_attn",)),
        ScaleMapping("attn.c_attn", ("attn.c_proj",), prev_part=(2, 3)),
        ScaleMapping("ln_2", ("mlp.c_fc",)),
    ),
    "bert": (ScaleMapping("attention.self.value", ("attention.output.dense",)),),
}


@dataclass
class ResolvedMapping:
    """A mapping checked against a real block: modules found, channel counts consistent."""

    prev_name: str
    prev: nn.Module
    prev_kind: str  # "norm" or "linear"
    channels: slice  # the producer's output channels that feed ``nexts``
    next_names: tuple[str, ...]
    nexts: tuple[nn.Module, ...]

    @property
    def width(self) -> int:
        return self.channels.stop - self.channels.start


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (weight ``[in, out]``)."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


def in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def mappings_for(arch: str) -> tuple[ScaleMapping, ...] | None:
    """The table of ``config.model_type`` ``arch``, or None when lowbit has none."""
    return MAPPINGS.get(arch)


def resolve_mappings(block: nn.Module, arch: str) -> tuple[list[ResolvedMapping], list[str]]:
    """The foldable mappings of ``block`` and notes on the ones skipped (and why).

    Raises ValueError when ``arch`` has no table (callers fall back and say so).
    """
    table = mappings_for(arch)
    if table is None:
        raise ValueError(
            f"no scale-folding mapping for model_type {arch!r}; known: {', '.join(MAPPINGS)}"
        )
    modules = dict(block.named_modules())
    resolved: list[ResolvedMapping] = []
    notes: list[str] = []
    for m in table:
        missing = [n for n in (m.prev, *m.nexts) if n not in modules]
        if missing:
            notes.append(f"{m.prev} -> {', '.join(m.nexts)} skipped: no module {missing[0]!r}")
            continue
        prev = modules[m.prev]
        nexts = tuple(modules[n] for n in m.nexts)
        if not all(is_linear(n) for n in nexts):
            notes.append(f"{m.prev} -> {', '.join(m.nexts)} skipped: a consumer is not a linear")
            continue
        if is_linear(prev):
            kind, width = "linear", out_features(prev)
        elif isinstance(getattr(prev, "weight", None), torch.Tensor) and prev.weight.dim() == 1:
            kind, width = "norm", prev.weight.shape[0]
        else:
            notes.append(f"{m.prev} -> {', '.join(m.nexts)} skipped: {m.prev} is neither a "
                         "linear nor a norm with a per-channel weight")
            continue
        start, stop = 0, width
        if m.prev_part is not None:
            k, n = m.prev_part
            if width % n:
                notes.append(f"{m.prev} -> {', '.join(m.nexts)} skipped: {width} outputs do not "
                             f"split into {n} equal parts")
                continue
            start, stop = k * width // n, (k + 1) * width // n
        widths = {in_features(n) for n in nexts}
        if widths != {stop - start}:
            notes.append(
                f"{m.prev} -> {', '.join(m.nexts)} skipped: {m.prev} gives {stop - start} "
                f"channels but the consumers take {sorted(widths)} (e.g. grouped-query "
                "attention repeats each value head), so a per-channel scale cannot be folded"
            )
            continue
        resolved.append(ResolvedMapping(m.prev, prev, kind, slice(start, stop), m.nexts, nexts))
    return resolved, notes


def linear_weight_2d(module: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight as ``[out, in]`` (Conv1D transposed)."""
    w = module.weight.detach().float()
    return w.clone() if isinstance(module, nn.Linear) else w.t().contiguous()


@torch.no_grad()
def set_linear_weight_2d(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight [out, in]`` back in the module's own layout and dtype."""
    w = weight if isinstance(module, nn.Linear) else weight.t()
    module.weight.copy_(w.to(module.weight.dtype))


@torch.no_grad()
def fold_scales(mapping: ResolvedMapping, scales: torch.Tensor) -> None:
    """Divide the producer's channels by ``scales [width]`` and multiply the consumers' input
    columns by them, so the block's float outputs are unchanged (up to rounding)."""
    s = scales.detach().float().flatten()
    if s.numel() != mapping.width:
        raise ValueError(f"scales has {s.numel()} entries; {mapping.prev_name} -> "
                         f"{', '.join(mapping.next_names)} needs {mapping.width}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("scales must be finite and positive")
    prev, ch = mapping.prev, mapping.channels
    if mapping.prev_kind == "norm":
        prev.weight[ch] = (prev.weight[ch].float() / s).to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias[ch] = (prev.bias[ch].float() / s).to(prev.bias.dtype)
    else:
        w = linear_weight_2d(prev)
        w[ch] /= s.unsqueeze(1)
        set_linear_weight_2d(prev, w)
        if prev.bias is not None:
            prev.bias[ch] = (prev.bias[ch].float() / s).to(prev.bias.dtype)
    for nxt in mapping.nexts:
        w = linear_weight_2d(nxt)
        set_linear_weight_2d(nxt, w * s.unsqueeze(0))
