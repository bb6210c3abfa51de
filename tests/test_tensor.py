import pytest
import torch

from lowbit.quant import fake_quantize, sqnr_db
from lowbit.spec import PRESETS, QuantSpec, preset
from lowbit.tensor import QuantizedTensor, stored_nbytes

AFFINE_PRESETS = [n for n in PRESETS if preset(n).kind == "affine"]


def test_w4g128_4096_square_takes_8mib_plus_512kib():
    qt = QuantizedTensor.from_float(torch.randn(4096, 4096), "w4g128")
    assert qt.nbytes == 8 * 2**20 + 512 * 2**10
    assert qt.bits_per_weight == pytest.approx(4.25)
    assert qt.qdata.dtype == torch.uint8 and qt.qdata.shape == (4096, 2048)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_size_is_the_theoretical_size(bits):
    spec = QuantSpec(f"uint{bits}", "channel", scale_dtype="float16")
    rows, cols = 6, 33
    qt = QuantizedTensor.from_float(torch.randn(rows, cols), spec)
    assert qt.qdata.numel() == rows * ((cols * bits + 7) // 8)
    assert qt.nbytes == rows * ((cols * bits + 7) // 8) + rows * 2 * 2  # fp16 scale + zero


@pytest.mark.parametrize("name", AFFINE_PRESETS)
def test_state_dict_round_trip(name):
    w = torch.randn(16, 128)
    qt = QuantizedTensor.from_float(w, name)
    sd = qt.state_dict("layer.weight_")
    assert all(k.startswith("layer.weight_") for k in sd)
    back = QuantizedTensor.from_state_dict(sd, qt.spec, "layer.weight_", w.dtype)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.nbytes == qt.nbytes == stored_nbytes(name, (16, 128))


def test_from_state_dict_rejects_mismatches():
    qt = QuantizedTensor.from_float(torch.randn(8, 128), "w4g128")
    sd = qt.state_dict()
    bad = dict(sd, scale=sd["scale"].float())
    with pytest.raises(ValueError, match="'scale' has shape"):
        QuantizedTensor.from_state_dict(bad, "w4g128")
    bad = dict(sd, packed=sd["packed"][:, :-1])
    with pytest.raises(ValueError, match="'qdata'"):
        QuantizedTensor.from_state_dict(bad, "w4g128")
    bad = {k: v for k, v in sd.items() if k != "zero_point"}
    with pytest.raises(ValueError, match="zero_point"):
        QuantizedTensor.from_state_dict(bad, "w4g128")
    with pytest.raises(ValueError, match="lacks"):
        QuantizedTensor.from_state_dict({}, "w4g128")


def test_int_repr_signed_and_unsigned():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    sym = QuantizedTensor.from_float(w, QuantSpec("int8", "tensor", symmetric=True,
                                                   scale_dtype="float32"))
    assert sym.int_repr().dtype == torch.int8
    assert sym.int_repr().tolist() == [[-127, 0, 64, 127]]
    asym = QuantizedTensor.from_float(w, QuantSpec("uint8", "tensor", scale_dtype="float32"))
    assert asym.int_repr().dtype == torch.uint8
    q = asym.int_repr()[0].tolist()
    assert q[0] == 0 and q[3] >= 254  # the rounded integer zero-point may shift the grid
    assert q[1] == int(asym.zero_point.item())  # 0.0 maps to the zero-point exactly


def test_conv_weight_per_output_channel():
    w = torch.randn(8, 3, 3, 3)
    qt = QuantizedTensor.from_float(w, "w8")
    assert qt.scale.shape == (8, 1)
    assert qt.dequantize().shape == w.shape
    assert sqnr_db(w, qt.dequantize()) > 38


def test_repr_mentions_spec_and_bits():
    text = repr(QuantizedTensor.from_float(torch.randn(4, 128), "w4g128"))
    assert "uint4-g128-asym" in text and "bits_per_weight" in text


def test_dequantize_matches_fake_quantize_for_every_preset():
    w = torch.randn(32, 256)
    for name in PRESETS:
        spec = preset(name)
        assert torch.equal(QuantizedTensor.from_float(w, spec).dequantize(),
                           fake_quantize(w, spec)), name


def test_to_and_clone_keep_the_stored_dtypes_and_share_nothing():
    qt = QuantizedTensor.from_float(torch.randn(16, 128), "w4g64")
    assert qt.to("cpu") is qt and qt.to(dtype=torch.float32) is qt
    half = qt.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.scale.dtype == qt.scale.dtype  # not rounded
    assert torch.equal(half.dequantize(torch.float32), qt.dequantize())
    copy = qt.clone()
    assert torch.equal(copy.dequantize(), qt.dequantize())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(
        copy.stored_tensors().values(), qt.stored_tensors().values(), strict=True))
    meta = qt.to("meta")
    assert meta.qdata.is_meta and meta.shape == qt.shape
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        qt.to(dtype=torch.int8)
