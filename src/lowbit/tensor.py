"""QuantizedTensor: packed codes + scale + zero-point (+ codebook) + spec + logical shape/dtype."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lowbit.formats.packing import pack, packed_length, unpack
from lowbit.quant.layout import Layout, layout_for
from lowbit.quant.maps import QParams, ScaleCodes, decode_scales, dequantize, qrange, quantize
from lowbit.spec import QuantSpec, as_spec, torch_dtype

# Stored tensors, in state-dict order; each is optional except qdata. Their state-dict names
# follow compressed-tensors (``<module>.weight_packed``, ``.weight_scale``, ...).
_FIELDS = ("qdata", "scale", "zero_point", "codebook", "g_idx", "super_scale", "super_min")
STATE_NAMES = {
    "qdata": "packed",
    "scale": "scale",
    "zero_point": "zero_point",
    "codebook": "codebook",
    "g_idx": "g_idx",
    "super_scale": "super_scale",
    "super_min": "super_min",
}


@dataclass
class QuantizedTensor:
    """A quantized tensor as stored.

    qdata: uint8 ``[R, ceil(C*bits/8)]``, each row of the canonical 2-D view (see
        :mod:`lowbit.quant.layout`) packed as in :mod:`lowbit.formats.packing`.
    scale, zero_point: ``[R/bh, C/bw]`` in the spec's dtypes (None where the spec has none).
    codebook: ``[R/bh, C/bw, 2**bits]`` for k-means specs.
    g_idx: optional int32 ``[C]`` group index per input column (GPTQ act-order).
    super_scale, super_min: double-quantized specs (``spec.scale_bits``, k-quants): then
        ``scale`` / ``zero_point`` are uint8 ``[R, ceil(G*scale_bits/8)]``, each row's group
        scale (minimum) codes packed as ``qdata``, and these ``[R, ceil(G/super_group)]`` in
        the spec's scale / zero dtypes scale them (:class:`lowbit.quant.maps.ScaleCodes`);
        :attr:`qparams` decodes the effective values.
    """

    qdata: torch.Tensor
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None
    # Static activation qparams (per tensor) of a W*A* spec; set by the module, not stored here.
    act_scale: torch.Tensor | None = None
    act_zero_point: torch.Tensor | None = None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        spec: str | QuantSpec,
        qparams: QParams | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> QuantizedTensor:
        """Quantize ``w`` with ``spec`` (a preset name or QuantSpec) and pack the codes."""
        spec = as_spec(spec)
        codes, qp, layout = quantize(w, spec, qparams, generator=generator)
        return cls.from_codes(codes, qp, spec, tuple(w.shape), w.dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qparams: QParams, spec: QuantSpec,
                   shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> QuantizedTensor:
        """Pack stored codes uint8 ``[R, C]`` (canonical view) with their qparams (a
        double-quantized spec's from ``qparams.scale_codes``)."""
        stored: dict[str, torch.Tensor | None] = {
            "scale": qparams.scale, "zero_point": qparams.zero_point,
            "codebook": qparams.codebook}
        if spec.double_quantized:
            sc = qparams.scale_codes
            if sc is None:
                raise ValueError(f"spec {spec} stores its scales as codes; qparams lack "
                                 "scale_codes (see lowbit.quant.maps.double_quantize)")
            stored = {"scale": pack(sc.scale, spec.scale_bits), "super_scale": sc.super_scale,
                      "zero_point": None if sc.minimum is None else pack(sc.minimum,
                                                                          spec.scale_bits),
                      "super_min": sc.super_min}
        return cls(qdata=pack(codes, spec.bits), spec=spec, shape=tuple(shape), dtype=dtype,
                   **stored)

    # ---- views ---------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return layout_for(self.shape, self.spec)

    @property
    def qparams(self) -> QParams:
        """The qparams the maps use (a double-quantized spec's decoded to float32)."""
        if self.spec.double_quantized:
            groups = self.layout.n_blocks[1]
            bits = self.spec.scale_bits
            codes = ScaleCodes(
                unpack(self.scale, bits, groups), self.super_scale,
                None if self.zero_point is None else unpack(self.zero_point, bits, groups),
                self.super_min)
            return decode_scales(codes, self.spec)
        return QParams(scale=self.scale, zero_point=self.zero_point, codebook=self.codebook)

    def with_float_scales(self) -> QuantizedTensor:
        """A double-quantized tensor as the plain spec with its decoded float32 scales (and
        zero-points): the same values, for kernels and exports that take float scales. The
        codes are shared; other tensors are returned as they are. Kernels bind this view: an
        in-place edit of the scale codes after a layer first ran is not seen (replace the
        QuantizedTensor instead)."""
        if not self.spec.double_quantized:
            return self
        qp = self.qparams
        spec = self.spec.plain_scales().replace(scale_dtype="float32", zero_dtype="float32")
        return dataclasses.replace(self, spec=spec, scale=qp.scale, zero_point=qp.zero_point,
                                   super_scale=None, super_min=None)

    def codes(self) -> torch.Tensor:
        """Stored (unsigned) codes, uint8 ``[R, C]`` in the canonical view."""
        layout = self.layout
        return unpack(self.qdata, self.spec.bits, layout.cols)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Q^-1: float values of the logical shape (``dtype`` defaults to the original dtype)."""
        if self.g_idx is not None:
            spec, qp, layout = elementwise_view(self.spec, self.shape, self.qparams, self.g_idx)
            return dequantize(self.codes(), qp, spec, layout, dtype or self.dtype)
        return dequantize(
            self.codes(), self.qparams, self.spec, self.layout, dtype or self.dtype
        )

    def int_repr(self) -> torch.Tensor:
        """Integer codes in the logical shape: signed int8 for intN, uint8 otherwise.

        For affine formats these are the q of ``(q - z) * s``; for codebooks, the entry index;
        for float grids, the bit pattern.
        """
        layout = self.layout
        codes = self.codes()
        if self.spec.kind == "affine" and self.spec.signed:
            codes = (codes.to(torch.int16) + qrange(self.spec)[0]).to(torch.int8)
        return layout.from_2d(codes)

    def select_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The quantized rows ``index`` of a 2-D tensor whose blocks lie within rows (no unpack).

        Used by embeddings: only the looked-up rows are dequantized.
        """
        layout = self.layout
        if len(self.shape) != 2 or layout.block_rows != 1 or layout.channel_axis is not None:
            raise ValueError(f"select_rows needs row-wise blocks; spec {self.spec} on {self.shape}")
        index = index.reshape(-1)
        pick = {
            name: (t.index_select(0, index) if name != "g_idx" else t)
            for name, t in self.stored_tensors().items()
        }
        return QuantizedTensor(
            spec=self.spec, shape=(index.numel(), self.shape[1]), dtype=self.dtype, **pick
        )

    # ---- copies and moves ----------------------------------------------------------------
    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> QuantizedTensor:
        """The same quantized tensor on ``device`` and / or computing in ``dtype`` (the dtype
        ``dequantize`` returns). The stored tensors keep the dtypes their spec fixes: a cast
        never rounds a scale. Returns ``self`` when nothing changes, as ``torch.Tensor.to``."""
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        moved = {name: t.to(device) if device is not None else t
                 for name, t in self._all_tensors().items()}
        if all(moved[n] is t for n, t in self._all_tensors().items()) and dtype in (None,
                                                                                   self.dtype):
            return self
        return dataclasses.replace(self, dtype=dtype or self.dtype, **moved)

    def clone(self) -> QuantizedTensor:
        """A copy whose tensors share no storage with this one."""
        return dataclasses.replace(self, **{name: t.clone()
                                           for name, t in self._all_tensors().items()})

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors and the static activation qparams, by field name."""
        return {name: getattr(self, name) for name in (*_FIELDS, "act_scale", "act_zero_point")
                if getattr(self, name) is not None}

    # ---- sizes ---------------------------------------------------------------------------
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None
        }

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Real bytes of every stored tensor (codes, scale, zero-point, codebook, g_idx, super
        scales)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.numel

    # ---- state dict ----------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Stored tensors plus the logical shape (int64), keyed ``prefix + name``.

        Names: ``packed`` (qdata), ``scale``, ``zero_point``, ``codebook``, ``g_idx``,
        ``super_scale``, ``super_min``, ``shape``.
        """
        out = {prefix + STATE_NAMES[k]: v for k, v in self.stored_tensors().items()}
        out[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        spec: str | QuantSpec,
        prefix: str = "",
        dtype: torch.dtype = torch.float32,
    ) -> QuantizedTensor:
        """Rebuild from :meth:`state_dict`, validating every stored tensor's shape and dtype."""
        spec = as_spec(spec)
        if prefix + "packed" not in state or prefix + "shape" not in state:
            raise ValueError(f"state dict lacks {prefix}packed or {prefix}shape")
        shape = tuple(int(s) for s in state[prefix + "shape"].tolist())
        qt = cls(
            qdata=state[prefix + "packed"],
            spec=spec,
            shape=shape,
            dtype=dtype,
            **{k: state.get(prefix + STATE_NAMES[k]) for k in _FIELDS[1:]},
        )
        qt.validate()
        return qt

    def validate(self) -> None:
        """Raise ValueError if stored tensors disagree with the spec and logical shape."""
        if self.g_idx is not None:
            layout = self.layout
            if (
                self.spec.granularity != "group"
                or tuple(self.g_idx.shape) != (layout.cols,)
                or self.g_idx.dtype != torch.int32
                or int(self.g_idx.min()) < 0
                or int(self.g_idx.max()) >= layout.n_blocks[1]
            ):
                raise ValueError(
                    f"'g_idx' must be int32 [{layout.cols}] with group indices below "
                    f"{layout.n_blocks[1]} for spec {self.spec}; got {tuple(self.g_idx.shape)} "
                    f"{self.g_idx.dtype}"
                )
        for name, (shape, dtype) in stored_shapes(self.spec, self.shape).items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"spec {self.spec} needs '{name}' but it is missing")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"'{name}' has shape {tuple(t.shape)} dtype {t.dtype}; spec {self.spec} "
                    f"with logical shape {self.shape} needs shape {shape} dtype {dtype}"
                )
        if self.spec.double_quantized:
            zero_code = 1 << (self.spec.scale_bits - 1) if self.spec.full_range else 0
            codes = unpack(self.scale, self.spec.scale_bits, self.layout.n_blocks[1])
            if bool((codes == zero_code).any()):
                raise ValueError(f"'scale' holds the code of a zero scale ({zero_code}); spec "
                                 f"{self.spec} needs every group scale nonzero")

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, spec={self.spec}, dtype={self.dtype}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f})"
        )


