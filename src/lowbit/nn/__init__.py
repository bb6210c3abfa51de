"""Quantized modules."""

from lowbit.nn.modules import QuantConv2d, QuantEmbedding, QuantLinear, linear_weight

__all__ = ["QuantConv2d", "QuantEmbedding", "QuantLinear", "linear_weight"]
