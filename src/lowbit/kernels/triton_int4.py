"""Triton kernel (CUDA): fused dequantize + matmul for packed 4-bit group-wise affine weights.

Reads lowbit's canonical bytes directly: row n of the weight is ``K/2`` bytes, code ``2j`` in the
low nibble of byte ``j`` and code ``2j+1`` in the high nibble. Each program computes a
``[BLOCK_M, BLOCK_N]`` output tile; per ``BLOCK_K`` step it loads the bytes, unpacks the nibbles,
applies ``w = (u - zc[n, k // group]) * s[n, k // group]`` in registers and accumulates
``x_tile @ w_tile`` in fp32. Weights never exist in float in global memory.

Triton is optional: it is imported on first use only. The kernel registers for CUDA devices;
under ``TRITON_INTERPRET=1`` :func:`int4_matmul` also runs on CPU tensors (that is how CI checks
it against the reference).
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels.dispatch import Kernel, register_kernel
from lowbit.quant.maps import qrange
from lowbit.tensor import QuantizedTensor

NAME = "triton_int4"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _jit_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_matmul_kernel(
        x_ptr, p_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, G,
        stride_xm, stride_pn, stride_ym,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0,
            )
            wmask = k_ok[:, None] & (offs_n[None, :] < N)
            byte = tl.load(
                p_ptr + offs_n[None, :] * stride_pn + (offs_k[:, None] // 2), mask=wmask, other=0
            ).to(tl.int32)
            code = (byte >> ((offs_k[:, None] % 2) * 4)) & 0xF
            group = offs_k[:, None] // GROUP
            s = tl.load(s_ptr + offs_n[None, :] * G + group, mask=wmask, other=0.0)
            z = tl.load(z_ptr + offs_n[None, :] * G + group, mask=wmask, other=0.0)
            w = ((code.to(tl.float32) - z) * s).to(x.dtype)  # [BLOCK_K, BLOCK_N]
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )

    return triton, int4_matmul_kernel


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_code: torch.Tensor,
    group_size: int,
    *,
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """``x [M, K] @ W^T`` -> ``[M, N]`` in x's dtype, with W given as packed uint8 ``[N, K/2]``,
    fp32 ``scale`` and ``zero_code`` ``[N, K/group_size]`` (w = (code - zero_code) * scale)."""
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            f"int4_matmul needs x [M, K] and packed uint8 [N, K/2]; got x {tuple(x.shape)}, "
            f"packed {tuple(packed.shape)} {packed.dtype}"
        )
    triton, kernel = _jit_kernel()
    m, k = x.shape
    n = packed.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    kernel[grid](
        x, packed, scale, zero_code, y,
        m, n, k, scale.shape[1],
        x.stride(0), packed.stride(0), y.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
    )
    return y


def execution_layout(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scale fp32 [N, G], zero in code units fp32 [N, G])."""
    spec = qt.spec
    qmin, _ = qrange(spec)
    scale = qt.scale.float().contiguous()
    if spec.has_zero_point:
        zero_code = (qt.zero_point.float() - qmin).contiguous()
    else:
        zero_code = torch.full_like(scale, float((0 if spec.signed else 8) - qmin))
    return qt.qdata.contiguous(), scale, zero_code


def spec_supported(qt: QuantizedTensor) -> bool:
    """4-bit affine group-wise weight-only 2-D specs (even K)."""
    spec = qt.spec
    return (
        spec.act is None
        and spec.kind == "affine"
        and spec.bits == 4
        and spec.granularity == "group"
        and len(qt.shape) == 2
        and qt.shape[1] % 2 == 0
        and qt.g_idx is None
    )


def _supports(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cuda"
        and x.dtype in ACT_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())  # no autograd through Triton
        and spec_supported(qt)
        and triton_available()
    )


def triton_int4_linear(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias)`` -> ``[..., N]`` in x's dtype (CUDA)."""
    entry = cache.get(NAME)
    if entry is None or entry[0] is not qt.qdata:
        entry = (qt.qdata, *(t.to(x.device) for t in execution_layout(qt)))
        cache[NAME] = entry
    n_out, k_in = qt.shape
    y = int4_matmul(x.reshape(-1, k_in), *entry[1:], qt.spec.group_size)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n_out)


KERNEL = register_kernel(Kernel(NAME, triton_int4_linear, _supports, priority=20))
