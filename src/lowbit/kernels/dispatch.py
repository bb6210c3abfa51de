"""Kernel dispatch for quantized linear layers, keyed by (spec kind, device type, activation).

Every kernel computes ``y = x @ W^T + b`` for a QuantizedTensor W ``[out, in]``. The reference
kernel (dequantize + ``F.linear``) is always registered and is the oracle the others are tested
against. ``LOWBIT_KERNEL=<name>`` (or ``kernel=`` on the call) forces a kernel by name.
Kernels may cache an execution layout on the ``cache`` dict they are handed (never saved).
Double-quantized weights (k-quants) run as their plain spec with the decoded float32 scales
(:meth:`QuantizedTensor.with_float_scales`), so every kernel of that spec serves them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.tensor import QuantizedTensor

KernelFn = Callable[[torch.Tensor, QuantizedTensor, "torch.Tensor | None", dict], torch.Tensor]
BoundLinear = Callable[[torch.Tensor], torch.Tensor]
BindFn = Callable[[QuantizedTensor, "torch.Tensor | None", dict], BoundLinear]


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: KernelFn
    supports: Callable[[QuantizedTensor, torch.Tensor], bool]
    priority: int = 0  # higher wins among kernels that support a call
    oracle: bool = False  # a reference kernel: what kernel="reference" selects for its specs
    # Optional: resolve everything that does not depend on x once, giving ``x -> y``; equal
    # to ``fn`` (the per-call Python work of a small layer is comparable to its matmul).
    bind: BindFn | None = None

    def bound(self, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict) -> BoundLinear:
        """``x -> x @ W^T + b`` for this weight and bias."""
        qt = qt.with_float_scales()
        if self.bind is not None:
            return self.bind(qt, bias, cache)
        fn = self.fn
        return lambda x: fn(x, qt, bias, cache)


KERNELS: dict[str, Kernel] = {}


_registry_version = 0  # bumped on registration: memoized selections made before are stale


def registry_version() -> int:
    """Bumped by every :func:`register_kernel`: selections memoized before it are stale."""
    return _registry_version


def register_kernel(kernel: Kernel) -> Kernel:
    """Register ``kernel`` (by name). Its ``supports`` refuses a double-quantized weight itself:
    kernels read float scales, and selection hands them the float view
    (:meth:`QuantizedTensor.with_float_scales`)."""
    global _registry_version
    check = kernel.supports
    kernel = dataclasses.replace(kernel, supports=lambda qt, x: (
        not qt.spec.double_quantized and check(qt, x)))
    KERNELS[kernel.name] = kernel
    _registry_version += 1
    return kernel


def weight_version(qt: QuantizedTensor) -> tuple:
    """Identity and in-place version of each stored tensor of ``qt``: kernels key their cached
    execution layouts on it, so a replaced or modified scale, zero-point or code tensor
    rebuilds them. A cache entry keeping this key must also keep ``qt`` (ids stay unique while
    the tensors live)."""
    return tuple((id(t), 0 if t.is_inference() else t._version)  # inference: no counter
                 for t in qt.stored_tensors().values())


def _act_mode(qt: QuantizedTensor) -> str:
    act = qt.spec.act
    if act is None:
        return "none"
    return "dynamic" if act.dynamic else "static"


def reference_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """Dequantize the weight and run ``F.linear`` in the activation dtype (weight-only)."""
    return F.linear(x, qt.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


register_kernel(
    Kernel("reference", reference_linear, lambda qt, x: _act_mode(qt) == "none", oracle=True)
)


def select_kernel(qt: QuantizedTensor, x: torch.Tensor, kernel: str | None = None) -> Kernel:
    """The kernel for this call: the forced one, else the highest-priority one that supports it
    (for a double-quantized weight: that supports its plain spec with float scales)."""
    qt = qt.with_float_scales()
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != qt.shape[-1]:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(qt.shape)}: x [..., "
                         f"{qt.shape[-1]}] expected")
    forced = kernel or forced_by_environment() or None
    if forced == "reference":  # the oracle that covers this spec (weight-only or integer W*A*)
        oracles = [k for k in KERNELS.values() if k.oracle and k.supports(qt, x)]
        if not oracles:
            raise ValueError(f"no reference kernel supports spec {qt.spec} on {x.device.type}")
        return oracles[0]
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"kernel={forced!r} is not registered; allowed: {', '.join(KERNELS)}")
        chosen = KERNELS[forced]
        if not chosen.supports(qt, x):
            raise ValueError(
                f"kernel {forced!r} does not support spec {qt.spec} on {x.device.type} "
                f"with {x.dtype} activations"
            )
        return chosen
    candidates = [k for k in KERNELS.values() if k.supports(qt, x)]
    if not candidates:
        raise ValueError(
            f"no kernel supports spec {qt.spec} on {x.device.type} with {x.dtype} activations"
        )
    return max(candidates, key=lambda k: k.priority)


def linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``x @ W^T + b`` with the selected kernel.

    ``cache`` is the caller's per-weight dict (a module's): kernels keep execution layouts in it,
    and the selected kernel, bound to this weight and bias, is memoized there per kind of input
    (device, dtype, width, autograd, forced kernel): a decode step pays the ~20 us of trying
    every kernel once, not per call. Clear it when the weight changes.
    """
    if cache is None:
        qt = qt.with_float_scales()
        return select_kernel(qt, x, kernel).fn(x, qt, bias, {})
    return bound_linear(x, qt, bias, kernel=kernel, cache=cache)(x)


