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

NO_EMBED = ["lm_head", "*embed_tokens"]




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
    model, _, ids = llama
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
    model, _, ids = llama
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
    model, _, ids = llama
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
    model, _, ids = llama
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
    (_tiny_llama, {"spec": "int4-g32-sym-dq6x8", "exclude": NO_EMBED}, "double-quantized"),
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
    with pytest.raises(ValueError, match="format='onnx'; allowed: lowbit, compressed-tensors"):
        lowbit.save(_tiny_llama(), tmp_path / "a", format="onnx")
    with pytest.raises(ValueError, match="no quantized layers"):
        lowbit.save(_tiny_llama(), tmp_path / "b", format="compressed-tensors")
    assert not any(tmp_path.iterdir())


# ---- reading compressed-tensors checkpoints ------------------------------------------------

@pytest.mark.parametrize("spec", ["w4g128", "w4g128-sym", "w3g128", "w8", "fp8", "w8a8",
                                  "w8a8-static", "w4a8"])
def test_lowbit_load_reads_the_export_bit_exactly(llama, tmp_path, spec):
    model, _, ids = llama
    q = _quantized(model, spec, exclude=NO_EMBED, calib=[ids] if "static" in spec else None)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    loaded = lowbit.load(tmp_path / "ct")
    for name, module in q.named_modules():
        if isinstance(module, lowbit.nn.QuantLinear):
            # full_range says how scales were chosen, which compressed-tensors does not record
            assert loaded.get_submodule(name).spec == module.spec.replace(full_range=False)
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))
    assert len(loaded.lowbit_summary.quantized) == 28


def _ct_checkpoint(model: nn.Module, folder: Path, bits: int, symmetric: bool,
                   group_size: int) -> None:
    """A checkpoint made by compressed-tensors' own compressor (lowbit only writes the float
    tensors): qparams from its calculate_qparams, codes from its PackedQuantizationCompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import save_file

    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group",
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = module.weight.detach()
            grouped = w.reshape(w.shape[0], -1, group_size)
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            local = {"weight": w, "weight_scale": scale.half(),
                     "weight_zero_point": zero.round().to(torch.int8)}
            del state[f"{name}.weight"]
            for key, t in PackedQuantizationCompressor.compress(local, scheme).items():
                state[f"{name}.{key}"] = t.contiguous()
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads(model.config.to_json_string())
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"],
        quantization_status="compressed").model_dump(mode="json")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (2, False)])
def test_lowbit_load_reads_compressed_tensors_own_checkpoints(tmp_path, bits, symmetric):
    """Codes and qparams as compressed-tensors writes them: lowbit's weights equal what
    compressed-tensors decompresses (transformers' dequantize path), and lowbit's kernels run
    them."""
    model = _tiny_llama()
    _ct_checkpoint(model, tmp_path / "ct", bits, symmetric, group_size=32)
    ours = lowbit.load(tmp_path / "ct")
    theirs = _from_pretrained(tmp_path / "ct", dequantize=True)
    down = ours.model.layers[0].mlp.down_proj
    assert down.spec.bits == bits and down.spec.symmetric is symmetric
    for name, module in ours.named_modules():
        if isinstance(module, lowbit.nn.QuantLinear):
            want = theirs.get_submodule(name).weight
            torch.testing.assert_close(module.qweight.dequantize().half().float(), want,
                                       rtol=0, atol=0)
    ids = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-2)


def test_act_order_g_idx_is_read(llama):
    """weight_g_idx (GPTQ act-order groups, as vLLM reads them) maps onto lowbit's g_idx."""
    from lowbit.io.compressed_tensors import _quantized_tensor
    from lowbit.spec import as_spec

    model, _, ids = llama
    calib = torch.randint(0, model.config.vocab_size, (4, 128),
                          generator=torch.Generator().manual_seed(0))
    q = _quantized(model, "w4g128-sym", algorithm="gptq-act-order", calib=calib,
                   include=["*layers.0.mlp.down_proj"])
    qt = q.model.layers[0].mlp.down_proj.qweight
    assert qt.g_idx is not None
    tensors = {"weight_packed": pack_int32(qt.codes(), 4), "weight_scale": qt.scale,
               "weight_g_idx": qt.g_idx.long()}
    got = _quantized_tensor("down_proj", as_spec("w4g128-sym"), "pack-quantized", qt.shape,
                            tensors, torch.float32)
    assert torch.equal(got.dequantize(), qt.dequantize())


def test_unreadable_compressed_tensors_configs(tmp_path):
    model = _tiny_llama()
    _ct_checkpoint(model, tmp_path / "ct", 4, True, group_size=32)
    config_file = tmp_path / "ct" / "config.json"
    config = json.loads(config_file.read_text())
    for change, message in (
        ({"format": "nvfp4-pack-quantized"}, "format 'nvfp4-pack-quantized'; lowbit reads"),
        ({"transform_config": {"x": 1}}, "rotations"),
        ({"quantization_status": "frozen"}, "status 'frozen'"),
    ):
        qc = {**config["quantization_config"], **change}
        if "format" in change:
            qc["config_groups"] = {"group_0": {**qc["config_groups"]["group_0"],
                                               "format": None}}
        config_file.write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(ValueError, match=message):
            lowbit.load(tmp_path / "ct")


def _mixed_export(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = _tiny_llama(tie=True)
    q = _quantized(model, {"*down_proj": "w8", "*": "w4g128-sym"}, exclude=["*embed_tokens"])
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    return q, tmp_path / "ct"


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_most_specific_target_wins(tmp_path):
    """A class-name group listed first and a regex group for down_proj: compressed-tensors and
    vLLM give down_proj the regex group's scheme, and so does lowbit.load."""
    q, folder = _mixed_export(tmp_path)

    def by_class_then_regex(config):
        groups = config["quantization_config"]["config_groups"]
        w4, w8 = sorted(groups.values(), key=lambda g: g["weights"]["num_bits"])
        config["quantization_config"]["config_groups"] = {
            "group_0": {**w4, "targets": ["Linear"]},
            "group_1": {**w8, "targets": ["re:.*down_proj$"]}}

    _edit_config(folder, by_class_then_regex)
    loaded = lowbit.load(folder)
    assert str(loaded.model.layers[0].mlp.down_proj.spec) == "int8-ch-sym"
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))


