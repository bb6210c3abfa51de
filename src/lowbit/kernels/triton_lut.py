"""Triton kernels (CUDA): weight-only GEMV/GEMM for codes that index one table, with fused
lookup and scaling: ``triton_lut4`` for 4-bit codes (nf4's and the other 4-bit codebooks, fp4
e2m1's float grid),
``triton_fp8`` for fp8 e4m3fn / e5m2 weights (a table of their 256 values).

The weights are ``w = table[code] * s``: lowbit's canonical bytes (4 bits: code ``2j`` in the
low nibble of byte ``j``; 8 bits: one code per byte), a scale per group of K (a multiple of 32,
or 16 for 8 bits), per output channel or per tensor, and the spec's table in float32. The
kernels are :mod:`lowbit.kernels.triton_int4`'s ``gemv``, ``gemm`` and ``dequant`` kinds run
with ``TABLE=True`` (the table is gathered per code from a 64-byte or 1 KiB array that stays in
L1; the ``gemv2`` kind's bit trick has no table form): ``gemv`` sums ``table[code] * x`` in
float32 and scales per group, exact weights like the affine kernels; ``gemm`` rounds each
``table[code]`` to x's dtype before the tensor-core dot (exact for fp4 and fp8, whose values
fp16 and bf16 hold; nf4's are rounded) and ``dequant`` each weight, as
``qt.dequantize(x.dtype)`` does. Gemm tiles are kept to at most 32 codes and 16 accumulators
per thread: above, the per-code gathers made ptxas spill registers.

Before them, nf4 / fp4 / fp8 weights on a GPU ran the reference (the whole weight dequantized on
every call). Compiled for sm_90 offline and checked under ``TRITON_INTERPRET=1`` on CPU tensors
(tests/kernels/test_triton.py); not yet timed on a GPU (benchmarks/gpu.py times them).
"""

from __future__ import annotations

import torch

from lowbit.kernels import triton_int4
from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.kernels.triton_int4 import table_spec_supported
from lowbit.tensor import QuantizedTensor


def _register(name: str, bits: int, what: str) -> Kernel:
    def supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
        return triton_int4.supports_call(qt, x, bits, table=True)

    def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
               cache: dict) -> torch.Tensor:
        if not table_spec_supported(qt, bits):
            raise ValueError(f"{name} needs {what} weight-only codes, got {qt.spec}")
        return triton_int4.cached_linear(name, x, qt, bias, cache)

    linear.__doc__ = (f"``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype (CUDA; "
                      f"{what} codes).")
    return register_kernel(Kernel(name, linear, supports, priority=20))


NAME = "triton_lut4"
KERNEL = _register(NAME, 4, "4-bit nf4 / fp4")
FP8_NAME = "triton_fp8"
FP8_KERNEL = _register(FP8_NAME, 8, "fp8 e4m3fn / e5m2")
