"""Triton kernel (CUDA): int8 weight-only GEMV/GEMM with fused dequantization.

8-bit affine codes (int8/uint8, symmetric or with an int or float zero-point), one byte per code,
scales per tensor, per output channel or per group of K (a multiple of 16), with fp16, bf16 or
fp32 activations. The kernels are :mod:`lowbit.kernels.triton_int4`'s, run with ``BITS=8``; see
its docstring for the layout, the kernel kinds, the autotuner and the arithmetic.

Triton is optional (imported on first use); the kernel registers for CUDA devices only. Under
``TRITON_INTERPRET=1`` :func:`int8_matmul` also runs on CPU tensors (tests/kernels/test_triton.py).
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_int4
from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.kernels.triton_int4 import Config, execution_layout, triton_available  # noqa: F401
from lowbit.tensor import QuantizedTensor

NAME = "triton_int8"


def spec_supported(qt: QuantizedTensor) -> bool:
    """8-bit affine weight-only 2-D specs (per tensor, per output channel, groups of 16k)."""
    return triton_int4.spec_supported(qt, 8)


def int8_matmul(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` -> ``[M, N]`` in x's dtype for an 8-bit ``qt [N, K]``."""
    if not spec_supported(qt):
        raise ValueError(f"int8_matmul needs an 8-bit affine weight-only 2-D spec, got {qt.spec}")
    return triton_int4.wo_matmul(x, execution_layout(qt).to(x.device), bias, config)


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return triton_int4.supports_call(qt, x, 8)


def triton_int8_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype (CUDA; 8-bit codes)."""
    return triton_int4.cached_linear(NAME, x, qt, bias, cache)


KERNEL = register_kernel(Kernel(NAME, triton_int8_linear, _supports, priority=20))
