"""The maps: choose_qparams, quantize, dequantize, fake_quantize, and error metrics."""

from lowbit.quant.layout import Layout, layout_for
from lowbit.quant.maps import (
    QParams,
    check_finite,
    choose_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    qrange,
    quantize,
)
from lowbit.quant.metrics import cosine_similarity, error_report, max_abs_error, mse, sqnr_db

__all__ = [
    "Layout",
    "QParams",
    "check_finite",
    "choose_qparams",
    "cosine_similarity",
    "dequantize",
    "error_report",
    "fake_quantize",
    "layout_for",
    "max_abs_error",
    "mse",
    "qparams_from_range",
    "qrange",
    "quantize",
    "sqnr_db",
]
