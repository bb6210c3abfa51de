"""lowbit.save(format="gguf"): llama.cpp's file, read back by the gguf package and by
transformers' GGUF loader against lowbit's own forward; refusals with nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lowbit

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"




def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize(("spec", "block", "exact"), [
    ("q4_0", "Q4_0", True), ("q8_0", "Q8_0", True), ("q5_0", "Q5_0", True),
    ("q4_1", "Q4_1", False), ("q5_1", "Q5_1", False)])
def test_blocks_decode_to_lowbit_weights(llama, tmp_path, spec, block, exact):
    """ggml's own dequantization of each block type gives lowbit's weights (Q4_1 / Q5_1: the
    offset -s*z is rounded to fp16, within 2**-11 of it); q / k rows in ggml's rotary order."""
    from lowbit.io.gguf import _permute_rotary

    model, _, _ = llama
    q = lowbit.quantize(copy.deepcopy(model), spec, exclude=["lm_head", "*embed_tokens"])
    lowbit.save(q, tmp_path / "g", format="gguf")
    tensors = _tensors(tmp_path / "g" / "model.gguf")
    heads = model.config.num_attention_heads
    for gguf_name, name, permute in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj",
                                      0),
                                     ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj",
                                      heads)):
        t = tensors[gguf_name]
        assert t.tensor_type.name == block
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        qt = q.get_submodule(name).qweight
        want = qt.dequantize()
        if permute:
            want = _permute_rotary(want, permute)
        if exact:
            assert torch.equal(got, want)
        else:  # |m error| <= half an fp16 ulp of |s * z|
            bound = (qt.scale.float() * qt.zero_point.float()).abs().max() * 2.0**-11
            assert (got - want).abs().max() <= bound


@pytest.mark.parametrize(("spec", "qtype", "levels"), [("q4_0", "Q4_0", 16), ("q5_0", "Q5_0", 32)])
def test_rtn_blocks_follow_llama_cpps_own_quantizer(spec, qtype, levels):
    """lowbit's RTN q4_0 / q5_0 is ggml's rule (gguf's numpy port of quantize_row_q4_0): the
    block's largest-magnitude value on the lowest level, d = v / -(levels / 2). Codes differ
    only where ggml rounds with the unrounded d and lowbit with the stored fp16 one."""
    from gguf.quants import dequantize, quantize

    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.rand(64, 1) * 3
    ours = lowbit.QuantizedTensor.from_float(w, spec)
    blocks = quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    theirs = torch.from_numpy(dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)))
    d = torch.from_numpy(blocks.reshape(64, 16, -1)[..., :2].copy().view("float16")).float()
    scale = ours.scale.float().reshape(64, 16, 1)
    assert torch.equal(scale.sign(), d.sign())  # negative where the extreme is positive
    assert bool(((scale - d).abs() <= d.abs() * 2**-10).all())  # at most one fp16 ulp
    codes = torch.round(theirs.reshape(64, 16, 32) / d).clamp(-levels // 2, levels // 2 - 1)
    ours_codes = ours.codes().reshape(64, 16, 32).to(torch.int32) - levels // 2
    assert float((codes == ours_codes).float().mean()) > 0.995
    # lowbit rounds |d| up to fp16 (ggml: to nearest): the error differs by well under 1%
    ratio = float((ours.dequantize() - w).pow(2).mean() / (theirs - w).pow(2).mean())
    assert abs(ratio - 1) < 0.005


def test_transformers_runs_the_gguf_as_lowbit_does(llama, tmp_path):
    """transformers' GGUF loader (its own dequantization, tokenizer and q/k un-permutation):
    the same logits as lowbit's model for Q4_0, and the same token ids from the GGUF's
    tokenizer."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, ids = llama
    q = lowbit.quantize(copy.deepcopy(model), "q4_0", algorithm="gptq",
                        calib=torch.randint(0, 8192, (4, 128),
                                            generator=torch.Generator().manual_seed(0)))
    assert isinstance(q.model.embed_tokens, lowbit.nn.QuantEmbedding)  # token_embd as Q4_0
    result = lowbit.save(q, tmp_path / "g", format="gguf")
    assert result.file_bytes == (tmp_path / "g" / "model.gguf").stat().st_size
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf",
                                                  dtype=torch.float32)
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    text = open(SHARED / "data" / "shakespeare-mix-val.txt", encoding="utf-8").read()[:5000]
    assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"]
    card = (tmp_path / "g" / "README.md").read_text()
    assert "llama-cli -m" in card and "model.gguf" in card


def test_float_model_and_metadata(llama, tmp_path):
    model, tokenizer, ids = llama
    lowbit.save(model, tmp_path / "f", format="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "f" / "model.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == model.config.num_hidden_layers
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output.weight"] == "F16"


@pytest.mark.parametrize(("spec", "message"), [
    ("w4g128", "has no GGUF block type"),
    ("nf4g64", "has no GGUF block type"),
])
def test_refusals_write_nothing(llama, tmp_path, spec, message):
    model, _, _ = llama
    q = lowbit.quantize(copy.deepcopy(model), spec, include=["*layers.0.mlp*"])
    with pytest.raises(ValueError, match=message) as info:
        lowbit.save(q, tmp_path / "g", format="gguf")
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2': the GGUF export writes llama"):
        lowbit.save(model, tmp_path / "g", format="gguf")
    assert not any(tmp_path.iterdir())


def _tiny_folder(tmp_path: Path, **config) -> Path:
    """A tiny random Llama saved with the fixture's tokenizer files (GGUF needs a tokenizer)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = LlamaConfig(**{**fields, **config})
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(LLAMA_3M / name, folder / name)
    return folder


def _load(folder: Path):
    from lowbit.models.hf import load_hf_model

    return load_hf_model(folder)[0]


def _transformers_logits(folder: Path, ids):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf",
                                                 dtype=torch.float32)
    return _logits(model, ids)


