"""How quantized layers compute: a dispatch table with an always-present reference kernel."""

# imported for their registrations: int4 weight-only (CPU, Triton) and W8A8 kernels
from lowbit.kernels import cpu_int4, int8, triton_int4  # noqa: F401
from lowbit.kernels.dispatch import KERNELS, Kernel, linear, register_kernel, select_kernel

__all__ = ["KERNELS", "Kernel", "linear", "register_kernel", "select_kernel"]
