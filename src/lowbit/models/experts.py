"""Mixture-of-experts layers as one Linear per expert projection, so they can be quantized.

transformers (5.x) stores the experts of an MoE layer (Mixtral, Qwen3-MoE, DeepSeek, gpt-oss, ...
every class decorated with ``use_experts_implementation``) fused: ``gate_up_proj`` (or
``up_proj``) ``[E, 2I, H]`` and ``down_proj [E, H, I]`` parameters, ``[E, in, out]`` when
``is_transposed``. No ``nn.Linear`` is left to replace, so these weights, most of an MoE
model's, would stay in float. ``unfuse_experts`` swaps such a module for ``LinearExperts``:
experts ``0 .. E-1`` with ``gate_up_proj`` / ``up_proj`` and ``down_proj`` Linears (copies: the
peak memory grows by one layer's experts) computing what the fused module's eager forward
computes, so ``lowbit.quantize``, the calibration algorithms (GPTQ, AWQ, static activations),
the sensitivity measurement and save / load treat experts as any other Linear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# what transformers' use_experts_implementation sets on an experts module
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def _fused_tensors(module: nn.Module) -> tuple[str, nn.Parameter, nn.Parameter] | None:
    """``(up projection name, up [E, ., .], down [E, ., .])`` of a fused experts module."""
    if not all(hasattr(module, flag) for flag in _FLAGS):
        return None
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if not (isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter)
            and up.dim() == 3 and down.dim() == 3 and up.shape[0] == down.shape[0]):
        return None
    return up_name, up, down


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the fused experts modules in ``model``."""
    return {name: m for name, m in model.named_modules() if _fused_tensors(m) is not None}


def expert_linear_names(name: str, module: nn.Module) -> list[str]:
    """The Linear names ``unfuse_experts`` gives (or gave) the experts module ``name``."""
    if isinstance(module, LinearExperts):
        up_name, n_experts = module.up_name, module.num_experts
    else:
        up_name, up, _ = _fused_tensors(module)
        n_experts = up.shape[0]
    return [f"{name}.{e}.{proj}" for e in range(n_experts) for proj in (up_name, "down_proj")]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    """An nn.Linear with a copy of ``weight`` ``[out, in]`` (``[in, out]`` when transposed):
    its own storage, so that the fused tensor is freed, and an expert kept in float does not
    keep every expert's float weights alive once the others are quantized."""
    if transposed:
        weight = weight.t()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format),
                                 requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear


class LinearExperts(nn.Module):
    """A fused experts module as ``E`` children ``"0" .. "E-1"``, each with ``gate_up_proj``
    (``up_proj`` when the experts have no gate) and ``down_proj`` Linears, plus ``fused``: the
    original module without its weight tensors, kept for its gate / activation (gpt-oss's
    clamped SwiGLU, interleaved gate and up columns) and any post-expert norm.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``:
    per expert hit, in expert order, its tokens through its Linears, scaled by their routing
    weight and summed into the output, as transformers' eager experts forward does.
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        found = _fused_tensors(fused)
        if found is None:
            raise TypeError(f"{type(fused).__name__} is not a fused experts module "
                            "(transformers' use_experts_implementation)")
        if getattr(fused, "_is_expert_parallel", False):
            raise ValueError(f"{type(fused).__name__} is sharded for expert parallelism; "
                             "unfuse it before sharding")
        self.up_name, up, down = found
        self.num_experts = up.shape[0]
        self.has_gate, self.has_bias = bool(fused.has_gate), bool(fused.has_bias)
        self.has_post_expert_norm = bool(getattr(fused, "has_post_expert_norm", False))
        self.transposed = transposed = bool(fused.is_transposed)
        up_bias = getattr(fused, self.up_name + "_bias", None) if self.has_bias else None
        down_bias = getattr(fused, "down_proj_bias", None) if self.has_bias else None
        for e in range(self.num_experts):
            expert = nn.Module()
            expert.add_module(self.up_name, _linear(
                up[e], None if up_bias is None else up_bias[e], transposed))
            expert.add_module("down_proj", _linear(
                down[e], None if down_bias is None else down_bias[e], transposed))
            self.add_module(str(e), expert)
        for name in (self.up_name, "down_proj", self.up_name + "_bias", "down_proj_bias"):
            if name in fused._parameters:
                delattr(fused, name)
        self.fused = fused

    # Set while calibrating (calibrating_experts): "all" runs each expert on every token, so
    # that its Linears' statistics (GPTQ's Hessian, activation ranges) exist and are full rank
    # even for experts the calibration text rarely or never routes to; "routed" runs each on
    # its routed tokens. Either way every expert is called, in order, on every batch (with no
    # rows if none is routed to it): the layer-by-layer runner expects one call order. The
    # output still sums the routed tokens only.
    calibrating: str | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if self.calibrating is not None:
            experts = range(self.num_experts)
        else:
            with torch.no_grad():
                experts = torch.unique(top_k_index).tolist()
        for e in experts:
            if e >= self.num_experts:  # an expert-parallel sentinel: not on this rank
                continue
            slot, token = torch.where(top_k_index.t() == e)  # the eager forward's order
            if self.calibrating == "all":
                h = self._expert(e, hidden_states)[token]
            else:
                h = self._expert(e, hidden_states[token])
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert = self._modules[str(e)]
        h = expert._modules[self.up_name](x)
        h = self.fused._apply_gate(h) if self.has_gate else self.fused.act_fn(h)
        h = expert._modules["down_proj"](h)
        return self.fused.post_expert_norm(h) if self.has_post_expert_norm else h

    def fused_again(self) -> nn.Module:
        """The fused module again, its ``[E, ., .]`` parameters stacked from the experts' float
        Linears (ValueError if one is quantized); this module is left without its experts."""
        fused, projections = self.fused, (self.up_name, "down_proj")
        quantized = [f"{e}.{proj}" for e in range(self.num_experts) for proj in projections
                     if type(self._modules[str(e)]._modules[proj]) is not nn.Linear]
        if quantized:  # checked first: nothing is changed then
            raise ValueError(f"expert layers {quantized[:3]} are quantized; only float experts "
                             "can be fused back")
        for proj in projections:
            linears = [self._modules[str(e)]._modules[proj] for e in range(self.num_experts)]
            weight = torch.stack([linear.weight.detach() for linear in linears])
            if self.transposed:
                weight = weight.transpose(1, 2).contiguous()
            fused.register_parameter(proj, nn.Parameter(
                weight, requires_grad=linears[0].weight.requires_grad))
            if self.has_bias:
                fused.register_parameter(proj + "_bias", nn.Parameter(torch.stack(
                    [linear.bias.detach() for linear in linears]),
                    requires_grad=linears[0].bias.requires_grad))
            for e in range(self.num_experts):
                del self._modules[str(e)]._modules[proj]
        return fused

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, unfused from {type(self.fused).__name__}"


@contextmanager
def calibrating_experts(model: nn.Module, tokens: str = "all") -> Iterator[None]:
    """While calibrating: every ``LinearExperts`` runs each of its experts on ``tokens``,
    "all" or "routed" (see ``LinearExperts.calibrating``); the model's outputs do not change."""
    if tokens not in ("all", "routed"):
        raise ValueError(f"tokens={tokens!r}; allowed: 'all', 'routed'")
    found = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for m in found:
        m.calibrating = tokens
    try:
        yield
    finally:
        for m in found:
            m.calibrating = None


def unfuse_experts(model: nn.Module, names: list[str] | None = None, *,
                   selected: Callable[[str], bool] | None = None) -> list[str]:
    """Replace fused experts modules by ``LinearExperts``, in place: all, those named, or
    those with at least one expert projection name (``expert_linear_names``) for which
    ``selected`` is true; returns the names replaced. The model computes what transformers'
    eager experts forward computes (its batched / grouped implementations differ from that
    by float summation order)."""
    found = fused_experts(model)
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"not fused experts modules: {missing[:3]}")
        found = {n: found[n] for n in names}
    if selected is not None:
        found = {n: m for n, m in found.items()
                 if any(map(selected, expert_linear_names(n, m)))}
    for name, module in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LinearExperts(module))
    return list(found)


