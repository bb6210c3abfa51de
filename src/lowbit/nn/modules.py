"""Quantized modules: Linear (also GPT-2 Conv1D, transposed), Conv2d and Embedding.

Each holds its weight as the buffers of a QuantizedTensor, named as on disk
(``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_codebook``, ``weight_g_idx``,
``weight_shape``), so ``state_dict()``/``load_state_dict()``, ``.to()`` and meta-device
construction work as for any module, with one difference: a dtype cast (``.to(torch.bfloat16)``,
``.half()``) sets the layer's compute dtype (``weight_dtype``, the bias's dtype) and leaves the
quantized tensors in the dtypes their spec fixes, so the weights stay exactly as quantized.
The bias stays in float. ``module.weight`` reads as a ``DequantizedWeight``: the float weight's
shape, dtype and device with no float copy held, dequantized by any operation on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from lowbit.kernels import cpu_avx2, dispatch
from lowbit.spec import QuantSpec, as_spec
from lowbit.tensor import STATE_NAMES, QuantizedTensor, stored_shapes

_PREFIX = "weight_"
_address = torch.Tensor.data_ptr


class DequantizedWeight(torch.Tensor):
    """``module.weight`` of a quantized module: a tensor of the float weight's shape (``[out, in]``
    for every Linear, GPT-2 Conv1D included), dtype (the layer's compute dtype) and device that
    holds no float copy. Reading ``.shape`` / ``.dtype`` / ``.device`` is free; any operation on
    it (``x @ w.T``, ``w.float()``, ``w[ids]``) dequantizes the whole weight first and returns
    plain tensors (``.numpy()``, ``.tolist()`` and ``copy.deepcopy`` too). Operations that
    write to it raise: the codes are what the module computes with. For model code that reads
    its layers' weights (T5's and ViT's dtype checks, a head computed from ``embed.weight``);
    the quantized module itself never goes through it."""

    quantized: QuantizedTensor

    @staticmethod
    def __new__(cls, quantized: QuantizedTensor) -> DequantizedWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, quantized.shape, dtype=quantized.dtype, device=quantized.qdata.device,
            requires_grad=False)

    def __init__(self, quantized: QuantizedTensor) -> None:
        self.quantized = quantized

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):  # writes would go to a temporary
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(
                    args[i] if i < len(args) else kwargs.get(arg.name), DequantizedWeight):
                raise RuntimeError(
                    f"{func.__name__} writes to the weight of a quantized module, which is "
                    "read-only (a dequantized view of its codes); quantize a new weight and "
                    "set it with set_weight(QuantizedTensor)")

        def dense(t):
            return t.quantized.dequantize() if isinstance(t, DequantizedWeight) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))

    def __setitem__(self, index, value) -> None:  # (indexing gives a temporary float copy)
        raise RuntimeError("item assignment to the weight of a quantized module, which is "
                           "read-only (a dequantized view of its codes); quantize a new weight "
                           "and set it with set_weight(QuantizedTensor)")

    @property
    def data(self) -> DequantizedWeight:  # so .data[i] = x / .data.zero_() raise as well
        return self

    def numpy(self, *, force: bool = False):
        return self.quantized.dequantize().numpy(force=force)

    def tolist(self) -> list:
        return self.quantized.dequantize().tolist()

    def data_ptr(self) -> int:  # the codes' address: equal for one module under two names
        return self.quantized.qdata.data_ptr()

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.quantized.dequantize()  # a float copy (a plain tensor)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"DequantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, spec={self.quantized.spec})")


class _QuantWeightMixin(nn.Module):
    """Buffers of one quantized weight and their QuantizedTensor view."""

    spec: QuantSpec
    weight_dtype: torch.dtype

    def _init_weight(
        self, shape: tuple[int, ...], spec: QuantSpec, dtype: torch.dtype, device=None
    ) -> None:
        self.spec = spec
        self.weight_dtype = dtype
        self.kernel: str | None = None  # force a kernel by name (None: dispatch decides)
        self._kernel_cache: dict = {}
        self._view: tuple | None = None  # see _weight_view
        for name, (dims, dt) in stored_shapes(spec, shape).items():
            self.register_buffer(_PREFIX + STATE_NAMES[name], torch.empty(dims, dtype=dt,
                                                                          device=device))
        self.register_buffer(_PREFIX + "shape", torch.tensor(shape, dtype=torch.int64))

    def set_weight(self, qt: QuantizedTensor) -> None:
        """Adopt the stored tensors of ``qt`` (shape and spec must match the module's)."""
        if qt.spec != self.spec or tuple(qt.shape) != self.weight_logical_shape:
            raise ValueError(
                f"weight {qt.spec} {qt.shape} does not match module {self.spec} "
                f"{self.weight_logical_shape}"
            )
        stored = {_PREFIX + STATE_NAMES[field]: t for field, t in qt.stored_tensors().items()}
        for field in STATE_NAMES.values():  # an optional tensor (g_idx) of the old weight only
            name = _PREFIX + field
            if name in self._buffers and name not in stored:
                del self._buffers[name]
        for name, t in stored.items():
            if name in self._buffers:
                setattr(self, name, t)
            else:  # optional tensors (g_idx) become buffers only when present
                self.register_buffer(name, t)
        self._kernel_cache.clear()
        self._view = None

    @property
    def weight_logical_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.weight_shape.tolist())

    @property
    def qweight(self) -> QuantizedTensor:
        """A new QuantizedTensor over the module's buffers (shared, not copied)."""
        fields = {
            field: getattr(self, _PREFIX + name, None) for field, name in STATE_NAMES.items()
        }
        return QuantizedTensor(
            spec=self.spec, shape=self.weight_logical_shape, dtype=self.weight_dtype, **fields
        )

    def _weight_view(self) -> QuantizedTensor:
        """``qweight`` for forward: built once (~20 us) and reused while the module holds the
        same buffer objects, at the same addresses, and dtype (``.to()``, ``set_weight`` and
        ``load_state_dict`` give new objects or clear it; a ``.data`` swap moves one; in-place
        changes are seen through the shared tensors, except a double-quantized weight's scale
        codes once a kernel is bound: kernels run its decoded float view). The check is ~1 us:
        C-level maps over the buffers, whose objects the view keeps alive (so equal ids are the
        same objects)."""
        ids = tuple(map(id, self._buffers.values()))
        view = self._view
        if (view is None or view[0] != ids or view[3] is not self.weight_dtype
                or view[2] != tuple(map(_address, view[4]))):
            self._kernel_cache.clear()  # built from buffers the module no longer holds
            qt = self.qweight
            if hasattr(self, "input_scale"):
                qt.act_scale = self.input_scale
                qt.act_zero_point = getattr(self, "input_zero_point", None)
            tensors = tuple(b for b in self._buffers.values() if b is not None)
            # (ids, view, addresses, dtype, the buffers: alive while their ids are compared)
            self._view = view = (ids, qt, tuple(map(_address, tensors)), self.weight_dtype,
                                 tensors)
        return view[1]

    def __getstate__(self) -> dict:
        # the kernel cache holds bound closures (not picklable) built from this process's
        # pointers: a pickled module (torch.save(model), deepcopy) rebuilds them on first use
        state = super().__getstate__()
        return {**state, "_kernel_cache": {}, "_view": None}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._kernel_cache.clear()
        self._view = None
        g_idx = _PREFIX + "g_idx"
        if prefix + _PREFIX + "packed" in state_dict:  # a weight arrives: g_idx comes with it
            given = state_dict.get(prefix + g_idx)
            if given is None:
                self._buffers.pop(g_idx, None)
            elif g_idx not in self._buffers:  # on the module's device, as its other buffers
                device = self._buffers[_PREFIX + "packed"].device
                self.register_buffer(g_idx, torch.empty(given.shape, dtype=torch.int32,
                                                        device=device))
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() give new buffers: drop what was built from the old ones
        self._kernel_cache.clear()
        self._view = None
        # The quantized state (codes, scales, zero-points, static activation qparams) keeps the
        # dtypes its spec fixes: a cast moves it to the new device only (a bf16 cast would round
        # fp16 / fp32 scales and so change the weights) and sets the layer's compute dtype,
        # weight_dtype, instead. The bias and any other float tensor are cast as usual.
        stored = {name: t for name, t in self._buffers.items()
                  if t is not None and name.startswith((_PREFIX, "input_"))}
        for name in stored:
            self._buffers[name] = None
        try:
            result = super()._apply(fn, *args, **kwargs)
        finally:
            for name, t in stored.items():
                self._buffers[name] = t
        for name, t in stored.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return result

    @classmethod
    def empty_like(cls, module: nn.Module, spec: QuantSpec, dtype: torch.dtype,
                   device=None) -> nn.Module:
        """A QuantConv2d / QuantEmbedding shaped like float ``module``, its buffers uninitialized
        (to be loaded), nothing quantized."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q._init_like(module, spec, dtype, device)
        return q

    @property
    def weight(self) -> DequantizedWeight:
        """The weight as a float-looking tensor, dequantized on use (see DequantizedWeight)."""
        return DequantizedWeight(self._weight_view())

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(f"{type(self).__name__}.weight is quantized and read-only; "
                             "replace it with set_weight(QuantizedTensor)")

    @property
    def weight_nbytes(self) -> int:
        return self.qweight.nbytes


class QuantLinear(_QuantWeightMixin):
    """``y = x @ W^T + b`` with ``W [out, in]`` quantized; computed by a dispatched kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: str | QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), as_spec(spec), dtype, device)
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None
        )
        act = self.spec.act
        if act is not None and not act.dynamic:
            # Static activation quantization: per-tensor qparams fixed by calibration.
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
            if not act.symmetric:
                self.register_buffer(
                    "input_zero_point", torch.zeros(1, dtype=torch.float32, device=device)
                )

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: str | QuantSpec, qweight: QuantizedTensor | None = None
    ) -> QuantLinear:
        """From ``nn.Linear`` or transformers' ``Conv1D`` (whose weight is ``[in, out]``)."""
        weight, bias = linear_weight(module)
        spec = as_spec(spec)
        out_f, in_f = weight.shape
        q = cls(in_f, out_f, spec, bias is not None, weight.dtype, weight.device)
        q.set_weight(qweight if qweight is not None else QuantizedTensor.from_float(weight, spec))
        if bias is not None:
            q.bias = bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # (self.bias: ~1.5 us through nn.Module.__getattr__)
        bias = buffers["bias"] if "bias" in buffers else self.bias
        out = dispatch.linear(x, self._weight_view(), bias, kernel=self.kernel,
                              cache=self._kernel_cache)
        if torch.is_autocast_enabled(out.device.type):
            # nn.Linear returns the autocast dtype; the fused kernels compute in the input's
            wanted = torch.get_autocast_dtype(out.device.type)
            if out.dtype != wanted:
                out = out.to(wanted)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}"


