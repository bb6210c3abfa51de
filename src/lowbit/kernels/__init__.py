"""How quantized layers compute: a dispatch table with an always-present reference kernel."""

# imported for their registrations: int4/int8 weight-only (CPU), int4 (Triton), W8A8 kernels
from lowbit.kernels import cpu_avx2, int8, triton_int4  # noqa: F401
from lowbit.kernels.dispatch import KERNELS, Kernel, linear, register_kernel, select_kernel

__all__ = ["KERNELS", "Kernel", "linear", "register_kernel", "select_kernel"]