def stored_shapes(
    spec: QuantSpec, shape: tuple[int, ...]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor a QuantizedTensor of ``shape`` stores under ``spec``."""
    layout = layout_for(shape, spec)
    nb = layout.n_blocks
    out = {"qdata": ((layout.rows, packed_length(layout.cols, spec.bits)), torch.uint8)}
    if spec.double_quantized:
        codes = (layout.rows, packed_length(nb[1], spec.scale_bits))
        supers = (layout.rows, -(-nb[1] // spec.super_group))
        out["scale"] = (codes, torch.uint8)
        out["super_scale"] = (supers, torch_dtype(spec.scale_dtype))
        if spec.has_zero_point:
            out["zero_point"] = (codes, torch.uint8)
            out["super_min"] = (supers, torch_dtype(spec.zero_dtype))
        return out
    if spec.has_scale:
        out["scale"] = (nb, torch_dtype(spec.scale_dtype))
    if spec.has_zero_point:
        out["zero_point"] = (nb, torch_dtype(spec.zero_dtype))
    if spec.kind == "kmeans":
        out["codebook"] = ((*nb, 1 << spec.bits), torch_dtype(spec.scale_dtype))
    return out


def stored_nbytes(spec: str | QuantSpec, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` takes once quantized with ``spec`` (no data needed)."""
    return sum(
        math.prod(dims) * torch.empty((), dtype=dtype).element_size()
        for dims, dtype in stored_shapes(as_spec(spec), tuple(shape)).values()
    )


def elementwise_view(
    spec: QuantSpec, shape: tuple[int, ...], qparams: QParams, g_idx: torch.Tensor
) -> tuple[QuantSpec, QParams, Layout]:
    """Group qparams ``[R, G]`` expanded to one per element ``[R, C]`` through ``g_idx``.

    The same elementwise formula as the grouped map, so values are bit-identical to quantizing
    each column with its group's qparams (as GPTQ with act-order does).
    """
    cols = g_idx.long()
    per_element = spec.plain_scales().replace(granularity="block", group_size=None,
                                              block=(1, 1))
    expanded = QParams(
        scale=None if qparams.scale is None else qparams.scale[:, cols],
        zero_point=None if qparams.zero_point is None else qparams.zero_point[:, cols],
        codebook=None if qparams.codebook is None else qparams.codebook[:, cols],
    )
    return per_element, expanded, layout_for(shape, per_element)