def _environ_reader(name: str) -> Callable[[], str | None]:
    """``() -> os.environ.get(name)`` in ~0.1 us instead of ~1.3 (it runs on every quantized
    Linear call): CPython's os.environ keeps its encoded entries in ``_data``; the plain lookup
    elsewhere, or once ``os.environ`` was replaced by another mapping."""
    environ = os.environ
    data, encode = getattr(environ, "_data", None), getattr(environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read() -> str | None:
        if os.environ is not environ:
            return os.environ.get(name)
        value = data.get(key)
        return None if value is None else environ.decodevalue(value)

    return read


forced_by_environment = _environ_reader("LOWBIT_KERNEL")


def bound_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    *,
    kernel: str | None = None,
    cache: dict,
) -> BoundLinear:
    """The memoized ``x -> x @ W^T + b`` for inputs like ``x`` (see :func:`linear`)."""
    forced = kernel or forced_by_environment() or None
    key = ("bound", x.device, x.dtype, x.shape[-1] if x.dim() else 0,
           x.requires_grad and torch.is_grad_enabled(), forced, _registry_version)
    entry = cache.get(key)
    bias_at = None if bias is None else bias.data_ptr()  # (a .data swap moves a Parameter)
    if entry is None or entry[1] is not qt or entry[2] is not bias or entry[3] != bias_at:
        if key[4] and qt.spec.act is not None:
            # integer activation codes carry no gradient: the kernel of a no-grad input
            # computes, _StraightThrough gives x its gradient
            run = select_kernel(qt, x.detach(), forced).bound(qt, bias, cache)
            bound = lambda x, _run=run, _qt=qt: _StraightThrough.apply(x, _run, _qt)  # noqa: E731
        else:
            bound = select_kernel(qt, x, forced).bound(qt, bias, cache)
        entry = cache[key] = (bound, qt, bias, bias_at)  # one slot per input kind
    return entry[0]


class _StraightThrough(torch.autograd.Function):
    """A W*A* layer with gradients: forward by its integer kernel; backward the straight-through
    estimator of activation quantization (``dy/dx = W``, the dequantized weight), as QAT does.
    The quantized weight and the bias are buffers: no gradient for them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, run: BoundLinear, qt: QuantizedTensor) -> torch.Tensor:
        ctx.qt = qt
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.qt.dequantize(grad.dtype), None, None


def kernel_plan(model: torch.nn.Module, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, list[tuple[str, str]]]:
    """Which kernel each quantized Linear of ``model`` would run for ``dtype`` inputs on
    ``device``: ``{kernel name: [(module name, spec), ...]}`` (forced kernels respected)."""
    from lowbit.nn.modules import QuantLinear

    plan: dict[str, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            probe = torch.zeros(1, module.in_features, dtype=dtype, device=device)
            try:
                chosen = select_kernel(module.qweight, probe, module.kernel).name
            except ValueError:
                chosen = "none"
            plan.setdefault(chosen, []).append((name, str(module.spec)))
    return plan
