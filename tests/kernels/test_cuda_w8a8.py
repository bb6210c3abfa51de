"""cuda_w8a8 (torch._int_mm) and cuda_fp8 (torch._scaled_mm) arithmetic, checked on CPU tensors.

The registered kernels support CUDA only; here their functions are called directly on small CPU
shapes (torch._int_mm and torch._scaled_mm have CPU implementations, slow but exact enough to
check padding, layouts and the epilogue). W8A8 must equal the int8-reference oracle bit for bit;
fp8 must match the fp8-reference oracle to float32 accumulation error.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.kernels import cuda_w8a8 as cw
from lowbit.kernels import int8
from lowbit.kernels.dispatch import KERNELS, select_kernel
from lowbit.quant.maps import quantize
from lowbit.spec import preset
from lowbit.tensor import QuantizedTensor

needs_int_mm = pytest.mark.skipif(not cw.int_mm_available(), reason="torch has no _int_mm")

# (M, K, N): M <= 16 and K, N off multiples of 8 exercise the padding
SHAPES = [(1, 64, 40), (5, 100, 36), (17, 96, 24), (33, 72, 20)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qt(name, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    torch.manual_seed(seed)
    qt = QuantizedTensor.from_float(torch.randn(n, k) * torch.rand(n, 1) * 2, name)
    if qt.spec.act is not None and not qt.spec.act.dynamic:
        qt.act_scale = torch.tensor(5.0 / 127)
    return qt


@needs_int_mm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["w8a8", "w7a8", "w8a7", "w8a8-static"])
def test_int8_equals_reference_bit_for_bit(name: str, shape, dtype) -> None:
    m, k, n = shape
    qt = _qt(name, n, k)
    torch.manual_seed(1)
    x = (torch.randn(2, m, k) * 2).to(dtype)
    bias = torch.randn(n) * 4
    for b in (None, bias):
        y = cw.cuda_w8a8_linear(x, qt, b, {})
        ref = int8.int8_reference_linear(x, qt, b, {})
        assert y.shape == ref.shape == (2, m, n) and y.dtype == ref.dtype == dtype
        assert torch.equal(y, ref), f"max diff {(y.float() - ref.float()).abs().max():.3g}"


@needs_int_mm
def test_int8_per_tensor_dynamic_and_empty_input() -> None:
    spec = preset("w8a8")
    qt = _qt(spec.replace(act=spec.act.replace(granularity="tensor")), 24, 64)
    x = torch.randn(9, 64)
    assert torch.equal(cw.cuda_w8a8_linear(x, qt, None, {}),
                       int8.int8_reference_linear(x, qt, None, {}))
    empty = cw.cuda_w8a8_linear(torch.randn(0, 64), qt, torch.ones(24), {})
    assert empty.shape == (0, 24)


@needs_int_mm
def test_int8_layout_cached_and_rebuilt() -> None:
    qt = _qt("w8a8", 24, 64)
    cache: dict = {}
    x = torch.randn(3, 64)
    y = cw.cuda_w8a8_linear(x, qt, None, cache)
    w = cache[cw.NAME][1]
    assert w.shape == (24, 64) and w.dtype == torch.int8
    assert torch.equal(cw.cuda_w8a8_linear(x, qt, None, cache), y)
    assert cache[cw.NAME][1] is w  # reused
    other = _qt("w8a8", 24, 64, seed=5)
    assert torch.equal(cw.cuda_w8a8_linear(x, other, None, cache),
                       int8.int8_reference_linear(x, other, None, {}))


def test_activation_codes_are_lowbits_q() -> None:
    torch.manual_seed(2)
    x = torch.randn(7, 48) * torch.rand(7, 1) * 3
    x[3] = 0.0  # an all-zero row: scale 1
    for name in ("w8a8", "w8a7", "w8a8-static"):
        qt = _qt(name, 8, 48)
        codes, sx = cw.quantize_act_int8(x, qt)
        ref_codes, ref_sx = int8.quantize_activation(x, qt)
        assert torch.equal(codes.to(torch.int16), ref_codes) and torch.equal(sx, ref_sx), name
    qt = _qt("fp8a8", 8, 48)
    xq, sx = cw.quantize_act_fp8(x, qt)
    ref_codes, qp, _ = quantize(x, qt.spec.act)
    assert torch.equal(xq.view(torch.uint8), ref_codes) and torch.equal(sx, qp.scale.float())


def test_cpu_inputs_with_nan_raise_like_the_oracles() -> None:
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    for name, fn in (("w8a8", cw.cuda_w8a8_linear), ("fp8a8", cw.cuda_fp8_linear)):
        with pytest.raises(ValueError, match="NaN"):
            fn(x, _qt(name, 16, 64), None, {})


def test_static_without_scale_is_a_clear_error() -> None:
    qt = QuantizedTensor.from_float(torch.randn(16, 64), "w8a8-static")
    with pytest.raises(ValueError, match="act_scale is unset"):
        cw.cuda_w8a8_linear(torch.randn(2, 64), qt, None, {})


def test_int_mm_padded_rejects_bad_operands() -> None:
    with pytest.raises(ValueError, match="int_mm_padded needs int8"):
        cw.int_mm_padded(torch.zeros(2, 8), torch.zeros(8, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be padded"):
        cw.int_mm_padded(torch.zeros(2, 12, dtype=torch.int8), torch.zeros(8, 12, dtype=torch.int8))


def _scaled_mm_runs_on_cpu() -> bool:
    try:
        a = torch.zeros(1, 16).to(torch.float8_e4m3fn)
        w = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        one = torch.ones(())
        torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _scaled_mm_runs_on_cpu(), reason="torch._scaled_mm has no CPU path here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_matches_reference(shape, dtype) -> None:
    m, k, n = shape
    qt = _qt("fp8a8", n, k)
    torch.manual_seed(3)
    x = (torch.randn(2, m, k) * 2).to(dtype)
    bias = torch.randn(n)
    y = cw.cuda_fp8_linear(x, qt, bias, {})
    ref = cw.fp8_reference_linear(x, qt, bias, {})
    assert y.shape == ref.shape == (2, m, n) and y.dtype == ref.dtype == dtype
    # float32 sums in another order; then one rounding to the output dtype
    xq, sx = cw.quantize_act_fp8(x.reshape(-1, k), qt)
    mag = (xq.double().abs() @ cw.fp8_weight_layout(qt, x.device)[0][:n, :k].double().abs().T)
    mag = mag * sx.double() * qt.scale.double().reshape(1, -1)
    tol = 16 * k**0.5 * 2.0**-24 * mag + torch.finfo(dtype).eps * ref.reshape(-1, n).double().abs()
    err = (y.double() - ref.double()).abs().reshape(-1, n)
    assert bool((err <= tol + 1e-6).all()), f"max err {err.max():.3g}"


def test_fp8_reference_is_the_dequantized_product() -> None:
    """The oracle against an independent path: fake-quantized x and W, float64 matmul."""
    qt = _qt("fp8a8", 24, 96)
    x = torch.randn(5, 96)
    bias = torch.randn(24)
    y = cw.fp8_reference_linear(x, qt, bias, {})
    xf = lowbit.fake_quantize(x, qt.spec.act).double()
    want = xf @ qt.dequantize().double().T + bias.double()
    assert float((y.double() - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_fp8_preset_runs_on_cpu_through_the_reference() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
        lowbit.quantize(model, "fp8a8")
        got = model(x)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 0.1
    qt = QuantizedTensor.from_float(torch.randn(8, 64), "fp8a8")
    assert select_kernel(qt, x).name == cw.FP8_REFERENCE_NAME
    assert select_kernel(qt, x, "reference").name == cw.FP8_REFERENCE_NAME


@pytest.mark.parametrize(("kernel", "name"), [(cw.NAME, "w8a8"), (cw.NAME, "w8a8-static"),
                                              (cw.FP8_NAME, "fp8a8")])
def test_registered_for_cuda_only(kernel: str, name: str) -> None:
    qt = _qt(name, 16, 64)
    x = torch.randn(2, 64)
    assert not KERNELS[kernel].supports(qt, x)
    assert select_kernel(qt, x).name != kernel


def test_spec_coverage() -> None:
    def int8_ok(spec) -> bool:
        return cw.int8_spec_supported(_qt(spec, 8, 64))

    assert all(int8_ok(n) for n in ("w8a8", "w7a8", "w8a7", "w8a8-static"))
    asym = preset("w8a8-static")
    asym = asym.replace(act=asym.act.replace(format="uint8", symmetric=False))
    assert not int8_ok(asym) and not int8_ok("w8") and not int8_ok("fp8a8")
    assert cw.fp8_spec_supported(_qt("fp8a8", 8, 64))
    assert not cw.fp8_spec_supported(_qt("fp8", 8, 64))  # weight-only fp8: no activation spec
    e5 = preset("fp8a8")
    e5 = e5.replace(act=e5.act.replace(format="fp8_e5m2"))
    assert cw.fp8_reference_spec_supported(_qt(e5, 8, 64)) and not cw.fp8_spec_supported(
        _qt(e5, 8, 64))
