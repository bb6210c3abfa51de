"""lowbit: quantize PyTorch models with exact formats, packed low-bit tensors and honest numbers."""

from lowbit.quant import choose_qparams, dequantize, fake_quantize, quantize
from lowbit.spec import PRESETS, QuantSpec, as_spec, preset
from lowbit.tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "QuantSpec",
    "QuantizedTensor",
    "as_spec",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "preset",
    "quantize",
]