class QuantConv2d(_QuantWeightMixin):
    """``nn.Conv2d`` with its weight ``[out, in/groups, kh, kw]`` quantized (reference compute)."""

    def __init__(self, conv: nn.Conv2d, spec: str | QuantSpec) -> None:
        super().__init__()
        spec = as_spec(spec)
        w = conv.weight.detach()
        self._init_like(conv, spec, w.dtype, w.device)
        self.bias = None if conv.bias is None else conv.bias.detach().clone()
        self.set_weight(QuantizedTensor.from_float(w, spec))

    def _init_like(self, conv: nn.Conv2d, spec: QuantSpec, dtype: torch.dtype, device) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={conv.padding_mode!r}; supported: 'zeros'")
        self._init_weight(tuple(conv.weight.shape), spec, dtype, device)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups", "padding_mode"):  # for code that reads them
            setattr(self, name, getattr(conv, name))
        self.register_buffer("bias", None if conv.bias is None else torch.empty(
            conv.bias.shape, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.dequantize(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"shape={self.weight_logical_shape}, stride={self.stride}, spec={self.spec}"


class QuantEmbedding(_QuantWeightMixin):
    """``nn.Embedding`` with its table quantized; only the looked-up rows are dequantized."""

    def __init__(self, emb: nn.Embedding, spec: str | QuantSpec) -> None:
        super().__init__()
        spec = as_spec(spec)
        w = emb.weight.detach()
        if emb.max_norm is not None:
            # nn.Embedding renormalizes each row it looks up (in place, once: renorm is
            # idempotent); quantizing the renormalized rows gives every lookup that result
            norms = torch.linalg.vector_norm(w.float(), ord=emb.norm_type, dim=1, keepdim=True)
            w = torch.where(norms > emb.max_norm, w * (emb.max_norm / (norms + 1e-7)), w)
            w = w.to(emb.weight.dtype)
        self._init_like(emb, spec, w.dtype, w.device)
        self.set_weight(QuantizedTensor.from_float(w, spec))

    def _init_like(self, emb: nn.Embedding, spec: QuantSpec, dtype: torch.dtype, device) -> None:
        self._init_weight(tuple(emb.weight.shape), spec, dtype, device)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        qt = self._weight_view()
        if not (self.kernel or dispatch.forced_by_environment()):  # a forced kernel: torch path
            rows = cpu_avx2.embedding_rows(qt, ids, self._kernel_cache)  # CPU float32 tables
            if rows is not None:
                return rows
        if ids.numel() == 0:
            return torch.empty(*ids.shape, qt.shape[1], dtype=self.weight_dtype,
                               device=qt.qdata.device)
        if qt.layout.block_rows == 1 and qt.layout.channel_axis is None:
            rows = qt.select_rows(ids.reshape(-1)).dequantize()
            return rows.reshape(*ids.shape, qt.shape[1])
        return F.embedding(ids, qt.dequantize())

    def extra_repr(self) -> str:
        return f"{self.weight_logical_shape[0]}, {self.weight_logical_shape[1]}, spec={self.spec}"


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [out, in], bias)`` of a Linear-like module; GPT-2 Conv1D's ``[in, out]`` transposed."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t().contiguous(), module.bias
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
