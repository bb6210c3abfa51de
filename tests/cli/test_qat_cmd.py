"""`lowbit qat` through typer's CliRunner: a short run saves a loadable model, resume, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.cli import app  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    if not (LLAMA_3M / "config.json").exists() or not VAL_TEXT.is_file():
        pytest.skip(f"fixture model {LLAMA_3M} or {VAL_TEXT} is absent")
    path = tmp_path_factory.mktemp("qat") / "train.txt"
    path.write_text(VAL_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def _run(*args: str):
    return runner.invoke(app, ["qat", str(LLAMA_3M), *args])


def test_qat_run_saves_a_loadable_quantized_model(text_file, tmp_path):
    out = tmp_path / "out"
    r = _run("--text", str(text_file), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
             "--train", "scales", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "steps 0->3" in r.output
    model = lowbit.load(out)
    names = [type(m).__name__ for m in model.modules()]
    assert "QuantLinear" in names
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_w8a8_static_qat_learns_activation_steps_and_saves(text_file, tmp_path):
    out = tmp_path / "out"
    r = _run("--text", str(text_file), "--scheme", "w8a8-static", "--steps", "2",
             "--batch-size", "2", "--seq-len", "32", "-o", str(out))
    assert r.exit_code == 0, r.output
    model = lowbit.load(out)
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.spec.act is not None and not lin.spec.act.dynamic
    assert float(lin.input_scale) != 1.0  # set from calibration, then learned
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_resume_continues_from_the_checkpoint(text_file, tmp_path):
    out = tmp_path / "out"
    common = ["--text", str(text_file), "--batch-size", "2", "--seq-len", "32",
              "--checkpoint-every", "2", "-o", str(out)]
    # An interrupted run: emulate the kill by writing the checkpoint of a 2-step run only.
    from lowbit.cli import qat_cmd

    saved = {}
    real = qat_cmd._save_checkpoint

    def keep_first(path, state):
        if not saved:
            saved["step"] = state["step"]
            real(path, state)
            raise KeyboardInterrupt  # killed right after the first checkpoint

    qat_cmd._save_checkpoint = keep_first
    try:
        r = _run("--steps", "4", *common)
    finally:
        qat_cmd._save_checkpoint = real
    assert r.exit_code != 0 and saved["step"] == 2
    assert (out / "checkpoints" / "last.pt").is_file()
    r = _run("--steps", "4", "--resume", *common)
    assert r.exit_code == 0, r.output
    assert "steps 2->4" in r.output
    # The finished run keeps its checkpoint: a longer run continues from step 4.
    r = _run("--steps", "5", "--resume", *common)
    assert r.exit_code == 0, r.output
    assert "steps 4->5" in r.output
    assert isinstance(lowbit.load(out), torch.nn.Module)


def test_bad_inputs(text_file, tmp_path):
    r = _run("--text", str(text_file), "--steps", "0", "-o", str(tmp_path / "a"))
    assert r.exit_code == 2 and "--steps 0" in r.output
    r = _run("--text", str(text_file), "--scheme", "nf4g64", "--steps", "1",
             "-o", str(tmp_path / "b"))
    assert r.exit_code == 2 and "codebook" in r.output
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.", encoding="utf-8")
    r = _run("--text", str(short), "--steps", "1", "-o", str(tmp_path / "c"))
    assert r.exit_code == 2 and "shorter than one batch" in r.output
    r = _run("--text", str(text_file), "--resume", "--steps", "1", "-o", str(tmp_path / "d"))
    assert r.exit_code == 2 and "no checkpoint" in r.output


def test_nan_loss_keeps_the_last_checkpoint(text_file, tmp_path):
    out = tmp_path / "out"
    r = _run("--text", str(text_file), "--steps", "50", "--batch-size", "2", "--seq-len", "32",
             "--lr", "1e30", "--weight-lr", "1e30", "--checkpoint-every", "1", "-o", str(out))
    assert r.exit_code == 2, r.output
    assert "diverged" in r.output and "last good checkpoint" in r.output
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_takes_this_runs_learning_rates_and_refuses_other_settings(text_file, tmp_path):
    out = tmp_path / "out"
    common = ["--text", str(text_file), "--batch-size", "2", "--seq-len", "32",
              "--checkpoint-every", "1", "-o", str(out)]
    assert _run("--steps", "1", *common).exit_code == 0
    before = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    r = _run("--steps", "2", "--resume", "--lr", "0.001", "--weight-lr", "1e-6", *common)
    assert r.exit_code == 0, r.output
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    rates = [(a["lr"], b["lr"]) for a, b in zip(after["optimizer"]["param_groups"],
                                                before["optimizer"]["param_groups"], strict=True)]
    ratios = sorted({round(new / old, 6) for new, old in rates})
    assert ratios == [0.01, 0.05]  # weights 1e-6 / 1e-4, scales 0.001 / 0.02
    r = _run("--steps", "3", "--resume", "--scheme", "w4g128", *common)
    assert r.exit_code == 2
    assert "--resume: --scheme is 'w4g128', the checkpoint" in r.output
    assert "trained with 'w2g64'" in r.output


def test_output_is_checked_before_training(text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _run("--text", str(text_file), "--steps", "1", "-o", ".")
    assert r.exit_code == 2 and "current folder" in r.output
    assert not (tmp_path / "checkpoints").exists()


def test_default_exclude_keeps_gpt2_embeddings_and_head_in_float():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.cli.qat_cmd import _embeddings_and_head

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                       n_positions=16))
    assert _embeddings_and_head(model) == ["transformer.wte", "transformer.wpe", "lm_head"]
