"""lowbit: quantize PyTorch models with exact formats, packed low-bit tensors and honest numbers.

``lowbit.quantize(model, spec)`` works on whole models; the tensor-level maps live in
``lowbit.quant`` (``choose_qparams``, ``quantize``, ``dequantize``, ``fake_quantize``).
"""

from lowbit.algorithms import qat
from lowbit.api import QuantizeSummary, quantize
from lowbit.calib.sensitivity import mixed_precision
from lowbit.io import load, save
from lowbit.models.decode import Decoder, generate
from lowbit.quant import choose_qparams, fake_quantize
from lowbit.spec import PRESETS, QuantSpec, as_spec, preset
from lowbit.tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "Decoder",
    "PRESETS",
    "QuantSpec",
    "QuantizeSummary",
    "QuantizedTensor",
    "as_spec",
    "choose_qparams",
    "fake_quantize",
    "generate",
    "load",
    "mixed_precision",
    "preset",
    "qat",
    "quantize",
    "save",
]
