"""Measuring what quantization gains and loses: size (and, later, speed and accuracy)."""

from lowbit.eval.size import SizeRow, size_from_model, size_from_params

__all__ = ["SizeRow", "size_from_model", "size_from_params"]
