"""lowbit.save(format="compressed-tensors"): read back by compressed-tensors itself and by
transformers, against lowbit's own forward; refusals in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io.compressed_tensors import pack_int32

pytest.importorskip("transformers")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"
NO_EMBED = ["lm_head", "*embed_tokens"]


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    from lowbit.models.hf import load_hf_model

    model, tokenizer, _ = load_hf_model(LLAMA_3M)
    ids = torch.tensor([tokenizer("To be, or not to be: that is the question.")["input_ids"]])
    return model, ids


def _tiny_llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _quantized(model: nn.Module, spec, **kwargs) -> nn.Module:
    import copy

    return lowbit.quantize(copy.deepcopy(model), spec, **kwargs)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")


def _from_pretrained(path: Path, dequantize: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize \
        else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_matches_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    for rows, cols in ((3, 1), (2, 33), (5, 100), (1, 256)):
        codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.uint8)
        theirs = ct_helpers.pack_to_int32((codes.to(torch.int16) - (1 << bits - 1))
                                          .to(torch.int8), bits)
        assert torch.equal(pack_int32(codes, bits), theirs)


@pytest.mark.parametrize("spec", ["w4g128-sym", "w8", "fp8"])
def test_transformers_runs_the_export_exactly(llama, tmp_path, spec):
    """Symmetric int and fp8 weights: transformers' compressed path computes lowbit's logits."""
    model, ids = llama
    q = _quantized(model, spec, exclude=NO_EMBED)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["ignore"] == ["lm_head"]
    assert list(config["config_groups"].values())[0]["targets"] == ["Linear"]
    loaded = _from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(_logits(loaded, ids), _logits(q, ids), rtol=0, atol=2e-5)


@pytest.mark.parametrize("spec", ["w4g128", "w3g128", "w2g64", "w4g128-sym"])
def test_compressed_tensors_decompresses_lowbit_weights(llama, tmp_path, spec):
    """Asymmetric zero-points (packed along the output dim) and 2/3-bit streams, decoded by
    compressed-tensors' own decompressor: lowbit's weights up to fp16 rounding of (q - z) * s,
    the product compressed-tensors forms in the scale's dtype."""
    model, ids = llama
    q = _quantized(model, spec, exclude=NO_EMBED)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    loaded = _from_pretrained(tmp_path / "ct", dequantize=True)
    for name, module in q.named_modules():
        if isinstance(module, lowbit.nn.QuantLinear):
            want = module.qweight.dequantize()
            got = loaded.get_submodule(name).weight
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, ids), _logits(q, ids), rtol=0, atol=1e-2)


def test_gptq_export_keeps_its_quality(llama, tmp_path):
    model, ids = llama
    calib = torch.randint(0, model.config.vocab_size, (4, 128),
                          generator=torch.Generator().manual_seed(0))
    q = _quantized(model, "w4g128-sym", algorithm="gptq", calib=calib, exclude=NO_EMBED)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "ct"), ids), _logits(q, ids),
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-static"])
def test_w8a8_export(llama, tmp_path, spec):
    """Int8 weights stored as ``weight``; the activations as compressed-tensors' args.
    transformers' emulation rounds activations on another grid (absmax / 127.5, lowbit and
    vLLM's kernels absmax / 127): two draws of W8A8's rounding noise, each as far from the
    float model as the other."""
    model, ids = llama
    calib = [ids] if spec.endswith("static") else None
    q = _quantized(model, spec, exclude=NO_EMBED, calib=calib)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert group["format"] == "int-quantized"
    assert group["input_activations"]["dynamic"] is (spec == "w8a8")
    loaded = _from_pretrained(tmp_path / "ct")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8
    ours, theirs, float_logits = _logits(q, ids), _logits(loaded, ids), _logits(model, ids)
    noise = (ours - float_logits).abs().max()
    assert (theirs - float_logits).abs().max() < 1.5 * noise
    assert (theirs - ours).abs().max() < 1.5 * noise


def test_mixed_specs_and_tied_head(tmp_path):
    """Two specs: one group each, targets by name; a quantized head of a tied model is untied
    in config.json, so the loader keeps it."""
    model = _tiny_llama(tie=True)
    ids = torch.randint(0, 128, (1, 12))
    q = _quantized(model, {"*mlp*": "w8", "*": "w4g128-sym"}, exclude=["*embed_tokens"])
    assert isinstance(q.lm_head, lowbit.nn.QuantLinear)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    groups = config["quantization_config"]["config_groups"]
    assert sorted(len(g["targets"]) for g in groups.values()) == [3, 5]
    assert "model.layers.0.mlp.up_proj" in [t for g in groups.values() for t in g["targets"]]
    torch.testing.assert_close(_logits(_from_pretrained(tmp_path / "ct"), ids), _logits(q, ids),
                               rtol=0, atol=2e-5)
    assert (tmp_path / "ct" / "README.md").read_text().count("AutoModelForCausalLM") == 2


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128,
                                      n_positions=32)).eval()


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    (_tiny_llama, {"spec": "nf4g64", "exclude": NO_EMBED}, "has no compressed-tensors form"),
    (_tiny_llama, {"spec": lowbit.QuantSpec(group_size=64, zero_point="float"),
                   "algorithm": "hqq", "exclude": NO_EMBED}, "fractional"),
    (_tiny_llama, {"spec": "w4g64"}, "exclude='model.embed_tokens'"),
    (_gpt2, {"spec": "w8", "exclude": ["*wte", "*wpe", "lm_head"]}, "Conv1D"),
])
def test_refusals_write_nothing(tmp_path, make, kwargs, message):
    spec = kwargs.pop("spec")
    q = _quantized(make(), spec, **kwargs)
    with pytest.raises(ValueError, match=message) as info:
        lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_act_order_groups_are_refused(tmp_path):
    model = _tiny_llama()
    calib = torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(0))
    q = _quantized(model, "w4g64", algorithm="gptq-act-order", calib=calib, exclude=NO_EMBED)
    with pytest.raises(ValueError, match="act_order"):
        lowbit.save(q, tmp_path / "ct", format="compressed-tensors")


def test_unknown_format_and_float_model(tmp_path):
    with pytest.raises(ValueError, match="format='gguf'; allowed: lowbit, compressed-tensors"):
        lowbit.save(_tiny_llama(), tmp_path / "a", format="gguf")
    with pytest.raises(ValueError, match="no quantized layers"):
        lowbit.save(_tiny_llama(), tmp_path / "b", format="compressed-tensors")
    assert not any(tmp_path.iterdir())