def test_tied_model_keeps_a_head_quantized_apart(tmp_path):
    """tie_word_embeddings with the head quantized differently from the embedding: the head is
    written (llama.cpp falls back to token_embd only when output.weight is absent)."""
    model = _load(_tiny_folder(tmp_path, tie_word_embeddings=True))
    q = lowbit.quantize(model, {"lm_head": "q8_0", "*": "q4_0"})
    lowbit.save(q, tmp_path / "g", format="gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(
        str(tmp_path / "g" / "model.gguf")).tensors}
    assert (types["output.weight"], types["token_embd.weight"]) == ("Q8_0", "Q4_0")
    ids = torch.randint(0, 8192, (1, 9))
    assert torch.equal(_transformers_logits(tmp_path / "g", ids), _logits(q, ids))


@pytest.mark.parametrize(("spec", "block"), [("q2_k", "Q2_K"), ("q3_k", "Q3_K"), ("q4_k", "Q4_K"),
                                             ("q5_k", "Q5_K"), ("q6_k", "Q6_K")])
def test_k_quant_blocks_decode_to_lowbit_weights(tmp_path, spec, block):
    """k-quants (double-quantized scales) as ggml's super-blocks: gguf's own dequantization
    gives lowbit's weights (up to float32 rounding of ``d*sc*q - dmin*m``), and transformers'
    GGUF loader lowbit's logits, for RTN and GPTQ weights."""
    from lowbit.io.gguf import _permute_rotary

    model = _load(_tiny_folder(tmp_path, hidden_size=256, intermediate_size=512, head_dim=64))
    q = lowbit.quantize(model, spec, algorithm="gptq", include=["*layers*"],
                        calib=torch.randint(0, 8192, (4, 160),
                                            generator=torch.Generator().manual_seed(0)))
    result = lowbit.save(q, tmp_path / "g", format="gguf")
    tensors = _tensors(tmp_path / "g" / "model.gguf")
    for gguf_name, name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
                            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj")):
        t = tensors[gguf_name]
        assert t.tensor_type.name == block
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        want = q.get_submodule(name).qweight.dequantize()
        if name.endswith("q_proj"):
            want = _permute_rotary(want, 4)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    quantized = sum(m.qweight.nbytes for m in q.modules() if isinstance(m, lowbit.nn.QuantLinear))
    assert result.quantized_bytes == quantized  # ggml's blocks take lowbit's stored bytes
    ids = torch.randint(0, 8192, (1, 9), generator=torch.Generator().manual_seed(1))
    theirs, ours = _transformers_logits(tmp_path / "g", ids), _logits(q, ids)
    assert torch.allclose(theirs, ours, atol=1e-4 * float(ours.abs().max()))


