"""Layer-by-layer (sequential) calibration: quantize a model one block at a time.

The inputs of the first block of the model's block stack (``model.layers`` of Llama,
``transformer.h`` of GPT-2, ``encoder.layer`` of BERT) are captured for every calibration batch by
running the model up to that block. Then, block by block: hooks collect ``LayerStats`` of every
linear's input, the algorithm may transform the block (``prepare_block``; AWQ, SmoothQuant), the
statistics are collected again if it asks, each selected linear is quantized and swapped for a
``QuantLinear``, and the *quantized* block is run on the captured inputs to give the next block's
inputs. Linears outside the stack (``lm_head``) are quantized last, with statistics from one pass
of the (by then quantized) model.

With a ``CheckpointReader`` the model lives on the meta device and each block's tensors are read
from the safetensors files just before the block is processed, so only one block is ever held in
full precision (the memory-bounded path of ``lowbit.quantize(path, ...)``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, LayerStats
from lowbit.calib.batches import check_batches
from lowbit.models.experts import checkpoint_parts
from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear, linear_weight
from lowbit.spec import QuantSpec

INPUT_SAMPLE_TOKENS = 4096  # tokens kept per linear for algorithms that need raw inputs
ERROR_SAMPLE_TOKENS = 512  # tokens kept per linear to measure the error without a Hessian


class _StopForward(Exception):
    """Raised by the capture hook on the first block: the rest of the forward is not needed."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "Linear"
    return type(module).__name__


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, ModuleList)`` of the model's block stack, or None when it has none.

    The first ``nn.ModuleList`` (in module order) of two or more children of one type, each
    holding Linear / Conv1D layers.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        first = type(module[0])
        if any(type(child) is not first for child in module):
            continue
        if any(_is_linear(m) for m in module[0].modules()):
            return name, module
    return None


@dataclass
class LayerResult:
    """One quantized module: relative output error ``||X(W - Q)^T|| / ||X W^T||`` on the
    calibration inputs (None where no inputs were observed)."""

    name: str
    kind: str
    spec: QuantSpec
    error: float | None
    tokens: int
    note: str = ""


@dataclass
class SequentialResult:
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blocks: int = 0


class CheckpointReader:
    """Reads single tensors of a (sharded) safetensors model folder into a meta-device model.

    Checkpoint names may carry or lack the model's ``base_model_prefix`` (BERT's ``bert.``).
    """

    def __init__(self, model_dir: str | Path, model: nn.Module) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.model_dir / "model.safetensors"
            if not single.is_file():
                raise ValueError(f"{self.model_dir} has no model.safetensors(.index.json)")
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        # model key -> its parts: (file, checkpoint name, index into dim 0 or None, transpose),
        # concatenated along dim 0; one whole tensor but for split MoE experts
        self._where: dict[str, list[tuple[str, str, int | None, bool]]] = {}
        mapped = checkpoint_parts(model, weight_map) or {
            name: [(name, None, False)] for name in weight_map}
        for key, parts in mapped.items():
            where = [(weight_map[name], name, index, transpose)
                     for name, index, transpose in parts]
            self._where[key] = where
            if prefix and key.startswith(prefix + "."):
                self._where.setdefault(key[len(prefix) + 1 :], where)
            elif prefix:
                self._where.setdefault(f"{prefix}.{key}", where)
        self.bytes_read = 0

    def keys(self) -> list[str]:
        """The model keys this checkpoint holds a tensor for (with and without the prefix)."""
        return list(self._where)

    def tensors(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for the model state-dict keys found in the checkpoint."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            files: dict[str, Any] = {}
            for key in keys:
                pieces = []
                for file, name, index, transpose in self._where.get(key, ()):
                    if file not in files:
                        files[file] = stack.enter_context(
                            safe_open(str(self.model_dir / file), "pt"))
                    t = (files[file].get_tensor(name) if index is None
                         else files[file].get_slice(name)[index])  # one expert's rows only
                    self.bytes_read += t.numel() * t.element_size()
                    pieces.append(t.t() if transpose else t)
                if not pieces:
                    continue
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                converted = t.to(dtype) if t.is_floating_point() else t
                # a tensor of the shard's memory map keeps the whole mapping alive: one small
                # kept tensor (a norm weight) would pin every block's shard in the address
                # space, so what is kept is always a contiguous copy in process memory
                out[key] = (converted.clone(memory_format=torch.contiguous_format)
                            if converted.data_ptr() == t.data_ptr() else converted.contiguous())
        return out

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype,
                  skip: Callable[[str], bool] = lambda k: False) -> None:
        """Assign ``module``'s persistent tensors (model keys ``prefix + name``) from disk."""
        expected = module.state_dict(keep_vars=True)
        keys = [k for k in expected if not skip(prefix + k)]
        found = self.tensors([prefix + k for k in keys], dtype)
        for key, t in found.items():  # (MoE experts: their names escape the up-front check)
            want = expected[key[len(prefix):]].shape
            if t.shape != want:
                raise ValueError(f"{self.model_dir}: tensor {key!r} is {list(t.shape)} in the "
                                 f"checkpoint but config.json builds {list(want)}; the config "
                                 "does not match the weights")
        missing = [prefix + k for k in keys if prefix + k not in found]
        tied = _tied_keys(module, prefix)
        missing = [k for k in missing if k not in tied]
        if missing:
            raise ValueError(
                f"{self.model_dir}: no tensor {missing[0]!r} in the checkpoint "
                f"({len(missing)} missing); the folder does not match config.json"
            )
        module.load_state_dict(
            {k[len(prefix):]: v for k, v in found.items()}, strict=False, assign=True
        )