def fuse_experts(model: nn.Module, names: list[str]) -> None:
    """Undo ``unfuse_experts`` for the named ``LinearExperts`` (whose experts are float)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, model.get_submodule(name).fused_again())


# (checkpoint tensor name, index into its first dim or None for the whole tensor, transpose)
Part = tuple[str, int | None, bool]


def checkpoint_parts(model: nn.Module, names: Iterable[str]) -> dict[str, list[Part]]:
    """Where the tensors of a ``model`` with split experts (on meta, say) are in a checkpoint
    holding tensors ``names``: ``{model key: parts}``, the parts concatenated along dim 0
    (gate, then up); ``{}`` for a model without split experts. Names are first renamed as
    transformers' conversion mapping for the model says (Mixtral's ``block_sparse_moe`` ->
    ``mlp``). Experts are read from two layouts:

    - per-expert tensors under the source model's names (Mixtral's
      ``block_sparse_moe.experts.3.w1.weight``, Qwen-MoE's / DeepSeek's
      ``mlp.experts.3.gate_proj.weight``), renamed and grouped as transformers' own conversion
      mapping for the model says (its ``MergeModulelist(dim=0)`` [+ ``Concatenate(dim=1)``]
      converters);
    - fused ``[E, ., .]`` tensors under the model's names, sliced per expert.

    Raises ValueError naming a tensor where the checkpoint stores experts otherwise.
    """
    split = {name: m for name, m in model.named_modules() if isinstance(m, LinearExperts)}
    if not split:
        return {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
    )
    prefix = getattr(model, "base_model_prefix", "") or ""

    def owner_of(key: str) -> str | None:  # the split module, with or without the prefix
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(prefix + ".")):
            if candidate in split:
                return candidate
        return None

    def target(owner: str, e: int, param: str) -> str:
        proj, field = (param[:-5], "bias") if param.endswith("_bias") else (param, "weight")
        return f"{owner}.{e}.{proj}.{field}"

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found: dict[str, list[tuple[int, Part]]] = {}
    for name in names:
        key = name
        for renaming in renamings:
            key = renaming.rename_source_key(key)[0]
        base, _, param = key.rpartition(".")
        owner = owner_of(base)
        if owner is not None:  # fused on disk: one [E, ., .] tensor, a slice per expert
            experts = split[owner]
            transpose = experts.transposed and not param.endswith("_bias")
            for e in range(experts.num_experts):
                found.setdefault(target(owner, e, param), []).append((0, (name, e, transpose)))
            continue
        for converter in converters:
            renamed, pattern = converter.rename_source_key(key)
            if pattern is None:
                continue
            base, _, param = renamed.rpartition(".")
            owner = owner_of(base)
            index = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
            if owner is None or index is None:  # a layer the config does not build (MTP)
                break
            ops = [(type(op), op.dim) for op in converter.operations]
            if split[owner].transposed or ops not in ([(MergeModulelist, 0)],
                                                      [(MergeModulelist, 0), (Concatenate, 1)]):
                raise ValueError(f"checkpoint tensor {name!r}: experts stored in a way lowbit "
                                 f"cannot read per expert ({type(converter).__name__} to "
                                 f"{renamed!r})")
            position = converter.source_patterns.index(pattern)
            found.setdefault(target(owner, int(index.group(1)), param), []).append(
                (position, (name, None, False)))
            break
        else:  # not an expert tensor: under its renamed name (Mixtral's router, ...)
            found.setdefault(key, []).append((0, (name, None, False)))
    return {key: [part for _, part in sorted(parts)] for key, parts in found.items()}
