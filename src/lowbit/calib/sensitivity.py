"""Mixed precision by measurement: what each layer's quantization costs the model's output, and
the cheapest mix of specs under a bits-per-weight budget.

``measure_sensitivity`` quantizes one layer at a time with each candidate spec (RTN, the others
left in float) and measures the damage on calibration data: the mean KL divergence of the
next-token (or class) distribution from the float model's, in nats per position, for models
that return ``logits``; the relative squared error ``||y_q - y||^2 / ||y||^2`` of the output
otherwise. ``allocate_bits`` then picks one candidate per layer, minimizing the summed damage
(damage adds up for small perturbations) with the stored bytes, scales included, under the
budget: a multiple-choice knapsack, solved by dynamic programming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from lowbit.calib.batches import as_batches, check_batches
from lowbit.calib.observe import _model_device
from lowbit.quant import fake_quantize
from lowbit.spec import QuantSpec, as_spec
from lowbit.tensor import stored_nbytes

# Resolution of allocate_bits' dynamic program: the spare budget in at most this many units.
_DP_UNITS = 100_000


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
    calib_digest: str = ""  # sha256 of the calibration batches (token ids) it was measured on

    def bits_range(self) -> tuple[float, float]:
        """Bits per weight of the all-smallest and the all-largest choice."""
        n = sum(layer.n_weights for layer in self.layers)
        low = sum(min(layer.nbytes.values()) for layer in self.layers)
        high = sum(max(layer.nbytes.values()) for layer in self.layers)
        return low * 8 / n, high * 8 / n

    def save(self, path: str | os.PathLike) -> None:
        """Write the measurement as JSON (one measurement, many budgets across runs)."""
        data = {"version": 1, "candidates": [c.to_dict() for c in self.candidates],
                "metric": self.metric, "n_sequences": self.n_sequences,
                "n_positions": self.n_positions, "calib_digest": self.calib_digest,
                "layers": [dataclasses.asdict(la) for la in self.layers]}
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        """Read what :meth:`save` wrote; ValueError naming the file if it is not that."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("version") != 1:
                raise ValueError(f"version {data.get('version')!r}, expected 1")
            return cls([QuantSpec.from_dict(c) for c in data["candidates"]],
                       [LayerSensitivity(**la) for la in data["layers"]], data["metric"],
                       int(data["n_sequences"]), int(data["n_positions"]),
                       str(data.get("calib_digest", "")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a lowbit sensitivity file ({type(e).__name__}: "
                             f"{e})") from None

    def check_matches(self, model: nn.Module, candidates: Sequence[str | QuantSpec],
                      calib_digest: str, include: str | Iterable[str] | None = None,
                      exclude: str | Iterable[str] | None = None) -> None:
        """Raise ValueError unless this measurement is of ``model``'s layers (names and sizes
        under include / exclude), for ``candidates``, on calibration batches with this digest."""
        from lowbit.models.select import patterns

        wanted = [str(s) for s in _check_candidates(candidates)]
        if sorted(wanted) != sorted(str(c) for c in self.candidates):
            raise ValueError(f"measured for candidates {[str(c) for c in self.candidates]}, "
                             f"not {wanted}")
        with _weight_layers(model, patterns(include), patterns(exclude) or []) as found:
            layers = [(name, math.prod(m.weight.shape)) for name, m, _ in found]
        if layers != [(la.name, la.n_weights) for la in self.layers]:
            raise ValueError(f"measured on {len(self.layers)} other layers (this model and "
                             f"selection have {len(layers)})")
        if calib_digest != self.calib_digest:
            raise ValueError("measured on other calibration tokens")


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


@contextmanager
def _weight_layers(model: nn.Module, include: list[str] | None,
                   exclude: list[str]) -> Iterator[list[tuple[str, nn.Module, str]]]:
    """``(name, module, kind)`` of every module ``lowbit.quantize`` would take, once each.
    Fused MoE experts modules with a selected expert are split meanwhile, as quantize splits
    them (the model computes the same), and fused again after."""
    from lowbit.api import _kept_in_float, _kind
    from lowbit.models.experts import fuse_experts, unfuse_experts
    from lowbit.models.select import first_match

    split = unfuse_experts(model, selected=lambda name: (include is None or first_match(
        name, include) is not None) and first_match(name, exclude) is None)
    try:
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
        yield found
    finally:
        fuse_experts(model, split)


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
    output is the same) while a layer in a later block is measured.

    Only where the float pass shows a plain chain: every block called once per forward, in list
    order, each taking the previous one's output as its hidden states. Otherwise (ALBERT's
    shared layers run several times, blocks called out of order) every forward runs in full.
    """

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
    def recording(self, n_batches: int):
        if self.blocks is None:
            yield
            return
        self.outputs = [[] for _ in self.blocks]
        calls: list[int] = []
        chained = [True]

        def hook(i: int) -> Callable:
            def record(module, args, kwargs, output):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if calls and (calls[-1] != i - 1 or not isinstance(hidden, torch.Tensor)
                              or not _same(hidden, _first_tensor(self.outputs[i - 1][-1]))):
                    chained[0] = chained[0] and i == 0  # block 0 starts a new forward
                calls.append(i)
                self.outputs[i].append(tree_map(_detached_copy, output))
            return record

        handles = [b.register_forward_hook(hook(i), with_kwargs=True)
                   for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if not chained[0] or calls != list(range(len(self.blocks))) * n_batches:
            self.blocks, self.outputs = None, []  # not a plain chain: full forwards

    @contextmanager
    def skipping_before(self, block: int | None):
        if not block or self.blocks is None:
            yield
            return
        blocks = list(self.blocks)[:block]
        before = [b.__dict__.get("forward") for b in blocks]  # a wrapper installed by others
        for i, b in enumerate(blocks):
            b.forward = (lambda *a, _i=i, **k: tree_map(_detached_copy,
                                                         self.outputs[_i][self.batch]))
        try:
            yield
        finally:
            for b, previous in zip(blocks, before, strict=True):
                if previous is None:
                    del b.forward
                else:
                    b.forward = previous


def _first_tensor(value: Any) -> torch.Tensor | None:
    """A block's hidden-state output: the tensor itself, or the first of a tuple / list."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and bool(torch.equal(a, b))


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
        # float32 is enough: log p - log q is formed first, so the terms are small; entries
        # the float model gives no mass (logits masked to -inf) add nothing
        terms = p * (logp - F.log_softmax(out.float(), dim=-1))
        return float(torch.where(p > 0, terms, 0.0).sum(-1).double().sum())
    ref = reference[0].double()
    err = float(((out.double() - ref) ** 2).sum()) / max(float((ref**2).sum()), 1e-30)
    return err * _positions(reference)


