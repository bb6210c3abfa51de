"""The Triton int4 kernel under the interpreter (TRITON_INTERPRET=1) against the reference.

The interpreter runs the kernel on CPU tensors with numpy. It must be switched on before the
kernel is JIT-decorated, so the check runs in a fresh subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit.kernels import triton_int4
from lowbit.kernels.dispatch import select_kernel
from lowbit.tensor import QuantizedTensor

pytestmark = pytest.mark.skipif(
    not triton_int4.triton_available(),
    reason="triton is not installed/importable here (pip install 'lowbit[test]')",
)

_SCRIPT = textwrap.dedent(
    """
    import torch
    from lowbit.kernels import triton_int4
    from lowbit.kernels.dispatch import reference_linear
    from lowbit.spec import preset
    from lowbit.tensor import QuantizedTensor

    torch.manual_seed(0)
    cases = [("w4g128", 1, 256, 80), ("w4g64", 5, 192, 72), ("w4g128-sym", 17, 256, 48),
             (preset("w4g64").replace(group_size=32, zero_point="float"), 3, 96, 40)]
    for spec, m, k, n in cases:
        qt = QuantizedTensor.from_float(torch.randn(n, k) * torch.rand(n, 1) * 2, spec)
        x = torch.randn(2, m, k)
        bias = torch.randn(n)
        y = triton_int4.triton_int4_linear(x, qt, bias, {})
        ref = reference_linear(x, qt, bias, {})
        s = qt.scale.float().repeat_interleave(qt.spec.group_size, dim=1)
        tol = 16 * k ** 0.5 * 2.0 ** -23 * (x.abs().reshape(-1, k) @ (16 * s).T) + 1e-6
        err = (y - ref).abs().reshape(-1, n)
        assert y.shape == ref.shape == (2, m, n), (y.shape, ref.shape)
        assert bool((err <= tol).all()), (str(spec), float(err.max()), float(tol.max()))
        # a swapped nibble order must be caught
        bad = triton_int4.int4_matmul(
            x.reshape(-1, k), (qt.qdata >> 4) | (qt.qdata << 4),
            *triton_int4.execution_layout(qt)[1:], qt.spec.group_size)
        assert bool(((bad + bias - ref.reshape(-1, n)).abs() > tol).any())
    print("OK", len(cases))
    """
)


def test_interpreter_matches_reference() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK 4" in run.stdout


def test_registered_for_cuda_only() -> None:
    qt = QuantizedTensor.from_float(torch.randn(16, 128), "w4g128")
    assert not triton_int4.KERNEL.supports(qt, torch.randn(1, 128))
    assert select_kernel(qt, torch.randn(1, 128)).name != triton_int4.NAME


def test_bad_input_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="int4_matmul needs"):
        triton_int4.int4_matmul(
            torch.randn(4), torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 1),
            torch.zeros(2, 1), 4,
        )