def test_k_quant_rows_must_hold_whole_super_blocks(tmp_path):
    model = _load(_tiny_folder(tmp_path))  # hidden 64: no 256-weight super-block fits a row
    q = lowbit.quantize(model, "q4_k", include=["*layers*"])
    with pytest.raises(ValueError, match="has 64 inputs: Q4_K blocks hold 256 .* with q5_0"):
        lowbit.save(q, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()
    from lowbit.io.gguf import k_quant_fallbacks

    model = _load(tmp_path / "tiny")
    specs = k_quant_fallbacks(model, "q6_k")  # llama.cpp's fallback for Q6_K: Q8_0
    assert specs["*"] == lowbit.preset("q6_k") and set(list(specs.values())[:-1]) == {"q8_0"}
    q = lowbit.quantize(model, specs, include=["*layers*"])
    lowbit.save(q, tmp_path / "g", format="gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
             .tensors if t.name.startswith("blk") and len(t.shape) > 1}
    assert types == {"Q8_0"}
    assert k_quant_fallbacks(model, "q4_0") == {"*": lowbit.preset("q4_0")}


def test_biases_and_head_dim(tmp_path):
    """Llama with attention biases (q / k biases permuted like their rows) and a head_dim that
    is not hidden / heads (key_length / value_length written, as llama.cpp needs)."""
    from lowbit.io.gguf import _permute_rotary

    model = _load(_tiny_folder(tmp_path, attention_bias=True, head_dim=32))
    q = lowbit.quantize(model, "q4_0", include=["*layers*"])
    lowbit.save(q, tmp_path / "g", format="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["llama.attention.key_length"].parts[-1][0]) == 32
    tensors = {t.name: t for t in reader.tensors}
    bias = torch.from_numpy(tensors["blk.0.attn_q.bias"].data.copy())
    want = _permute_rotary(q.model.layers[0].self_attn.q_proj.bias.detach(), 4)
    assert torch.equal(bias, want)
    assert "blk.0.attn_v.bias" in tensors and "blk.0.attn_output.bias" in tensors


def test_tokenizer_types_and_refusals(tmp_path):
    import json

    folder = _tiny_folder(tmp_path)
    model = _load(folder)
    lowbit.save(model, tmp_path / "g", format="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    types = fields["tokenizer.ggml.token_type"]
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert int(types.parts[types.data[eos]][0]) == gguf.TokenType.CONTROL
    # written as the tokenizer behaves, whatever tokenizer_config says (llama.cpp's default
    # for an absent key is true with the llama-bpe pre-tokenizer)
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is False
    spec = json.loads((folder / "tokenizer.json").read_text())
    stripping = copy.deepcopy(spec)
    stripping["added_tokens"][0]["lstrip"] = True
    (folder / "tokenizer.json").write_text(json.dumps(stripping))
    with pytest.raises(ValueError, match="lstrip / rstrip"):
        lowbit.save(model, tmp_path / "h", format="gguf")
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="add_prefix_space"):
        lowbit.save(model, tmp_path / "h", format="gguf")
    assert not (tmp_path / "h").exists()


def test_llama3_tokenizer_and_rotary_scaling(tmp_path):
    """Llama 3's split pre-tokenizer is written as llama.cpp's "llama-bpe" and its rotary
    scaling as rope_freqs (default inverse frequencies over the model's own: 1 for high
    frequencies, the factor for the lowest). Checked once against llama.cpp itself (see
    docs/format.md); here against transformers' rotary module."""
    import json

    from lowbit.io.gguf import LLAMA3_SPLIT

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    folder = _tiny_folder(tmp_path, rope_parameters=rope, max_position_embeddings=131072)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    model = _load(folder)
    lowbit.save(model, tmp_path / "g", format="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"
    factors = torch.from_numpy(
        next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.copy())
    head_dim = model.config.head_dim
    default = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(factors.double(),
                               default / model.model.rotary_emb.inv_freq.double(),
                               rtol=1e-6, atol=0)
    assert factors[0] == 1.0 and factors[-1] == 8.0


def test_other_rotary_scaling_is_refused(tmp_path):
    folder = _tiny_folder(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type 'default' and 'llama3'"):
        lowbit.save(_load(folder), tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def _sentencepiece_folder(tmp_path: Path, vocab_size: int = 640, **trainer) -> Path:
    """A tiny random Llama with a SentencePiece BPE tokenizer trained on the fixture text (as
    Llama 2's: identity normalization, byte fallback, digits split), tokenizer.model plus the
    tokenizer.json transformers converts from it."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "sp"
    folder.mkdir(parents=True)
    text = (SHARED / "data" / "shakespeare-mix-val.txt").read_text(encoding="utf-8")[:200_000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    options = dict(model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True,
                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                   allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   minloglevel=2)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"),
                                   model_prefix=str(tmp_path / "sp"), **{**options, **trainer})
    (tmp_path / "sp.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
        '"unk_token": "<unk>", "add_bos_token": true}')
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # adds tokenizer.json
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer_is_written_as_llama_cpps_llama_vocab(tmp_path):
    """Pieces, scores and types from tokenizer.model as llama.cpp's converter reads them (ids
    past the model's 600 pieces padded UNUSED); transformers' GGUF tokenizer then gives the HF
    tokenizer's ids on the test text, and its GGUF model lowbit's logits."""
    from transformers import AutoTokenizer

    folder = _sentencepiece_folder(tmp_path)
    q = lowbit.quantize(_load(folder), "q4_0", include=["*layers*"])
    lowbit.save(q, tmp_path / "g", format="gguf")
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    fields = {f.name: f for f in reader.fields.values()}

    def text(name):
        return bytes(fields[name].parts[-1]).decode()

    assert (text("tokenizer.ggml.model"), text("tokenizer.ggml.pre")) == ("llama", "default")
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0])
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in fields["tokenizer.ggml.token_type"].data]
    assert types[1] == gguf.TokenType.CONTROL and types[3 + 0x0A] == gguf.TokenType.BYTE
    assert set(types[600:]) == {gguf.TokenType.UNUSED} and len(types) == 640
    scores = [float(fields["tokenizer.ggml.scores"].parts[i][0])
              for i in fields["tokenizer.ggml.scores"].data]
    assert scores[300] > scores[500]  # earlier merges score higher: llama.cpp merges by score
    hf = AutoTokenizer.from_pretrained(folder)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    sample = (SHARED / "data" / "shakespeare-mix-test.txt").read_text(encoding="utf-8")[:20_000]
    assert from_gguf(sample)["input_ids"] == hf(sample)["input_ids"]
    ids = torch.tensor([hf(sample[:400])["input_ids"]])
    assert torch.equal(_transformers_logits(tmp_path / "g", ids), _logits(q, ids))


@pytest.mark.parametrize(("trainer", "message"), [
    ({"model_type": "unigram"}, "SentencePiece UNIGRAM model"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalization 'nmt_nfkc'"),
    ({"remove_extra_whitespaces": True}, "removing extra whitespace"),
    ({"byte_fallback": False}, "without byte fallback"),
])
def test_sentencepiece_models_llama_cpp_would_split_otherwise_are_refused(tmp_path, trainer,
                                                                          message):
    folder = _sentencepiece_folder(tmp_path, **trainer)
    with pytest.raises(ValueError, match=message):
        lowbit.save(_load(folder), tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_a_hf_tokenizer_that_splits_unlike_its_sentencepiece_model_is_refused(tmp_path):
    import json

    folder = _sentencepiece_folder(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_prefix_space"] = False  # HF adds no "\u2581" prefix, tokenizer.model does
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llama.cpp would follow tokenizer.model"):
        lowbit.save(_load(folder), tmp_path / "g", format="gguf")


def test_which_tokenizer_file_is_written(tmp_path):
    """A byte-level BPE tokenizer.json wins over a tokenizer.model (what HF loads); a
    tokenizer.model that is not SentencePiece, alone, is a one-line refusal; lstrip on an added
    token of tokenizer_config.json (not in tokenizer.json) is refused as well."""
    import json

    folder = _tiny_folder(tmp_path)
    (folder / "tokenizer.model").write_bytes(b"IHRoZQ== 0\nIGE= 1\n")  # tiktoken-style
    model = _load(folder)
    lowbit.save(model, tmp_path / "g", format="gguf")
    fields = {f.name: f for f in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).fields
              .values()}
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        lowbit.save(model, tmp_path / "h", format="gguf")
    sp = _sentencepiece_folder(tmp_path / "sp-case")
    config = json.loads((sp / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"0": {"content": "<unk>", "special": True, "lstrip": True,
                                            "rstrip": False, "normalized": False,
                                            "single_word": False}}
    (sp / "tokenizer_config.json").write_text(json.dumps(config))
    (sp / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="lstrip / rstrip"):
        lowbit.save(_load(sp), tmp_path / "h", format="gguf")
    assert not (tmp_path / "h").exists()
