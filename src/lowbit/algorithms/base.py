"""Algorithm objects: hyper-parameters on the object, a pure core ``(W, spec, stats) -> QT``.

An algorithm never runs the model (calib/ does) and never switches on format types: it talks to
the spec through the maps (``choose_qparams``, ``quantize``, ``fake_quantize``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor


def check_number(name: str, value: object, low: float, high: float, *,
                 integer: bool = False, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a number (an int where ``integer``; never a bool)
    in the interval ``low .. high`` (open at an end where said): hyper-parameters are checked
    when an algorithm object is made, not deep inside a run."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        ok = (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
    if not ok:
        what = "an int" if integer else "a number"
        if high == float("inf"):
            bounds = f"{'>' if low_open else '>='} {low:g}"
        else:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r}; allowed: {what} {bounds}")


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input ``x [tokens, in]``.

    hessian: ``sum_t x_t x_t^T`` (float32 ``[in, in]``, GPTQ's H up to the 2/n factor);
    abs_mean: mean |x| per input channel (AWQ); abs_max: max |x| per channel (SmoothQuant);
    tokens: how many rows were accumulated.
    """

    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    tokens: int = 0
    extras: dict = field(default_factory=dict)

    def update(self, x: torch.Tensor, hessian: bool = True) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:  # (an MoE expert no token of a batch was routed to)
            return
        if hessian:
            xtx = x.t() @ x
            self.hessian = xtx if self.hessian is None else self.hessian.add_(xtx)
        a = x.abs()
        s, m = a.sum(0), a.amax(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        self.tokens += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None or self.tokens == 0:
            raise ValueError("no calibration tokens were observed for this layer")
        return self.abs_sum / self.tokens


@dataclass
class BlockContext:
    """What the layer-by-layer runner (calib/sequential.py) hands an algorithm for one block.

    block: the float decoder/encoder block (an nn.Module), about to be quantized.
    arch: the model's ``config.model_type`` (e.g. "llama", "gpt2", "bert"), for mapping tables.
    stats: LayerStats of each linear's input, keyed by its name relative to the block.
    spec_for: the QuantSpec chosen for a linear (relative name), None if it is left in float.
    run_block: runs the block on the captured calibration inputs and returns its outputs
        (a list of tensors, one per calibration batch), with whatever weights it has now.
    inputs: the captured inputs of the block's linears' shared sources when an algorithm
        needs raw activations: name -> list of ``[tokens, in]`` tensors (subsampled).
    """

    block: torch.nn.Module
    arch: str
    stats: dict[str, LayerStats]
    spec_for: Callable[[str], QuantSpec | None]
    run_block: Callable[[], list[torch.Tensor]]
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class Algorithm:
    """Base: ``quantize_weight(W [out, in], spec, stats) -> QuantizedTensor``.

    Algorithms that transform a block before its weights are quantized (AWQ, SmoothQuant fold
    scales into the preceding norm/linear) override ``prepare_block``; the runner then collects
    the statistics again if ``restat_after_prepare``.
    """

    name = "base"
    needs_calibration = False
    needs_hessian = False
    needs_inputs = False
    restat_after_prepare = False
    # statistics of a block's later linears come from its earlier linears already quantized
    # (q/k/v, then o, then gate/up, then down), as the block runs at inference
    sequential_in_block = False

    def check_specs(self, specs: Mapping[str, QuantSpec]) -> None:
        """Raise ValueError, before any calibration, for a selection (module name -> spec) this
        algorithm cannot serve."""

    def prepare_block(self, ctx: BlockContext) -> list[str]:
        """Transform ``ctx.block`` in place, float outputs unchanged; return summary notes."""
        return []

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        raise NotImplementedError


@dataclass
class RTN(Algorithm):
    """Round to nearest with min-max / absmax qparams: the baseline every algorithm must beat."""

    name = "rtn"

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None
    ) -> QuantizedTensor:
        return QuantizedTensor.from_float(weight, spec)
