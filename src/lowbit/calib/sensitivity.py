"""Mixed precision by measurement: what each layer's quantization costs the model's output, and
the cheapest mix of specs under a bits-per-weight budget.

``measure_sensitivity`` quantizes one layer at a time with each candidate spec (RTN, the others
left in float) and measures the damage on calibration data: the mean KL divergence of the
next-token (or class) distribution from the float model's, in nats per position, for models
that return ``logits``; the relative squared error ``||y_q - y||^2 / ||y||^2`` of the output
otherwise. ``allocate_bits`` then picks one candidate per layer, minimizing the summed damage
(damage adds up for small perturbations) with the stored bytes, scales included, under the
budget: a multiple-choice knapsack solved greedily on each layer's lower convex hull.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from lowbit.calib.batches import as_batches, check_batches
from lowbit.calib.observe import _model_device
from lowbit.quant import fake_quantize
from lowbit.spec import QuantSpec, as_spec
from lowbit.tensor import stored_nbytes


@dataclass
class LayerSensitivity:
    """One layer: its weight count, and per candidate (``str(spec)``) bytes and damage."""

    name: str
    kind: str
    n_weights: int
    nbytes: dict[str, int]
    damage: dict[str, float]


@dataclass
class Sensitivity:
    """What :func:`measure_sensitivity` measured, layer by layer, in module order."""

    candidates: list[QuantSpec]
    layers: list[LayerSensitivity]
    metric: str  # "kl" (nats per position) or "rel_mse"
    n_sequences: int
    n_positions: int

    def bits_range(self) -> tuple[float, float]:
        """Bits per weight of the all-smallest and the all-largest choice."""
        n = sum(layer.n_weights for layer in self.layers)
        low = sum(min(layer.nbytes.values()) for layer in self.layers)
        high = sum(max(layer.nbytes.values()) for layer in self.layers)
        return low * 8 / n, high * 8 / n


@dataclass
class MixedPlan:
    """The spec of every measured layer under a budget (from :func:`allocate_bits`).

    ``specs`` maps each module name (as a literal pattern) to its spec: pass it to
    ``lowbit.quantize(model, plan.specs, ...)``; modules outside the plan stay in float.
    """

    choice: dict[str, QuantSpec]
    bits_budget: float
    bits_per_weight: float
    predicted_damage: float
    sensitivity: Sensitivity
    specs: dict[str, QuantSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.specs = {_literal(name): spec for name, spec in self.choice.items()}

    def counts(self) -> dict[str, int]:
        """``{spec string: number of layers}`` in candidate order."""
        chosen = [str(s) for s in self.choice.values()]
        return {str(c): chosen.count(str(c)) for c in self.sensitivity.candidates
                if str(c) in chosen}

    def by_role(self) -> list[tuple[str, int, dict[str, float], dict[str, int]]]:
        """Layers grouped by name with block indices as ``*`` (``model.layers.*.mlp.down_proj``):
        ``(role, layers, mean damage per candidate, chosen spec counts)``, in module order."""
        groups: dict[str, list[LayerSensitivity]] = {}
        for layer in self.sensitivity.layers:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", layer.name), []).append(layer)
        rows = []
        for role, layers in groups.items():
            mean = {c: sum(la.damage[c] for la in layers) / len(layers) for c in layers[0].damage}
            chosen = [str(self.choice[la.name]) for la in layers]
            order = [str(c) for c in self.sensitivity.candidates]
            rows.append((role, len(layers), mean,
                         {c: chosen.count(c) for c in order if c in chosen}))
        return rows

    def table(self) -> str:
        """A markdown table of :meth:`by_role`."""
        names = [str(c) for c in self.sensitivity.candidates]
        unit = "KL" if self.sensitivity.metric == "kl" else "rel. MSE"
        lines = ["| layers | n | " + " | ".join(f"{unit} {n}" for n in names) + " | chosen |",
                 "| --- | ---: |" + " ---: |" * len(names) + " --- |"]
        for role, n, mean, chosen in self.by_role():
            lines.append(f"| `{role}` | {n} | " + " | ".join(f"{mean[c]:.3g}" for c in names)
                         + " | " + ", ".join(f"{k} x {v}" for v, k in chosen.items()) + " |")
        return "\n".join(lines)


def _literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (``*``, ``?``, ``[`` made literal)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _main_output(out: Any) -> tuple[str, torch.Tensor]:
    """``("kl", logits)`` or ``("rel_mse", tensor)``: what the damage is measured on."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "kl", logits
    if isinstance(out, torch.Tensor):
        return "rel_mse", out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return "rel_mse", hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return "rel_mse", out[0]
    raise TypeError(f"the model returned a {type(out).__name__}; measuring sensitivity needs "
                    "logits, a tensor, or a last_hidden_state")


