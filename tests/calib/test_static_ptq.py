import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.calib import as_batches
from lowbit.kernels import KERNELS, Kernel
from lowbit.nn import QuantLinear
from lowbit.observers import get_observer
from lowbit.quant import QParams, fake_quantize
from lowbit.spec import QuantSpec

UINT8_STATIC = QuantSpec(format="uint8", granularity="tensor", symmetric=False,
                         scale_dtype="float32", zero_dtype="float32")
ASYM_SPEC = lowbit.preset("w8a8-static").replace(act=UINT8_STATIC)


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def static_is_supported(qt, x):
    return qt.spec.act is not None and not qt.spec.act.dynamic


def simulated_static_linear(x, qt, bias, cache):
    """Fake-quantized activations with the calibrated qparams, then the reference product."""
    zero = None if qt.act_zero_point is None else qt.act_zero_point.reshape(1, 1)
    qp = QParams(scale=qt.act_scale.reshape(1, 1), zero_point=zero)
    xq = fake_quantize(x.reshape(-1, x.shape[-1]), qt.spec.act, qp).reshape(x.shape)
    return F.linear(xq, qt.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def real_static_kernel_registered() -> bool:
    probe = QuantLinear.from_float(nn.Linear(8, 4), "w8a8-static").qweight
    probe.act_scale = torch.ones(1)
    return any(k.supports(probe, torch.zeros(1, 8)) for k in KERNELS.values())


def test_static_spec_needs_calib():
    with pytest.raises(ValueError, match="quantizes activations statically .*pass calib="):
        lowbit.quantize(toy_model(), "w8a8-static")


def test_unknown_observer_fails_before_swapping():
    model = toy_model()
    with pytest.raises(ValueError, match="unknown observer"):
        lowbit.quantize(model, "w8a8-static", calib=torch.randn(4, 8), observer="median")
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("spec", ["w8a8-static", ASYM_SPEC], ids=["sym", "asym"])
@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_input_qparams_equal_the_observer_output(spec, observer):
    model = toy_model()
    calib = torch.randn(32, 8)
    batches = as_batches(calib)  # what quantize runs: the same batches, the same order
    assert len(batches) > 1
    with torch.no_grad():
        inputs = {"0": batches, "2": [torch.relu(model[0](b)) for b in batches]}
    lowbit.quantize(model, spec, calib=calib, observer=observer)
    for name, xs in inputs.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        obs = get_observer(observer)
        for x in xs:
            obs.update(x)
        expected = obs.qparams(module.spec.act)
        assert torch.equal(module.input_scale, expected.scale.reshape(1))
        if module.spec.act.has_zero_point:
            assert torch.equal(module.input_zero_point, expected.zero_point.reshape(1).float())
        else:
            assert not hasattr(module, "input_zero_point")
    note = " ".join(model.lowbit_summary.notes)
    assert f"observer {observer!r}" in note and "32 sequences" in note


def test_calib_is_ignored_for_weight_only_and_dynamic_specs():
    for spec in ("w8", "w8a8"):
        model = lowbit.quantize(toy_model(), spec, calib=torch.randn(4, 8))
        assert any("calib ignored" in n for n in model.lowbit_summary.notes)
        assert not hasattr(model[0], "input_scale")


def test_static_spec_state_dict_carries_the_calibrated_scale():
    model = lowbit.quantize(toy_model(), "w8a8-static", calib=torch.randn(16, 8))
    state = model.state_dict()
    assert torch.equal(state["0.input_scale"], model[0].input_scale)
    assert float(state["0.input_scale"]) != 1.0  # not the constructor's placeholder


def _top1_agreement(fixture_lm, observer):
    tok, load, text = fixture_lm
    model = load()
    ids = tok(text[20_000:22_000], return_tensors="pt", add_special_tokens=False).input_ids
    test = ids[:, :256]
    with torch.no_grad():
        ref = model(test).logits
    lowbit.quantize(model, "w8a8-static", calib=[text[:3_000]], tokenizer=tok,
                    observer=observer, exclude=["*embed_tokens"],
                    calib_samples=3, calib_seq_len=128)  # a few hundred tokens
    assert len(model.lowbit_summary.quantized) == 29  # 4 layers x 7 projections + lm_head
    assert any("3 sequences (384 tokens)" in n for n in model.lowbit_summary.notes)
    with torch.no_grad():
        out = model(test).logits
    return float((out.argmax(-1) == ref.argmax(-1)).float().mean())


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_fixture_lm_simulated_static_int8_stays_close(fixture_lm, observer, monkeypatch):
    """Calibrated scales are good: int8 fake-quantized activations keep the top-1 token."""
    monkeypatch.setitem(KERNELS, "test-simulated-static",
                        Kernel("test-simulated-static", simulated_static_linear,
                               static_is_supported, priority=-100))
    assert _top1_agreement(fixture_lm, observer) > 0.9


@pytest.mark.skipif(not real_static_kernel_registered(),
                    reason="no registered kernel supports static-activation specs yet")
def test_fixture_lm_static_int8_with_registered_kernel(fixture_lm):
    assert _top1_agreement(fixture_lm, "minmax") > 0.9
