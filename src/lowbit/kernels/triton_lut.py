"""Triton kernel (CUDA): weight-only GEMV/GEMM for 4-bit codes that index one table (nf4's
codebook, fp4 e2m1's float grid), with fused lookup and scaling.

The weights are ``w = table[code] * s``: lowbit's canonical 4-bit bytes (code ``2j`` in the low
nibble of byte ``j``), a scale per group of K (a multiple of 32), per output channel or per
tensor, and the spec's table of 16 float32 values. The kernels are
:mod:`lowbit.kernels.triton_int4`'s ``gemv``, ``gemm`` and ``dequant`` kinds run with
``TABLE=True`` (the table is loaded per code from a 64-byte array that stays in L1; the
``gemv2`` kind's bit trick has no table form): ``gemv`` sums ``table[code] * x`` in float32 and
scales per group, exact weights like the affine kernels; ``gemm`` and ``dequant`` round each
``table[code]`` (``gemm``) or weight (``dequant``) to x's dtype first, as ``qt.dequantize(x.dtype)``
does for the latter (fp4's entries are exact in fp16 / bf16, nf4's are rounded).

Before it, nf4 / fp4 on a GPU ran the reference (the whole weight dequantized on every call).
Compiled for sm_90 offline and checked under ``TRITON_INTERPRET=1`` on CPU tensors
(tests/kernels/test_triton.py); not yet timed on a GPU (benchmarks/gpu.py times it).
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_int4
from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.kernels.triton_int4 import table_spec_supported
from lowbit.tensor import QuantizedTensor

NAME = "triton_lut4"


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return triton_int4.supports_call(qt, x, 4, table=True)


def triton_lut4_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype (CUDA; 4-bit table codes)."""
    if not table_spec_supported(qt):
        raise ValueError(f"{NAME} needs 4-bit nf4 / fp4 codes with one table, got {qt.spec}")
    return triton_int4.cached_linear(NAME, x, qt, bias, cache)


KERNEL = register_kernel(Kernel(NAME, triton_lut4_linear, _supports, priority=20))