def _weight_layers(model: nn.Module, include: list[str] | None,
                   exclude: list[str]) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` of every module ``lowbit.quantize`` would take, once each."""
    from lowbit.api import _kept_in_float, _kind
    from lowbit.models.select import first_match

    kept_in_float = _kept_in_float(model)
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or id(module) in seen or id(module) in kept_in_float:
            continue
        seen.add(id(module))
        if include is not None and first_match(name, include) is None:
            continue
        if first_match(name, exclude) is not None:
            continue
        found.append((name, module, kind))
    return found


def _fake_quantized(module: nn.Module, kind: str, spec: QuantSpec) -> torch.Tensor:
    """The module's weight as RTN under ``spec`` gives it back (Conv1D's stored ``[in, out]``)."""
    w = module.weight.detach()
    if kind == "Conv1D":
        return fake_quantize(w.t().float(), spec).t().to(w.dtype)
    return fake_quantize(w.float(), spec).to(w.dtype)


@contextmanager
def _weight_swapped(module: nn.Module, weight: torch.Tensor):
    """The module computes with ``weight`` inside the block (a tied twin keeps its own)."""
    original = module._parameters["weight"]
    module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    try:
        yield
    finally:
        module._parameters["weight"] = original


class _BlockReplay:
    """Records each block's output per batch in the float pass; then makes the blocks before a
    given one return their recorded output instead of computing it (they are unchanged, so the
    output is the same) while a layer in a later block is measured."""

    def __init__(self, model: nn.Module) -> None:
        from lowbit.calib.sequential import find_blocks

        found = find_blocks(model)
        self.prefix, self.blocks = (found[0] + ".", found[1]) if found else ("", None)
        self.outputs: list[list[Any]] = []  # [block][batch]
        self.batch = 0

    def block_of(self, name: str) -> int | None:
        if self.blocks is None or not name.startswith(self.prefix):
            return None
        index = name[len(self.prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    @contextmanager
    def recording(self):
        if self.blocks is None:
            yield
            return
        self.outputs = [[] for _ in self.blocks]

        def hook(i: int) -> Callable:
            def record(module, args, kwargs, output):
                self.outputs[i].append(tree_map(_detached_copy, output))
            return record

        handles = [b.register_forward_hook(hook(i), with_kwargs=True)
                   for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def skipping_before(self, block: int | None):
        if not block:
            yield
            return
        blocks = list(self.blocks)[:block]
        for i, b in enumerate(blocks):
            b.forward = (lambda *a, _i=i, **k: tree_map(_detached_copy,
                                                         self.outputs[_i][self.batch]))
        try:
            yield
        finally:
            for b in blocks:
                del b.forward


def _detached_copy(value: Any) -> Any:
    # a copy each time: a block that edited its input in place would corrupt the record
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _positions(reference: tuple[torch.Tensor, ...]) -> int:
    """Output positions of a batch (tokens, or rows of a model's output features)."""
    first = reference[0]
    return max(1, first.numel() // max(1, first.shape[-1]))


def _reference(metric: str, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the float pass keeps of a batch's output: float32 ``(log p, p)`` (kl) or a copy."""
    if metric == "kl":
        logp = F.log_softmax(out.float(), dim=-1)
        return logp, logp.exp()
    return (out.detach().float().clone(),)


def _damage(metric: str, reference: tuple[torch.Tensor, ...], out: torch.Tensor) -> float:
    """Summed damage of one batch: KL per position summed, or the relative squared error
    times the batch's positions (so dividing by all positions gives a weighted mean)."""
    if metric == "kl":
        logp, p = reference
        # float32 is enough: log p - log q is formed first, so the terms are small
        per_position = (p * (logp - F.log_softmax(out.float(), dim=-1))).sum(-1)
        return float(per_position.double().sum())
    ref = reference[0].double()
    err = float(((out.double() - ref) ** 2).sum()) / max(float((ref**2).sum()), 1e-30)
    return err * _positions(reference)


def measure_sensitivity(
    model: nn.Module,
    candidates: Sequence[str | QuantSpec],
    calib: Any,
    *,
    tokenizer: Any = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    calib_samples: int = 8,
    calib_seq_len: int = 256,
    calib_batch_size: int = 8,
    show_progress: bool = False,
) -> Sensitivity:
    """Damage of quantizing each layer alone with each candidate (RTN), on ``calib``.

    candidates: two or more weight-only specs (preset names, spec strings or QuantSpecs).
    include / exclude: the layers considered, as for ``lowbit.quantize``.
    calib, tokenizer, calib_samples, calib_seq_len, calib_batch_size: as for
        ``lowbit.quantize`` (``lowbit.calib.as_batches``); the defaults, 8 x 256 tokens, are
        enough to rank layers. One forward per layer and candidate, from the layer's block on
        (the blocks before it replay their recorded float outputs).
    The float model's outputs are kept for all batches: for KL, two float32 tokens x vocabulary
    tensors (log-probs and probabilities).
    """
    from lowbit.models.select import patterns

    specs = _check_candidates(candidates)
    include, exclude = patterns(include), patterns(exclude) or []
    layers = _weight_layers(model, include, exclude)
    if not layers:
        raise ValueError("no layer to measure: include / exclude leave no Linear, Conv1D, "
                         "Conv2d or Embedding module")
    batches = as_batches(calib, tokenizer, calib_samples, calib_seq_len,
                         batch_size=calib_batch_size)
    check_batches(model, batches)
    device = _model_device(model)
    kwargs = ({"use_cache": False}
              if "use_cache" in inspect.signature(model.forward).parameters else {})
    replay = _BlockReplay(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            references, metric = [], "kl"
            with replay.recording():
                for batch in batches:
                    metric, out = _main_output(model(batch.to(device), **kwargs))
                    references.append(_reference(metric, out))
            n_positions = sum(_positions(r) for r in references)
            results = []
            with _progress(layers, show_progress) as step:
                for name, module, kind in layers:
                    nbytes, damage = {}, {}
                    shape = tuple(module.weight.shape)
                    shape = shape[::-1] if kind == "Conv1D" else shape
                    for spec in specs:
                        key = str(spec)
                        try:
                            nbytes[key] = stored_nbytes(spec, shape)
                            weight = _fake_quantized(module, kind, spec)
                        except ValueError as e:
                            raise ValueError(f"layer {name!r} ({kind}), candidate {key}: {e}"
                                             ) from None
                        total = 0.0
                        with _weight_swapped(module, weight), \
                                replay.skipping_before(replay.block_of(name)):
                            for i, (batch, ref) in enumerate(zip(batches, references,
                                                                 strict=True)):
                                replay.batch = i
                                _, out = _main_output(model(batch.to(device), **kwargs))
                                total += _damage(metric, ref, out)
                        damage[key] = max(total / n_positions, 0.0)
                    results.append(LayerSensitivity(name, kind, math.prod(shape), nbytes,
                                                    damage))
                    step(name)
    finally:
        model.train(was_training)
    n_seq = sum(int(b.shape[0]) for b in batches)
    return Sensitivity(specs, results, metric, n_seq, n_positions)


def _check_candidates(candidates: Sequence[str | QuantSpec]) -> list[QuantSpec]:
    if isinstance(candidates, (str, QuantSpec)) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a list of two or more specs, got "
                        f"{type(candidates).__name__}")
    specs = [as_spec(c) for c in candidates]
    if len({str(s) for s in specs}) != len(specs) or len(specs) < 2:
        raise ValueError(f"candidates must be two or more different specs, got "
                         f"{[str(s) for s in specs]}")
    for s in specs:
        if s.act is not None:
            raise ValueError(f"candidate {s} quantizes activations; mixed precision chooses "
                             "among weight-only specs")
    return specs


@contextmanager
def _progress(layers: list, enabled: bool):
    if not enabled:
        yield lambda name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from lowbit.cli.common import err_console

    bar = Progress(TextColumn("measuring sensitivity"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), console=err_console, transient=True)
    with bar:
        task = bar.add_task("", total=len(layers))
        yield lambda name: bar.update(task, advance=1, description=name)


def allocate_bits(sensitivity: Sensitivity, bits: float) -> MixedPlan:
    """One candidate per layer with the least summed damage whose stored bytes (codes, scales,
    zero-points) stay within ``bits`` per weight over the measured layers.

    Greedy on each layer's lower convex hull of (bytes, damage): start from every layer's
    smallest candidate, then take upgrades in order of damage removed per byte while they fit.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise ValueError(f"bits={bits!r}; allowed: a number of bits per weight")
    low, high = sensitivity.bits_range()
    if bits < low - 1e-9:
        raise ValueError(f"bits={bits} is below {low:.3f}, the bits per weight of the smallest "
                         f"candidate on every layer; allowed: {low:.3f} or more")
    layers = sensitivity.layers
    budget = bits * sum(la.n_weights for la in layers) / 8
    hulls = [_lower_hull(la) for la in layers]
    at = [0] * len(layers)
    used = sum(h[0][0] for h in hulls)
    steps = sorted(  # most damage removed per byte first; a layer's steps in their order
        (-(h[j][1] - h[j + 1][1]) / (h[j + 1][0] - h[j][0]), i, j)
        for i, h in enumerate(hulls) for j in range(len(h) - 1)
    )
    for _, i, j in steps:
        if at[i] != j:  # an earlier step of this layer did not fit
            continue
        extra = hulls[i][j + 1][0] - hulls[i][j][0]
        if used + extra <= budget:
            used += extra
            at[i] = j + 1
    by_key = {str(s): s for s in sensitivity.candidates}
    choice = {la.name: by_key[hulls[i][at[i]][2]] for i, la in enumerate(layers)}
    damage = sum(hulls[i][at[i]][1] for i in range(len(layers)))
    n = sum(la.n_weights for la in layers)
    return MixedPlan(choice, float(bits), used * 8 / n, damage, sensitivity)


def _lower_hull(layer: LayerSensitivity) -> list[tuple[int, float, str]]:
    """``(bytes, damage, spec)`` points from the smallest candidate on, each larger one removing
    damage at a falling rate per byte (others are never worth their bytes)."""
    points = sorted((layer.nbytes[k], layer.damage[k], k) for k in layer.nbytes)
    hull: list[tuple[int, float, str]] = []
    for p in points:
        if hull and p[0] == hull[-1][0]:
            if p[1] < hull[-1][1]:
                hull.pop()
            else:
                continue
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes, no less damage
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(a: tuple, b: tuple, c: tuple) -> float:
    """> 0 when ``b`` lies below the segment ``a -> c`` (a convex turn)."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def mixed_precision(
    model: nn.Module,
    candidates: Sequence[str | QuantSpec],
    bits: float,
    calib: Any,
    **kwargs: Any,
) -> MixedPlan:
    """:func:`measure_sensitivity` then :func:`allocate_bits`: the plan for ``bits`` per weight.

    ``lowbit.quantize(model, plan.specs, ...)`` applies it (with any algorithm)."""
    return allocate_bits(measure_sensitivity(model, candidates, calib, **kwargs), bits)

