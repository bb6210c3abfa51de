"""The fused W8A8 activation quantizer and epilogue (kernels/triton_act.py) under the Triton
interpreter, against the torch operations they replace: the same codes and scales bit for bit,
the same outputs bit for bit, and the whole fused cuda_w8a8 / cuda_fp8 call against the oracles.

The interpreter must be switched on before the kernels are JIT-decorated, so the checks run in
one fresh subprocess (as tests/kernels/test_triton.py does). The fp8 codes are not checked
here: the interpreter's float32 -> e4m3 conversion is not faithful (it halved some values at
binade edges, triton 3.9); benchmarks/gpu.py checks them bit for bit on a GPU.
"""

from __future__ import annotations

import textwrap

import pytest

from lowbit.kernels import triton_int4

pytestmark = pytest.mark.skipif(
    not triton_int4.triton_available(),
    reason="triton is not installed/importable here (pip install 'lowbit[test]')",
)

_SCRIPT = textwrap.dedent(
    """
    import torch
    from lowbit.kernels import cuda_w8a8, triton_act
    from lowbit.kernels.int8 import _scale_out, int8_reference_linear
    from lowbit.quant.maps import qrange, symmetric_zero
    from lowbit.spec import preset
    from lowbit.tensor import QuantizedTensor

    torch.manual_seed(0)
    checked = 0

    def codes_int8(x, qt):
        act = qt.spec.act
        qmin, qmax = qrange(act)
        top = float(qmax - symmetric_zero(act))
        out = torch.full((x.shape[0] + 3, x.shape[1] + 5), 7, dtype=torch.int8)
        sx = triton_act.quantize_act(x, out, top=top, bounds=(qmin, qmax), clip=act.clip_ratio,
                                     scale=cuda_w8a8._given_act_scale(x, qt, top))
        assert bool((out[x.shape[0]:] == 7).all()) and bool((out[:, x.shape[1]:] == 7).all())
        return out[: x.shape[0], : x.shape[1]], sx

    w = torch.randn(24, 40)
    x = torch.randn(9, 40) * 3
    x[1] = 0.0                                   # an all-zero row: scale 1
    x[2, :4] = torch.tensor([1.0, -2.0, 0.5, 1.5]) * (4.0 / 127)  # ties at .5 codes
    x[2, 4:] = 0.0
    x[2, 5] = 4.0
    x[3] *= 1e-30                                # tiny values
    x[4, 7] = 1e4                                # an outlier
    for name in ("w8a8", "w7a8", "w8a7"):
        qt = QuantizedTensor.from_float(w, name)
        for xx in (x, x.half().float(), x[:1]):
            got, sx = codes_int8(xx, qt)
            ref, rsx = cuda_w8a8.quantize_act_int8(xx, qt)
            assert torch.equal(got, ref), (name, (got.int() - ref.int()).abs().max())
            assert torch.equal(sx, rsx), name
            checked += 1
    clipped = preset("w8a8").replace(act=preset("w8a8").act.replace(clip_ratio=0.9))
    qt = QuantizedTensor.from_float(w, clipped)
    got, sx = codes_int8(x, qt)
    ref, rsx = cuda_w8a8.quantize_act_int8(x, qt)
    assert torch.equal(got, ref) and torch.equal(sx, rsx)
    # static scale: outliers clamp
    qt = QuantizedTensor.from_float(w, "w8a8-static")
    qt.act_scale = torch.tensor(0.01)
    got, sx = codes_int8(x, qt)
    ref, rsx = cuda_w8a8.quantize_act_int8(x, qt)
    assert torch.equal(got, ref) and float(sx) == float(rsx)
    # per-tensor dynamic
    qt = QuantizedTensor.from_float(w, preset("w8a8").replace(
        act=preset("w8a8").act.replace(granularity="tensor")))
    got, sx = codes_int8(x, qt)
    ref, rsx = cuda_w8a8.quantize_act_int8(x, qt)
    assert torch.equal(got, ref) and torch.equal(sx.reshape(()), rsx.reshape(()))
    checked += 3

    # a NaN or Inf row gets a NaN scale, the other rows stay exact
    bad = x.clone()
    bad[0, 3] = float("nan")
    bad[5, 2] = float("inf")
    qt = QuantizedTensor.from_float(w, "w8a8")
    got, sx = codes_int8(bad, qt)
    assert bool(sx[0].isnan()) and bool(sx[5].isnan()) and bool(torch.isfinite(sx[1:5]).all())
    good = [1, 2, 3, 4, 6, 7, 8]
    ref, rsx = cuda_w8a8.quantize_act_int8(x[good], qt)
    assert torch.equal(got[good], ref) and torch.equal(sx[good], rsx)

    # epilogue: the reference's order of float32 operations, bit for bit
    acc = torch.randint(-2**20, 2**20, (11, 37), dtype=torch.int32)
    sxr = torch.rand(9, 1) + 1e-3
    sw = torch.rand(1, 30) * 1e-2
    bias = torch.randn(30).half()
    for dt in (torch.float16, torch.float32):
        y = triton_act.epilogue(acc, sxr, sw, bias, dt, 9, 30)
        assert torch.equal(y, _scale_out(acc[:9, :30].float(), sxr, sw, bias).to(dt))
        y = triton_act.epilogue(acc, sxr[:1], sw[:, :1], None, dt, 9, 30)
        assert torch.equal(y, _scale_out(acc[:9, :30].float(), sxr[:1], sw[:, :1], None).to(dt))
        bq = torch.randint(-2**30, 2**30, (30,), dtype=torch.int64)
        y = triton_act.epilogue(acc, sxr[:1], sw, None, dt, 9, 30, bq)
        ref = _scale_out((acc[:9, :30].to(torch.int64) + bq).float(), sxr[:1], sw, None)
        assert torch.equal(y, ref.to(dt))
        facc = torch.randn(9, 32) * 1e3
        y = triton_act.epilogue(facc, sxr, sw, bias, dt, 9, 30)
        assert torch.equal(y, _scale_out(facc[:, :30], sxr, sw, bias).to(dt))
        checked += 4

    # the whole fused calls (CPU tensors here: torch._int_mm / _scaled_mm run on the CPU too)
    cuda_w8a8._fused = lambda x2d: True
    for name, k in (("w8a8", 40), ("w8a8-static", 37), ("w7a8", 64)):
        qt = QuantizedTensor.from_float(torch.randn(21, k), name)
        if name.endswith("static"):
            qt.act_scale = torch.tensor(0.02)
        xb = torch.randn(2, 3, k).half()
        b = torch.randn(21)
        for bb in (b, None):
            y = cuda_w8a8.cuda_w8a8_linear(xb, qt, bb, {})
            assert torch.equal(y, int8_reference_linear(xb, qt, bb, {})), name
            checked += 1
    print("OK", checked)
    """
)


def test_fused_act_quant_and_epilogue_match_torch_ops(run_interpreted) -> None:
    assert "OK 26" in run_interpreted(_SCRIPT)
