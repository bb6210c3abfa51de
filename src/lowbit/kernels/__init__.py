"""How quantized layers compute: a dispatch table with an always-present reference kernel."""

from lowbit.kernels import int8  # noqa: F401  (registers the W8A8 kernels)
from lowbit.kernels import cpu_int4, triton_int4  # noqa: F401  (register int4 kernels)
from lowbit.kernels.dispatch import KERNELS, Kernel, linear, register_kernel, select_kernel

__all__ = ["KERNELS", "Kernel", "linear", "register_kernel", "select_kernel"]