def _tied_keys(module: nn.Module, prefix: str) -> set[str]:
    """Keys of parameters that share a Parameter object with an earlier key (tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.add(prefix + k)
        else:
            seen[id(v)] = k
    return tied


def open_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, CheckpointReader]:
    """A transformers model built on the meta device from ``model_dir``'s config.json, with
    every tensor outside its block stack read from disk; blocks stay on meta until
    ``quantize_sequential`` loads them one at a time. Returns ``(model, reader)``."""
    from transformers import AutoConfig

    from lowbit.io.load import rebuild_meta_buffers
    from lowbit.models.experts import unfuse_experts
    from lowbit.models.hf import build_on_meta, model_kind

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(model_dir)!r} is not a Hugging Face model folder "
                         "(no config.json)")
    config = AutoConfig.from_pretrained(path)
    model = build_on_meta(config, model_kind(config), dtype)
    unfuse_experts(model)  # MoE: the checkpoint's experts are read per expert Linear
    try:
        reader = CheckpointReader(path, model)
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}; load the model whole "
                         "(lowbit.models.hf.load_hf_model) and quantize the model object") from None
    found = find_blocks(model)
    block_prefix = (found[0] + ".") if found else None

    def in_blocks(key: str) -> bool:
        return block_prefix is not None and key.startswith(block_prefix)

    if getattr(model, "pooler", None) is not None and not any(
            key.startswith("pooler.") for key in reader.keys()):
        model.pooler = None  # saved from *ForMaskedLM: dropped, as load_hf_model drops it
    reader.load_into(model, "", dtype, skip=in_blocks)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_meta_buffers(model)
    model.eval()
    model._lowbit_source = str(path.resolve())
    from lowbit.models.hf import source_float_dtype

    stored = source_float_dtype(path)
    if stored is not None:
        model._lowbit_stored_dtype = stored
    return model, reader


class _Progress:
    """A rich progress bar over blocks with the last layer's relative error (stderr)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("quantizing block"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.description}"), console=Console(stderr=True), transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def layer(self, result: LayerResult) -> None:
        if self.bar is not None:
            err = "-" if result.error is None else f"{result.error:.4f}"
            self.bar.update(self.task, description=f"{result.name}  rel. error {err}")

    def block_done(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def capture_first_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[torch.Tensor]
) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` the model passes ``block`` for each batch (the forward stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False  # no KV cache objects in the captured kwargs
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch)
                except _StopForward:
                    continue
                raise ValueError("the model's forward did not reach its first block")
    finally:
        handle.remove()
        if use_cache is not None:
            config.use_cache = use_cache
    return captured


class _Collector:
    """Forward pre-hooks gathering LayerStats (and input samples) of named linears."""

    def __init__(self, modules: Mapping[str, nn.Module], hessian: set[str],
                 sample: Mapping[str, int], n_batches: int, observers: Mapping[str, Any],
                 attach: bool = True) -> None:
        self.stats = {n: LayerStats() for n in modules}
        self._last: tuple[Any, str, bool] = (None, "", False)  # input, linear, with Hessian
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in sample}
        self._gen = torch.Generator().manual_seed(0)
        self._per_batch = {n: max(1, math.ceil(k / max(n_batches, 1))) for n, k in sample.items()}
        # hooks[name](module, args): the statistics update; registered on the modules unless
        # attach=False (the staged forward calls them itself)
        self.hooks = {n: self._hook(n, n in hessian, observers.get(n)) for n in modules}
        self._handles = ([m.register_forward_pre_hook(self.hooks[n]) for n, m in modules.items()]
                         if attach else [])

    def _hook(self, name: str, hessian: bool, observer: Any):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if args[0] is self._last[0] and self._last[2] == hessian:
                # the same input tensor as the previous linear (q/k/v, gate/up): share its
                # statistics instead of computing the same X^T X again
                self.stats[name] = self.stats[self._last[1]]
            else:
                self.stats[name].update(x, hessian=hessian)
                self._last = (args[0], name, hessian)
            if observer is not None:
                observer.update(x)
            if name in self.samples:
                k = min(self._per_batch[name], x.shape[0])
                rows = torch.randperm(x.shape[0], generator=self._gen)[:k]
                self.samples[name].append(x[rows].float().clone())

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = (None, "", False)


def relative_error(weight: torch.Tensor, qweight: torch.Tensor, stats: LayerStats | None,
                   sample: list[torch.Tensor] | None) -> float | None:
    """``||X (W - Q)^T|| / ||X W^T||``: from the Hessian ``sum x x^T`` as
    ``sqrt(tr(E H E^T) / tr(W H W^T))``, else from sampled input rows."""
    W = weight.float()
    E = W - qweight.float()
    if stats is not None and stats.hessian is not None:
        H = stats.hessian
        num, den = float(((E @ H) * E).sum()), float(((W @ H) * W).sum())
    elif sample:
        X = torch.cat(sample)
        num, den = float((X @ E.t()).pow(2).sum()), float((X @ W.t()).pow(2).sum())
    else:
        return None
    return math.sqrt(max(num, 0.0) / den) if den > 0 else None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _overrides_prepare(algorithm: Algorithm) -> bool:
    return type(algorithm).prepare_block is not Algorithm.prepare_block


MMAP_THRESHOLD = 4 << 20  # bytes; see keep_large_buffers_off_the_heap


def keep_large_buffers_off_the_heap() -> bool:
    """On glibc, serve allocations >= 4 MiB by mmap from now on, so freed block weights,
    Hessians and activations go back to the OS at once.

    glibc raises its mmap threshold after the first large free, after which those buffers come
    from the heap, interleave with the small packed weights kept per block, and the heap cannot
    shrink: measured on a 16-block, hidden-2048 model, RSS then grew ~100 MiB per block for
    ~15 MiB of live packed weights. With a fixed threshold it grows by the packed weights only.
    Process-wide and harmless elsewhere; returns whether it applied (False off glibc).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def quantize_sequential(
    model: nn.Module,
    specs: Mapping[str, QuantSpec],
    algorithm: Algorithm,
    batches: list[torch.Tensor] | None,
    *,
    reader: CheckpointReader | None = None,
    observer: str = "minmax",
    show_progress: bool = False,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> SequentialResult:
    """Quantize the modules named in ``specs`` (full names -> spec) block by block, in place.

    batches: calibration model inputs (``as_batches``); None runs no calibration (RTN, HQQ):
        the blocks are still streamed one by one when ``reader`` is given.
    reader: the model's blocks are on meta and are read from the checkpoint one at a time.
    observer: per-tensor range of the inputs of linears whose spec quantizes activations
        statically (observed on the quantized model's inputs, after ``prepare_block``).
    On ValueError the swapped modules of an in-memory model are put back (and blocks an
    algorithm transformed are restored), so the model is left as it was.
    """
    if algorithm.needs_calibration and batches is None:
        raise ValueError(f"algorithm {algorithm.name!r} needs calibration data; pass calib=...")
    algorithm.check_specs(specs)
    result = SequentialResult()
    found = find_blocks(model)
    block_name, blocks = found if found else ("", nn.ModuleList())
    inside = {n for n in specs if found and n.startswith(block_name + ".")}
    undo: list[tuple[str, nn.Module]] = []  # (name, original module) for in-memory rollback
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    group_cache: dict[tuple[str, ...], list[list[str]]] = {}  # blocks share their structure
    progress = _Progress(show_progress, len(blocks))
    if batches is not None:
        _check_tokens(model, specs, algorithm, batches)
        check_batches(model, batches)
    if reader is not None:
        keep_large_buffers_off_the_heap()
    # calibrate in eval mode (no dropout); each module's own mode is put back at the end
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        inputs = None
        if found and (batches is not None or reader is not None):
            if batches is not None:
                inputs = capture_first_block_inputs(model, blocks[0], batches)
            for i, block in enumerate(blocks):
                prefix = f"{block_name}.{i}."
                if reader is not None:
                    reader.load_into(block, prefix, _model_dtype(model))
                rel_specs = {n[len(prefix):]: s for n, s in specs.items() if n.startswith(prefix)}
                if reader is None and _overrides_prepare(algorithm) and inputs is not None:
                    snapshots[i] = {k: v.detach().clone() for k, v in block.state_dict().items()}
                inputs = _quantize_block(
                    block, i, prefix, rel_specs, algorithm, inputs, model, result, observer,
                    undo if reader is None else None, progress, on_layer, group_cache,
                )
                for module in block.modules():  # kernel layouts built by the block's forwards:
                    if isinstance(module, QuantLinear):  # rebuilt on use, not kept meanwhile
                        module._kernel_cache.clear()
                progress.block_done()
            result.blocks = len(blocks)
        elif not found:
            result.notes.append("no block stack found: statistics come from one pass of the "
                                "float model")
        outside = {n: s for n, s in specs.items() if n not in inside}
        if outside:
            _quantize_outside(model, outside, algorithm, batches, result, observer,
                              undo if reader is None else None, on_layer)
    except ValueError:
        for name, original in reversed(undo):
            _set_submodule(model, name, original)
        for i, state in snapshots.items():
            blocks[i].load_state_dict(state)
        raise
    finally:
        progress.close()
        for module, training in modes:
            module.training = training
    return result


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_tokens(model: nn.Module, specs: Mapping[str, QuantSpec], algorithm: Algorithm,
                  batches: list[torch.Tensor]) -> None:
    """A full-rank Hessian needs at least in_features calibration tokens."""
    if not algorithm.needs_hessian:
        return
    n_tokens = sum(b.numel() if not b.dtype.is_floating_point else b.numel() // b.shape[-1]
                   for b in batches)
    named = dict(model.named_modules())
    widest, where = 0, ""
    for name in specs:
        module = named.get(name)
        if module is None or not _is_linear(module):
            continue
        in_f = module.in_features if isinstance(module, nn.Linear) else module.nx
        if in_f > widest:
            widest, where = in_f, name
    if n_tokens < widest:
        raise ValueError(
            f"calib gives {n_tokens} tokens; {algorithm.name} needs at least {widest} (the "
            f"in_features of {where!r}) for a full-rank Hessian; pass more calibration text or "
            "raise calib_samples / calib_seq_len"
        )


def _quantize_block(
    block: nn.Module, index: int, prefix: str, rel_specs: dict[str, QuantSpec],
    algorithm: Algorithm, inputs: list[tuple[tuple, dict]] | None, model: nn.Module,
    result: SequentialResult, observer: str, undo: list | None, progress: _Progress,
    on_layer: Callable[[LayerResult], None] | None,
    group_cache: dict[tuple[str, ...], list[list[str]]],
) -> list[tuple[tuple, dict]] | None:
    linears = {n: m for n, m in block.named_modules() if n and _is_linear(m)}
    selected = {n: s for n, s in rel_specs.items() if n in linears}
    others = {n: s for n, s in rel_specs.items() if n not in linears}
    if others:
        raise ValueError(
            f"block {prefix[:-1]!r}: {sorted(others)[:3]} are not Linear/Conv1D; inside a block "
            "only linears are quantized by a calibration algorithm (exclude them)"
        )
    stats: dict[str, LayerStats] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    observers: dict[str, Any] = {}

    def run_block() -> list[torch.Tensor]:
        with torch.no_grad():
            return [_run(block, a, k) for a, k in (inputs or [])]

    def run_until(last: nn.Module) -> None:
        """Run the block on every batch, stopping each forward once ``last`` has its input."""
        def stop(module: nn.Module, args: tuple) -> None:
            raise _StopForward

        handle = last.register_forward_pre_hook(stop)  # registered after the collector's hook
        try:
            with torch.no_grad():
                for a, k in inputs or []:
                    try:
                        _run(block, a, k)
                    except _StopForward:
                        pass
        finally:
            handle.remove()

    def collect(final: bool, only: Sequence[str] | None = None) -> None:
        nonlocal stats, samples, observers
        watched = linears if only is None else {n: linears[n] for n in only}
        if only is None:
            observers = _observers(selected, observer) if final else {}
        else:
            observers.update(_observers({n: selected[n] for n in only}, observer))
        hess = set(selected) & set(watched) if algorithm.needs_hessian else set()
        sample = {n: INPUT_SAMPLE_TOKENS for n in watched} if algorithm.needs_inputs else {}
        if not algorithm.needs_hessian:
            for n in selected:
                sample.setdefault(n, ERROR_SAMPLE_TOKENS)
        collector = _Collector(watched, hess, sample, len(inputs or []),
                               {n: observers[n] for n in watched if n in observers})
        try:
            if only is None:
                outs = run_block()
            else:  # the rest of the block does not change these statistics
                run_until(linears[only[-1]])
                outs = []
        finally:
            collector.remove()
        for n, st in collector.stats.items():
            if st.abs_max is not None and not torch.isfinite(st.abs_max).all():
                raise ValueError(f"NaN/Inf in the input of layer {prefix + n!r}; stopped, "
                                 "nothing was written")
        _check_finite(outs, f"block {prefix[:-1]!r} (float, before quantization)")
        if only is None:
            stats, samples = collector.stats, collector.samples
        else:
            stats.update(collector.stats)
            samples.update(collector.samples)

    sequential = (inputs is not None and algorithm.sequential_in_block
                  and not _overrides_prepare(algorithm))
    if sequential:
        key = tuple(sorted(selected))
        if key not in group_cache:
            group_cache[key] = _input_groups(block, linears, selected, inputs[0])
        groups = group_cache[key]
    else:
        groups = [list(selected)]
        if inputs is not None:
            collect(final=not algorithm.restat_after_prepare)
    ctx = BlockContext(
        block=block, arch=getattr(getattr(model, "config", None), "model_type", "") or "",
        stats=stats, spec_for=lambda n: selected.get(n), run_block=run_block,
        inputs=samples if algorithm.needs_inputs else {},
    )
    for note in algorithm.prepare_block(ctx) if inputs is not None else []:
        result.notes.append(f"block {index}: {note}")
    if inputs is not None and algorithm.restat_after_prepare:
        collect(final=True)
    def quantize_group(group: list[str],
                       place: Callable[[str, nn.Module], None] | None = None) -> None:
        done = _quantize_together(group, linears, selected, algorithm, stats)
        for rel in group:
            name, module = prefix + rel, linears[rel]
            new, layer = _quantize_linear(name, module, selected[rel], algorithm,
                                          stats.get(rel), samples.get(rel), observers.get(rel),
                                          done.get(rel))
            if place is None:
                _set_submodule(block, rel, new)
            else:
                place(rel, new)
            if undo is not None:
                undo.append((name, module))
            result.layers.append(layer)
            progress.layer(layer)
            if on_layer is not None:
                on_layer(layer)

    if sequential and _staged_fits(inputs):
        # one forward per batch, paused before each group until it is quantized
        watched = {n: linears[n] for n in selected}
        observers = _observers(selected, observer)
        collector = _Collector(
            watched, set(selected) if algorithm.needs_hessian else set(),
            {n: INPUT_SAMPLE_TOKENS for n in selected} if algorithm.needs_inputs else {},
            len(inputs), observers, attach=False)

        def quantize_staged(group: list[str], place: Callable[[str, nn.Module], None]) -> None:
            for n in group:
                st = collector.stats[n]
                if st.abs_max is not None and not torch.isfinite(st.abs_max).all():
                    raise ValueError(f"NaN/Inf in the input of layer {prefix + n!r}; stopped, "
                                     "nothing was written")
                stats[n] = st
                if n in collector.samples:
                    samples[n] = collector.samples[n]
            quantize_group(group, place)

        outs = _staged_forward(block, watched, groups, inputs, collector.hooks, quantize_staged)
        _check_finite(outs, f"block {prefix[:-1]!r} after quantization")
        return [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outs, strict=True)]
    for group in groups:
        if sequential:  # inputs flow through the linears quantized so far
            collect(final=True, only=group)
        quantize_group(group)
    if inputs is None:
        return None
    outs = run_block()
    _check_finite(outs, f"block {prefix[:-1]!r} after quantization")
    return [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outs, strict=True)]


class _StopForward(Exception):
    """Raised by a hook to end a block forward once the statistics it needs are in."""


STAGED_MAX_INPUT_BYTES = 256 << 20
"""The staged forward keeps every batch's forward paused inside the block at once (each holds
its activations, for Llama about ``(1 + intermediate/hidden)`` x its input); above this many
bytes of block inputs the block is re-run once per group instead (same statistics, slower)."""


STAGED_MAX_BATCHES = 64
"""Each paused batch forward holds a thread (and its stack's address space, which counts under
an address-space cap such as ``ulimit -v``); more batches than this re-run the block per group."""


def _staged_fits(inputs: list[tuple[tuple, dict]]) -> bool:
    if len(inputs) > STAGED_MAX_BATCHES:
        return False
    total = 0
    for args, kwargs in inputs:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            return False
        total += hidden.numel() * hidden.element_size()
    return total <= STAGED_MAX_INPUT_BYTES


class _Abort(BaseException):
    """Ends a paused batch forward when the staged run stops on an error."""


class _Fiber:
    """A batch forward run in its own thread, used as a coroutine: only one fiber or the
    caller runs at any time (``resume`` blocks until the fiber pauses or ends)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        import threading

        self._fn = fn
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = False
        self.aborted = False
        self.waiting_on: int | None = None  # the group index it is paused before

    def _main(self) -> None:
        self._go.acquire()
        try:
            if self.aborted:
                raise _Abort
            with torch.no_grad():  # grad mode is per thread
                self.result = self._fn()
        except _Abort:
            pass
        except BaseException as e:  # handed to the caller
            self.error = e
        finally:
            self.done = True
            self.waiting_on = None
            self._back.release()

    def resume(self) -> None:
        """Run the fiber (started with ``thread.start()``) until it pauses or ends."""
        self._go.release()
        self._back.acquire()

    def pause(self, group: int) -> None:
        """Called inside the fiber: hand control back until the group is quantized."""
        self.waiting_on = group
        self._back.release()
        self._go.acquire()
        self.waiting_on = None
        if self.aborted:
            raise _Abort


class _StandIn(nn.Module):
    """Takes a selected linear's place during the staged forward: the first call of the
    forward into its group pauses the batch until the group is quantized (recording the
    statistics of the input first); from then on it runs the quantized module, as the
    re-run path does (activation quantization included)."""

    def __init__(self, original: nn.Module, group: int, run: _StagedRun) -> None:
        super().__init__()
        self.original = original
        self.group = group
        self._run = run
        self.quantized: nn.Module | None = None

    def use(self, new: nn.Module) -> None:
        self.quantized = new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group not in self._run.done_groups:
            self._run.arrive(self.group, x)
        if self.quantized is None:  # not selected for this pass (never quantized)
            return self.original(x)
        return self.quantized(x)


class _StagedRun:
    """Group bookkeeping of one staged forward (see ``_staged_forward``)."""

    def __init__(self, groups: list[list[str]], hooks: Mapping[str, Callable],
                 modules: Mapping[str, nn.Module]) -> None:
        import threading

        self.groups, self.hooks, self.modules = groups, hooks, modules
        self.done_groups: set[int] = set()
        self.fibers: dict[int, _Fiber] = {}  # thread id -> fiber
        self._ident = threading.get_ident

    def arrive(self, group: int, x: torch.Tensor) -> None:
        for name in self.groups[group]:  # they share this input (one statistics update)
            self.hooks[name](self.modules[name], (x,))
        self.fibers[self._ident()].pause(group)


def _staged_forward(block: nn.Module, modules: Mapping[str, nn.Module],
                    groups: list[list[str]], inputs: list[tuple[tuple, dict]],
                    hooks: Mapping[str, Callable],
                    quantize: Callable[[list[str], Callable[[str, nn.Module], None]], None],
                    ) -> list[torch.Tensor]:
    """Run ``block`` once per batch with every batch paused before each group of linears until
    all batches have given that group's statistics (``hooks``) and ``quantize(group, place)``
    has quantized it; later groups thus see inputs through the quantized earlier ones, as
    re-running the block per group would, at the cost of one forward. ``modules``: the
    selected linears (relative names); returns the quantized block's outputs per batch. The
    quantized modules replace the linears in ``block``; on an error the originals are put back.

    A group that a batch reaches only after a later group (data-dependent order) is quantized
    without that batch's input of it; a group no batch reaches is quantized last."""
    run = _StagedRun(groups, hooks, modules)
    group_of = {n: g for g, members in enumerate(groups) for n in members}
    standins = {n: _StandIn(m, group_of[n], run) for n, m in modules.items()}
    for n, s in standins.items():
        _set_submodule(block, n, s)

    def place(name: str, new: nn.Module) -> None:
        standins[name].use(new)

    fibers = [_Fiber(lambda a=a, k=k: _run(block, a, k)) for a, k in inputs]
    ok = False
    try:
        for f in fibers:
            f.thread.start()
            run.fibers[f.thread.ident] = f
            f.resume()
        while True:
            _raise_fiber_error(fibers)
            waiting = [f.waiting_on for f in fibers if not f.done and f.waiting_on is not None]
            if not waiting:
                break
            g = min(waiting)
            quantize(groups[g], place)
            run.done_groups.add(g)
            for f in fibers:
                if not f.done and f.waiting_on == g:
                    f.resume()
        for g, members in enumerate(groups):  # reached by no batch
            if g not in run.done_groups:
                quantize(members, place)
                run.done_groups.add(g)
        ok = True
    finally:
        for f in fibers:  # end paused forwards (only after an error)
            if not f.done and f.thread.is_alive():
                f.aborted = True
                f.resume()
        for n, s in standins.items():
            _set_submodule(block, n, s.quantized if ok and s.quantized is not None
                           else s.original)
    _raise_fiber_error(fibers)
    return [f.result for f in fibers]


def _raise_fiber_error(fibers: list[_Fiber]) -> None:
    for f in fibers:
        if f.error is not None:
            raise f.error


def _input_groups(block: nn.Module, linears: Mapping[str, nn.Module],
                  selected: Mapping[str, QuantSpec], first: tuple[tuple, dict]) -> list[list[str]]:
    """The selected linears grouped by the input tensor they share, in the order the block
    calls them (Llama: [q, k, v], [o], [gate, up], [down]); one forward on ``first``."""
    order: list[tuple[str, torch.Tensor]] = []  # the inputs themselves: ids can be reused

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            order.append((name, args[0]))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            _run(block, *first)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, given in order:
        if name in seen or name not in selected:
            continue
        seen.add(name)
        if groups and given is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = given
    missing = [n for n in selected if n not in seen]  # never called on this input
    return groups + ([missing] if missing else [])


def _observers(selected: Mapping[str, QuantSpec], observer: str) -> dict[str, Any]:
    from lowbit.observers import get_observer

    return {n: get_observer(observer) for n, s in selected.items()
            if s.act is not None and not s.act.dynamic}


def _check_finite(outs: list[torch.Tensor], where: str) -> None:
    for o in outs:
        if not torch.isfinite(o).all():
            raise ValueError(f"NaN/Inf in the outputs of {where}; stopped, nothing was written")


def _quantize_together(group: list[str], linears: Mapping[str, nn.Module],
                       selected: Mapping[str, QuantSpec], algorithm: Algorithm,
                       stats: Mapping[str, LayerStats]) -> dict[str, Any]:
    """``{name: QuantizedTensor}`` for the linears of ``group`` that share one statistics
    object and one spec with another, from one ``algorithm.quantize_weights`` call per such
    set (GPTQ: one column loop for q/k/v); the rest, and sets where it fails, are left out
    (they go one by one, whose errors name the layer)."""
    together = getattr(algorithm, "quantize_weights", None)
    if together is None:
        return {}
    sets: dict[tuple[int, QuantSpec], list[str]] = {}
    for n in group:
        if stats.get(n) is not None:
            sets.setdefault((id(stats[n]), selected[n]), []).append(n)
    done: dict[str, Any] = {}
    for (_, spec), names in sets.items():
        if len(names) < 2:
            continue
        weights = [linear_weight(linears[n])[0].detach() for n in names]
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            continue
        try:
            done.update(zip(names, together(weights, spec, stats[names[0]]), strict=True))
        except (ValueError, TypeError):
            continue
    return done


def _quantize_linear(
    name: str, module: nn.Module, spec: QuantSpec, algorithm: Algorithm,
    stats: LayerStats | None, sample: list[torch.Tensor] | None, observer: Any,
    qt: Any = None,
) -> tuple[QuantLinear, LayerResult]:
    """``qt``: the weight already quantized (``_quantize_together``), else quantized here."""
    from lowbit.calib.observe import set_input_qparams

    weight, _ = linear_weight(module)
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r}: weight has NaN/Inf values")
    try:
        if qt is None:
            qt = algorithm.quantize_weight(weight.detach(), spec, stats)
    except (ValueError, TypeError) as e:
        raise ValueError(f"layer {name!r} ({_kind(module)}): {e}") from None
    deq = qt.dequantize(torch.float32)
    if not torch.isfinite(deq).all():
        raise ValueError(f"layer {name!r}: {algorithm.name} produced NaN/Inf weights")
    new = QuantLinear.from_float(module, spec, qweight=qt)
    if observer is not None:
        set_input_qparams(new, observer.qparams(spec.act))
    error = relative_error(weight.detach(), deq, stats, sample)
    tokens = stats.tokens if stats is not None else 0
    return new, LayerResult(name, _kind(module), spec, error, tokens)


def _quantize_outside(
    model: nn.Module, specs: Mapping[str, QuantSpec], algorithm: Algorithm,
    batches: list[torch.Tensor] | None, result: SequentialResult, observer: str,
    undo: list | None, on_layer: Callable[[LayerResult], None] | None,
) -> None:
    """Modules outside the block stack: linears with stats from one pass of the model as
    quantized so far; Embedding / Conv2d by round to nearest."""
    named = dict(model.named_modules())
    linears = {n: named[n] for n in specs if _is_linear(named[n])}
    stats: dict[str, LayerStats] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    observers = _observers({n: specs[n] for n in linears}, observer)
    if batches is not None and linears:
        hess = set(linears) if algorithm.needs_hessian else set()
        sample = {} if algorithm.needs_hessian else {n: ERROR_SAMPLE_TOKENS for n in linears}
        collector = _Collector(linears, hess, sample, len(batches), observers)
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        try:
            if use_cache is not None:
                config.use_cache = False
            with torch.no_grad():
                for batch in batches:
                    model(batch)
        finally:
            collector.remove()
            if use_cache is not None:
                config.use_cache = use_cache
        stats, samples = collector.stats, collector.samples
        result.notes.append(
            f"{', '.join(linears)}: {algorithm.name} with statistics of the quantized model's "
            "inputs (outside the block stack)"
        )
    for name, spec in specs.items():
        module = named[name]
        if name in linears:
            alg = algorithm
            if name not in stats and algorithm.needs_calibration:
                alg = _rtn()
            new, layer = _quantize_linear(name, module, spec, alg, stats.get(name),
                                          samples.get(name), observers.get(name))
        else:
            if spec.act is not None:
                raise ValueError(f"layer {name!r} ({_kind(module)}) supports weight-only specs; "
                                 f"{spec} quantizes activations")
            new = (QuantEmbedding if isinstance(module, nn.Embedding) else QuantConv2d)(
                module, spec)
            layer = LayerResult(name, _kind(module), spec, None, 0, "round to nearest")
        _set_submodule(model, name, new)
        if undo is not None:
            undo.append((name, module))
        result.layers.append(layer)
        if on_layer is not None:
            on_layer(layer)


def _rtn() -> Algorithm:
    from lowbit.algorithms.base import RTN

    return RTN()