def test_quantized_head_of_a_tied_config_stays_quantized(tmp_path):
    q, folder = _mixed_export(tmp_path)
    _edit_config(folder, lambda c: c.update(tie_word_embeddings=True))
    loaded = lowbit.load(folder)
    assert isinstance(loaded.lm_head, lowbit.nn.QuantLinear)
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))


def test_strategy_inferred_from_group_size(tmp_path):
    _, folder = _mixed_export(tmp_path)

    def no_strategy(config):
        for group in config["quantization_config"]["config_groups"].values():
            w = group["weights"]
            w["strategy"], w["group_size"] = None, w["group_size"] or -1

    _edit_config(folder, no_strategy)
    loaded = lowbit.load(folder)
    assert str(loaded.model.layers[0].mlp.down_proj.spec) == "int8-ch-sym"
    assert str(loaded.model.layers[0].mlp.up_proj.spec) == "int4-g128-sym"


def test_missing_tensors_are_named(tmp_path):
    """config.json builds MLP biases the file does not hold: one line naming the tensor."""
    q = _quantized(_tiny_llama(), "w4g128-sym", exclude=NO_EMBED)
    lowbit.save(q, tmp_path / "ct", format="compressed-tensors")
    _edit_config(tmp_path / "ct", lambda c: c.update(mlp_bias=True))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.\w+_proj.bias is missing"):
        lowbit.load(tmp_path / "ct")


def test_export_config_for_vllm_fusions_and_conv1d(tmp_path):
    """GPT-2's float Conv1D layers are listed in ignore (vLLM builds them as Linear layers);
    q / k / v of different specs (one fused layer in vLLM) warn."""
    q = _quantized(_gpt2(), "w8", include=["lm_head"])
    lowbit.save(q, tmp_path / "gpt2", format="compressed-tensors")
    ignore = json.loads((tmp_path / "gpt2" / "config.json").read_text())[
        "quantization_config"]["ignore"]
    assert "transformer.h.0.attn.c_attn" in ignore and "transformer.h.0.mlp.c_fc" in ignore
    q = _quantized(_tiny_llama(), {"*q_proj": "w8", "*": "w4g128-sym"}, exclude=NO_EMBED)
    with pytest.warns(UserWarning, match="q_proj, model.layers.0.self_attn.k_proj"):
        lowbit.save(q, tmp_path / "split", format="compressed-tensors")
