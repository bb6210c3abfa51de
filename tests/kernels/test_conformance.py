"""Every registered kernel x every preset it supports, against the reference kernel.

Random inputs with odd M, 3-D inputs, with and without bias; forced selection via LOWBIT_KERNEL.
Kernels that don't support CPU tensors (Triton/CUDA) have no case here: they are checked in
their own tests (the Triton one under the interpreter).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.kernels import KERNELS, cpu_avx2, dispatch
from lowbit.spec import PRESETS, QuantSpec, as_spec, preset
from lowbit.tensor import QuantizedTensor

K, N = 256, 40
# beyond the presets: full-range symmetric weights (negative scales, the code -2**(b-1) used)
FULL_RANGE = ("int4-g128-sym-full", "uint4-g128-sym-full", "int8-ch-sym-full", "int3-g128-sym-full",
              "int2-g64-sym-full", "int8-g32-sym-full", "int8-ch-sym-full+a:int8-token-sym-dyn",
              "int4-g128-sym-full+a:int8-token-sym-dyn", "int6-g64-sym-full")
# double-quantized scales (k-quants): kernels run their plain spec with decoded float32 scales
DOUBLE_QUANTIZED = ("int4-g32-sym-dq6x8", "uint4-g64-asym-fz-dq4x2", "int3-g32-sym-full-dq6x16",
                    "uint2-g32-asym-fz-dq4x16", "int8-g32-sym-full-dq8x8",
                    "uint6-g32-asym-fz-dq6x8")
NAMES = (*PRESETS, *FULL_RANGE, *DOUBLE_QUANTIZED)


def _quantized(name: str) -> QuantizedTensor:
    torch.manual_seed(sum(map(ord, name)))
    qt = QuantizedTensor.from_float(torch.randn(N, K) * torch.rand(N, 1) * 2, name)
    spec = as_spec(name)
    if spec.act is not None and not spec.act.dynamic:  # static activations: a calibrated scale
        qt.act_scale = torch.tensor(4.0 / 127)
        if spec.act.has_zero_point:
            qt.act_zero_point = torch.tensor(0.0)
    return qt


_QUANTIZED = {name: _quantized(name) for name in NAMES}
# what a kernel is handed: the selection path decodes double-quantized scales first
_RUNNABLE = {name: qt.with_float_scales() for name, qt in _QUANTIZED.items()}
_INPUTS = {
    "odd-2d": lambda: torch.randn(7, K),
    "3d": lambda: torch.randn(2, 3, K),
}


def _cases():
    for kernel in sorted(KERNELS):
        for name in NAMES:
            if KERNELS[kernel].supports(_RUNNABLE[name], torch.randn(1, K)):
                yield kernel, name


CASES = list(_cases())


def _tolerance(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """fp32 reassociation bound: sqrt(K) * eps growth on sum_k |x||w| with a 16x margin (the
    weight magnitude is bounded by its dequantized values plus the zero-point term)."""
    w = qt.dequantize(torch.float32).abs()
    mag = x.abs().reshape(-1, K) @ (w + w.amax(dim=1, keepdim=True)).T
    return 16 * K**0.5 * torch.finfo(torch.float32).eps * mag + 1e-6


def test_every_fast_kernel_has_a_case() -> None:
    cpu_kernels = {k for k, _ in CASES}
    assert "reference" in cpu_kernels
    if cpu_avx2.extension() is not None:
        for name in ("cpu_int2", "cpu_int3", "cpu_int4", "cpu_int5", "cpu_int6", "cpu_int8",
                     "cpu_lut", "cpu_fp8"):
            assert name in cpu_kernels, f"{name} supports no preset here: {CASES}"


@pytest.mark.parametrize("input_kind", sorted(_INPUTS))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("kernel", "name"), CASES)
def test_kernel_matches_reference(kernel: str, name: str, input_kind: str, with_bias: bool):
    qt = _QUANTIZED[name]
    torch.manual_seed(7)
    x = _INPUTS[input_kind]()
    bias = torch.randn(N) if with_bias else None
    y = KERNELS[kernel].fn(x, _RUNNABLE[name], bias, {})
    ref = dispatch.select_kernel(qt, x, "reference").fn(x, qt, bias, {})
    assert y.shape == (*x.shape[:-1], N) and y.dtype == ref.dtype
    err = (y - ref).abs().reshape(-1, N)
    tol = _tolerance(x, qt)
    assert bool((err <= tol).all()), f"{kernel} on {name}: max err {err.max():.3g}"


@pytest.mark.parametrize(("kernel", "name"), CASES)
def test_forced_by_environment(monkeypatch, kernel: str, name: str) -> None:
    qt = _QUANTIZED[name]
    x = torch.randn(3, K)
    monkeypatch.setenv("LOWBIT_KERNEL", kernel)
    assert dispatch.select_kernel(qt, x).name == kernel
    # the forced kernel is the one that ran: bit-identical to calling it directly
    assert torch.equal(dispatch.linear(x, qt), KERNELS[kernel].fn(x, _RUNNABLE[name], None, {}))


def test_forcing_an_unsupporting_kernel_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_KERNEL", "cpu_int4")
    with pytest.raises(ValueError, match="does not support"):
        dispatch.select_kernel(_QUANTIZED["w8"], torch.randn(1, K))
    monkeypatch.setenv("LOWBIT_KERNEL", "no-such-kernel")
    with pytest.raises(ValueError, match="not registered"):
        dispatch.select_kernel(_QUANTIZED["w4g128"], torch.randn(1, K))


def test_kernel_plan_names_the_kernel_of_every_quantized_linear() -> None:
    from torch import nn

    import lowbit

    model = nn.Sequential(nn.Linear(K, 64), nn.Linear(64, 32), nn.Linear(32, 16))
    fp6 = QuantSpec("fp6_e3m2", "channel", symmetric=True)  # no fast CPU kernel
    lowbit.quantize(model, {"0": "w4g128", "1": fp6, "2": "w8"})
    plan = dispatch.kernel_plan(model)
    fast = cpu_avx2.extension() is not None
    assert plan["reference"][0] == ("1", str(fp6))
    assert ("0", str(preset("w4g128"))) in plan["cpu_int4" if fast else "reference"]
    assert ("2", str(preset("w8"))) in plan["cpu_int8" if fast else "reference"]


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kernel", "name"), [c for c in CASES if c[0].startswith("cpu_")])
def test_raw_step_entries_equal_the_bound_call(kernel: str, name: str, bias_dtype) -> None:
    """A bound kernel's ``raw_step(out)`` (the Decoder's step entry: an x pointer in, a status
    out, written into ``out``) gives what the checked call returns, bit for bit, for every row
    count it accepts; it refuses buffers that do not fit; an entry taken before an in-place
    edit follows the rebuilt layout, and keeps working after the bound call is dropped (a
    half-precision bias's float32 copy included)."""
    qt = _RUNNABLE[name]
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    run = KERNELS[kernel].bound(qt, bias, {})
    raw_step = run.raw_step  # every native CPU kernel has one (the Decoder's step calls it)
    for bad in (torch.empty(0, N), torch.empty(2, N + 1), torch.empty(2, N, dtype=torch.float64),
                torch.empty(N, 2).T, torch.empty(())):
        assert raw_step(bad) is None
    torch.manual_seed(3)
    outputs = {m: torch.full((m, 1, N), float("nan")) for m in (1, 2, 5, 16, 17, 64)}
    entries = {m: raw_step(out) for m, out in outputs.items()}
    assert entries[1] is not None
    inputs = {m: torch.randn(m, 1, K) for m in outputs}
    for m, entry in entries.items():
        if entry is not None:
            assert entry(inputs[m].data_ptr()) == 0
            assert torch.equal(outputs[m], run(inputs[m])), (kernel, name, m)

    if qt.scale is None or bias is None:
        return
    edited = copy.copy(qt)
    edited.scale = qt.scale.clone()
    run = KERNELS[kernel].bound(edited, bias, {})
    out = torch.empty(1, N)
    entry = run.raw_step(out)
    x = torch.randn(1, K)
    edited.scale.mul_(2)
    bias.mul_(3)
    expected = run(x)  # rebuilds the layout and the bias copy
    del run
    assert entry(x.data_ptr()) == 0
    assert torch.equal(out, expected)


def test_the_environment_is_read_at_every_call(monkeypatch) -> None:
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    assert dispatch.forced_by_environment() is None
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    assert dispatch.forced_by_environment() == "reference"
    monkeypatch.delenv("LOWBIT_KERNEL")
    assert dispatch.forced_by_environment() is None


def test_a_replaced_environment_mapping_is_read(monkeypatch) -> None:
    import os

    monkeypatch.setattr(os, "environ", {"LOWBIT_KERNEL": "reference"})
    assert dispatch.forced_by_environment() == "reference"
    monkeypatch.setattr(os, "environ", {})
    assert dispatch.forced_by_environment() is None
