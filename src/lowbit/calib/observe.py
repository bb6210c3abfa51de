"""Run the model over calibration batches and observe the inputs of chosen modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.calib.batches import as_batches, check_batches
from lowbit.observers import Observer, get_observer
from lowbit.quant import QParams
from lowbit.spec import QuantSpec


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def observe_inputs(
    model: nn.Module,
    module_names: Iterable[str],
    batches: Iterable[torch.Tensor],
    observer_name: str = "minmax",
    *,
    observer_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Observer]:
    """Run ``model(batch)`` for each batch under ``torch.no_grad`` in eval mode, feeding the first
    positional input of every named module to its own observer. Hooks are always removed and the
    model's train/eval mode is restored."""
    names = list(dict.fromkeys(module_names))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"module_names {missing[:3]} are not modules of the model")
    observers = {n: get_observer(observer_name, **dict(observer_kwargs or {})) for n in names}
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one calibration batch")

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"module {name!r} got no tensor positional input to observe")
            try:
                observers[name].update(args[0])
            except ValueError as e:
                raise ValueError(f"input of module {name!r}: {e}") from None

        return hook

    device = _model_device(model)
    was_training = model.training
    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            for batch in _progress(batches, progress):
                model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return observers


def _progress(batches: list[torch.Tensor], enabled: bool):
    if not enabled:
        yield from batches
        return
    from rich.progress import track

    yield from track(batches, description="calibrating", total=len(batches))


@dataclass
class StaticCalibration:
    """Per-module activation qparams of a static calibration, and what produced them."""

    qparams: dict[str, QParams]
    observer: str
    n_sequences: int
    n_tokens: int

    def describe(self) -> str:
        return (
            f"static activations of {len(self.qparams)} modules calibrated with observer "
            f"{self.observer!r} on {self.n_sequences} sequences ({self.n_tokens:,} tokens)"
        )


def calibrate_static(
    model: nn.Module,
    act_specs: Mapping[str, QuantSpec],
    calib: Any,
    *,
    tokenizer: Any = None,
    observer: str = "minmax",
    n_samples: int = 128,
    seq_len: int = 512,
    progress: bool = False,
    batch_size: int = 8,
) -> StaticCalibration:
    """Observe the float model's inputs to the modules named in ``act_specs`` and turn each
    observer into per-tensor qparams for that module's activation spec."""
    for name, spec in act_specs.items():
        if spec.granularity != "tensor" or spec.kind == "kmeans":
            raise ValueError(
                f"layer {name!r}: static activation spec {spec} needs granularity='tensor' and "
                "a range-based format (one calibrated scale per layer input)"
            )
    get_observer(observer)  # fail on a bad name before running the model
    batches = as_batches(calib, tokenizer, n_samples, seq_len, batch_size=batch_size)
    check_batches(model, batches)
    observers = observe_inputs(model, list(act_specs), batches, observer, progress=progress)
    qparams = {name: observers[name].qparams(spec) for name, spec in act_specs.items()}
    n_seq = sum(int(b.shape[0]) for b in batches)
    # token ids count every position; float inputs [N, ..., features] count rows of features
    n_tok = sum(b.numel() if not b.dtype.is_floating_point else b.numel() // b.shape[-1]
                for b in batches)
    return StaticCalibration(qparams, observer, n_seq, n_tok)


def set_input_qparams(module: nn.Module, qparams: QParams) -> None:
    """Copy calibrated per-tensor qparams into a static QuantLinear's ``input_scale`` (and
    ``input_zero_point``) buffers, float32 ``[1]``."""
    if not hasattr(module, "input_scale"):
        raise ValueError(f"{type(module).__name__} has no input_scale buffer (not a static spec)")
    module.input_scale.copy_(qparams.scale.reshape(1).float())
    if hasattr(module, "input_zero_point") and module.input_zero_point is not None:
        if qparams.zero_point is None:
            raise ValueError("module has input_zero_point but the qparams carry no zero-point")
        module.input_zero_point.copy_(qparams.zero_point.reshape(1).float())
