"""How quantized layers compute: a dispatch table with an always-present reference kernel."""

# imported for their registrations: int4/int8 weight-only (CPU, Triton), nf4 / fp4 (CPU,
# Triton), W8A8 (CPU, CUDA int8/fp8), W4A8 (CPU)
from lowbit.kernels import (  # noqa: F401
    cpu_avx2,
    cpu_w4a8,
    cpu_w8a8,
    cuda_w8a8,
    int8,
    triton_int4,
    triton_int8,
    triton_lut,
)
from lowbit.kernels.dispatch import KERNELS, Kernel, linear, register_kernel, select_kernel

__all__ = ["KERNELS", "Kernel", "linear", "register_kernel", "select_kernel"]