def _finite(references: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(bool(torch.isfinite(r[-1]).all()) for r in references)


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
        where the blocks form a plain chain (the blocks before it replay their recorded float
        outputs), else in full.
    The float model's outputs are kept for all batches: for KL, two float32 tokens x vocabulary
    tensors (log-probs and probabilities).
    """
    from lowbit.models.select import patterns

    specs = _check_candidates(candidates)
    include, exclude = patterns(include), patterns(exclude) or []
    with _weight_layers(model, include, exclude) as layers:
        return _measure(model, specs, layers, calib, tokenizer, calib_samples, calib_seq_len,
                        calib_batch_size, show_progress)


def _measure(model: nn.Module, specs: list[QuantSpec], layers: list[tuple[str, nn.Module, str]],
             calib: Any, tokenizer: Any, calib_samples: int, calib_seq_len: int,
             calib_batch_size: int, show_progress: bool) -> Sensitivity:
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
    modes = [(m, m.training) for m in model.modules()]  # each module's own, put back after
    model.eval()
    try:
        with torch.no_grad():
            references, metric = [], "kl"
            with replay.recording(len(batches)):
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
                        if math.isnan(total):
                            raise ValueError(
                                f"layer {name!r} ({kind}), candidate {key}: the model's "
                                f"output is NaN (the float output is "
                                f"{'finite' if _finite(references) else 'not finite either'})")
                        damage[key] = max(total / n_positions, 0.0)  # inf: a broken output
                    results.append(LayerSensitivity(name, kind, math.prod(shape), nbytes,
                                                    damage))
                    step(name)
    finally:
        for m, training in modes:
            m.training = training
    n_seq = sum(int(b.shape[0]) for b in batches)
    return Sensitivity(specs, results, metric, n_seq, n_positions, batches_digest(batches))


def batches_digest(batches: Sequence[torch.Tensor]) -> str:
    """sha256 of calibration batches (shapes, dtypes and values), to recognise them again."""
    digest = hashlib.sha256()
    for b in batches:
        digest.update(f"{tuple(b.shape)}{b.dtype}".encode())
        digest.update(b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("measuring sensitivity"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True),
                   transient=True)
    with bar:
        task = bar.add_task("", total=len(layers))
        yield lambda name: bar.update(task, advance=1, description=name)


def allocate_bits(sensitivity: Sensitivity, bits: float) -> MixedPlan:
    """One candidate per layer with the least summed damage whose stored bytes (codes, scales,
    zero-points) stay within ``bits`` per weight over the measured layers.

    A multiple-choice knapsack solved exactly by dynamic programming over the bytes above every
    layer's smallest candidate, counted in units of at most 1/100,000 of the spare budget
    (costs rounded up, so the budget always holds); bytes the rounding left over then go to
    the single-layer upgrades that remove the most damage.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise ValueError(f"bits={bits!r}; allowed: a number of bits per weight")
    low, _ = sensitivity.bits_range()
    if bits < low - 1e-9:
        raise ValueError(f"bits={bits} is below {low:.3f}, the bits per weight of the smallest "
                         f"candidate on every layer; allowed: {low:.3f} or more")
    layers = sensitivity.layers
    keys = [str(c) for c in sensitivity.candidates]
    n = sum(la.n_weights for la in layers)
    # bits_range()[1] * n / 8 may round a few ulps below the bytes it came from
    budget = bits * n / 8 * (1 + 1e-12) + 1e-6
    nbytes = np.array([[la.nbytes[k] for k in keys] for la in layers], dtype=np.float64)
    damage = raw = np.array([[la.damage[k] for k in keys] for la in layers], dtype=np.float64)
    if np.isnan(damage).any():
        i, c = np.argwhere(np.isnan(damage))[0]
        raise ValueError(f"layer {layers[i].name!r}, candidate {keys[c]}: damage is NaN")
    # an infinite damage (an output the quantized layer breaks) stays finite here, larger than
    # any sum of finite ones, so the program's sums stay ordered
    finite = damage[np.isfinite(damage)]
    damage = np.minimum(damage, (float(finite.max()) + 1.0) * (len(layers) + 1) * 1e6
                        if finite.size else 1.0)
    extra = nbytes - nbytes.min(axis=1, keepdims=True)
    spare = max(budget - float(nbytes.min(axis=1).sum()), 0.0)
    unit = max(spare / _DP_UNITS, 1.0)
    cap = int(spare // unit)
    cost = np.ceil(extra / unit - 1e-9).astype(np.int64)
    best = np.zeros(cap + 1)  # least damage of the layers so far within b units
    picks = np.zeros((len(layers), cap + 1), dtype=np.int16)
    for i in range(len(layers)):
        new = np.full(cap + 1, np.inf)
        for c in np.argsort(nbytes[i], kind="stable"):  # ties: the smaller candidate
            if cost[i, c] > cap:
                continue
            moved = best[: cap + 1 - cost[i, c]] + damage[i, c]
            better = moved < new[cost[i, c]:]
            new[cost[i, c]:][better] = moved[better]
            picks[i, cost[i, c]:][better] = c
        best = new
    at, units = [0] * len(layers), cap
    for i in reversed(range(len(layers))):
        at[i] = int(picks[i, units])
        units -= int(cost[i, at[i]])
    used = float(nbytes[np.arange(len(layers)), at].sum())
    while True:  # the bytes rounding kept back: best single upgrade that still fits
        gain = damage[np.arange(len(layers)), at][:, None] - damage
        fits = used - nbytes[np.arange(len(layers)), at][:, None] + nbytes <= budget
        gain = np.where(fits & (gain > 0), gain, 0.0)
        i, c = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[i, c] <= 0:
            break
        used += float(nbytes[i, c] - nbytes[i, at[i]])
        at[i] = int(c)
    choice = {la.name: sensitivity.candidates[at[i]] for i, la in enumerate(layers)}
    total = float(raw[np.arange(len(layers)), at].sum())  # inf where an infinite one was taken
    return MixedPlan(choice, float(bits), used * 8 / n, total, sensitivity)


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

