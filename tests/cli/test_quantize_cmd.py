"""`lowbit quantize` through typer's CliRunner on the real app: outputs, and one-line failures."""

from __future__ import annotations

import json
import shutil
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
def llama_dir() -> Path:
    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    return LLAMA_3M


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """Tiny random GPT-2 folder: n_embd=64, so a group of 128 divides no layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _fails(args: list[str], out: Path, *expected: str) -> str:
    """Run, expect a non-zero exit with one stderr line containing ``expected``, no OUT_DIR."""
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.lowbit-*"))
    return lines[0]


def test_quantize_llama_w4g128(llama_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(llama_dir), "--scheme", "w4g128",
                            "--exclude", "lm_head", "-o", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("modules quantized", "29: 29 x uint4-g128-asym", "lm_head",
                 "excluded by 'lm_head'", "bits per weight", "4.250", "file on disk",
                 "kernel (CPU, fp32 input)"):
        assert text in r.stdout, text
    size = (out / "model.safetensors").stat().st_size
    assert f"{size:,} B" in r.stdout
    assert (out / "tokenizer.json").is_file()
    model = lowbit.load(out)
    assert len(model.lowbit_summary.quantized) == 29
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]


def test_dynamic_mode_gpt2(gpt2_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(gpt2_dir), "--scheme", "w8", "--mode", "dynamic",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    specs = {g["spec_str"] for g in json.loads((out / "config.json").read_text())
             ["quantization_config"]["config_groups"].values()}
    # Linear/Conv1D get W8A8; the embeddings (no activation path) their weight part.
    assert specs == {"int8-ch-sym+a:int8-token-sym-dyn", "int8-ch-sym"}
    model = lowbit.load(out)
    assert model.transformer.h[0].mlp.c_fc.spec.act.dynamic


def test_static_mode_llama(llama_dir, tmp_path):
    if not VAL_TEXT.exists():
        pytest.skip(f"{VAL_TEXT} is absent")
    calib = tmp_path / "calib.txt"
    calib.write_text(VAL_TEXT.read_text()[:3000])
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(llama_dir), "--scheme", "w8", "--mode", "static",
                            "--calib", str(calib), "--observer", "minmax", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "calibrated with observer 'minmax'" in r.stdout
    model = lowbit.load(out)
    assert float(model.model.layers[0].self_attn.q_proj.input_scale) != 1.0


def test_not_a_model_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    _fails(["quantize", str(tmp_path / "stuff"), "-o", str(tmp_path / "q")],
           tmp_path / "q", "stuff", "no config.json")


def test_truncated_safetensors(llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(llama_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4096])
    _fails(["quantize", str(folder), "-o", str(tmp_path / "q")], tmp_path / "q", "truncated")


def test_unknown_scheme(gpt2_dir, tmp_path):
    _fails(["quantize", str(gpt2_dir), "--scheme", "w5g7", "-o", str(tmp_path / "q")],
           tmp_path / "q", "unknown scheme 'w5g7'", "w4g128")


def test_group_size_not_dividing_a_layer(gpt2_dir, tmp_path):
    _fails(["quantize", str(gpt2_dir), "--scheme", "w4g128", "-o", str(tmp_path / "q")],
           tmp_path / "q", "layer 'transformer.wte'", "does not divide", "--exclude")


def test_nan_weights(gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(gpt2_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("h.0.mlp.c_proj.weight"))
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _fails(["quantize", str(folder), "--scheme", "w8", "-o", str(tmp_path / "q")],
           tmp_path / "q", "transformer.h.0.mlp.c_proj", "NaN")


def test_empty_calib_file(gpt2_dir, tmp_path):
    calib = tmp_path / "empty.txt"
    calib.write_text("\n\n  \n")
    _fails(["quantize", str(gpt2_dir), "--scheme", "w8", "--mode", "static", "--calib",
            str(calib), "-o", str(tmp_path / "q")], tmp_path / "q", "empty.txt", "empty")


def test_mode_and_scheme_conflicts(gpt2_dir, tmp_path):
    out = tmp_path / "q"
    _fails(["quantize", str(gpt2_dir), "--scheme", "w4g128", "--mode", "dynamic", "-o",
            str(out)], out, "uint4", "--scheme w8")
    _fails(["quantize", str(gpt2_dir), "--scheme", "w8", "--mode", "static", "-o", str(out)],
           out, "--calib")
    _fails(["quantize", str(gpt2_dir), "--scheme", "w8", "--observer", "kl", "-o", str(out)],
           out, "--observer", "static")


def test_refuses_non_empty_out_dir(gpt2_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = runner.invoke(app, ["quantize", str(gpt2_dir), "--scheme", "w8", "-o", str(out)])
    assert r.exit_code != 0 and "not empty" in r.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = runner.invoke(app, ["quantize", str(gpt2_dir), "--scheme", "w8", "-o", str(out),
                            "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()


@pytest.mark.parametrize("scheme", ["w7a8", "w8a7"])
def test_one_pass_w8a8_presets_quantize_as_they_are(scheme):
    from lowbit.cli.quantize_cmd import resolve_scheme

    spec, mode = resolve_scheme(scheme, None)
    assert mode == "dynamic" and spec == lowbit.preset(scheme)
    assert resolve_scheme(scheme, "dynamic")[0] == lowbit.preset(scheme)


def test_mode_alone_picks_the_w8a8_preset_of_that_mode() -> None:
    from lowbit.cli.quantize_cmd import resolve_scheme

    assert resolve_scheme(None, None) == (lowbit.preset("w4g128"), "weight")
    assert resolve_scheme(None, "dynamic") == (lowbit.preset("w8a8"), "dynamic")
    assert resolve_scheme(None, "static") == (lowbit.preset("w8a8-static"), "static")
    with pytest.raises(ValueError, match="--mode dynamic runs int8 x int8"):
        resolve_scheme("w4g128", "dynamic")
    with pytest.raises(ValueError, match="--mode 'dyn'; allowed"):
        resolve_scheme(None, "dyn")


def test_errors_escaping_a_command_are_one_line_and_exit_2(tmp_path, capsys,
                                                           monkeypatch) -> None:
    """main()'s catch-all (an error a command does not catch itself, an OSError) prints one
    line and exits 2, with no traceback."""
    from lowbit.cli import main

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    for argv in (["size", "--params", "inf"], ["formats", "--nope"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
    monkeypatch.setattr("lowbit.cli.size_cmd.size_from_params", unwritable)  # uncaught OSError
    with pytest.raises(SystemExit) as done:
        main(["size", "--params", "7e9"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error: PermissionError" in err and "Traceback" not in err


def test_include_matching_no_module_writes_nothing(gpt2_dir, tmp_path):
    out = tmp_path / "q"
    _fails(["quantize", str(gpt2_dir), "--scheme", "w8", "--include", "model.layers.*", "-o",
            str(out)], out, "no module left to quantize", "not matched by include",
           "'transformer.wte', ")


def test_a_spec_string_works_as_scheme(gpt2_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(gpt2_dir), "-s", "int4-g32-sym", "--exclude",
                            "transformer.wte", "-o", str(out)])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["spec_str"] for g in config["config_groups"].values()] == ["int4-g32-sym"]


def test_float_tensors_are_stored_in_the_sources_dtype(llama_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(llama_dir), "-s", "w4g128", "--exclude", "lm_head",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "stored in float16, as in the source checkpoint" in r.output
    source_bytes = sum(p.stat().st_size for p in llama_dir.glob("*.safetensors"))
    assert (out / "model.safetensors").stat().st_size < 0.6 * source_bytes  # fp32 norms / head:
    # 0.93x


def test_bits_mixes_the_given_specs_by_measured_kl(llama_dir, tmp_path):
    out = tmp_path / "mixed"
    r = runner.invoke(app, ["quantize", str(llama_dir), "-s", "w2g64,w4g128", "--bits", "3.5",
                            "--calib", str(VAL_TEXT), "--include", "model.layers.0.*",
                            "--sensitivity-samples", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "mixed precision: " in r.stdout and "w2g64" in r.stdout
    assert "layers in model.layers.*" in r.stdout and "sum (predicted)" in r.stdout
    model = lowbit.load(out)
    specs = {m.spec for m in model.lowbit_summary.quantized}
    assert specs == {"uint2-g64-asym", "uint4-g128-asym"}
    quantized = model.lowbit_summary.quantized
    stored = sum(m.bytes_after for m in quantized)
    numel = sum(model.get_submodule(m.name).qweight.numel for m in quantized)
    assert 3.0 < stored * 8 / numel <= 3.5
    config = json.loads((out / "config.json").read_text())
    assert any(n.startswith("mixed precision: each layer's spec chosen among w2g64, w4g128")
               and "on 1,024 positions" in n for n in config["quantization_config"]["notes"])


@pytest.mark.parametrize(("args", "expected"), [
    (["-s", "w2g64,w4g128", "--bits", "3"], "--bits measures each layer on --calib FILE"),
    (["-s", "w4g128", "--bits", "3", "--calib", "VAL"], "name two or more, comma-separated"),
    (["-s", "w2g64,w4g128"], "pass --bits N to choose"),
    (["-s", "w2g64,w4g128", "--bits", "3", "--mode", "dynamic", "--calib", "VAL"],
     "--mode dynamic is not allowed"),
    (["-s", "w2g64,w8a8", "--bits", "3", "--calib", "VAL"], "quantizes activations"),
    (["-s", "w2g64,nope", "--bits", "3", "--calib", "VAL"], "unknown scheme 'nope'"),
    (["-s", "w2g64,w4g128", "--bits", "2", "--calib", "VAL", "--include", "model.layers.0.*"],
     "bits=2.0 is below 2.500"),
    (["-s", "w2g64,w4g128", "--bits", "3", "--calib", "VAL", "--calib-samples", "4"],
     "--calib-samples sizes the calibration of --mode static or a calibration algorithm"),
    (["-s", "w4g128", "--sensitivity-samples", "8"], "pass --bits"),
    (["-s", "w4g128", "--calib-seq-len", "64"], "--calib-seq-len sizes the calibration"),
])
def test_bad_mixed_precision_options_fail_in_one_line(llama_dir, tmp_path, args, expected):
    args = [str(VAL_TEXT) if a == "VAL" else a for a in args]
    _fails(["quantize", str(llama_dir), *args, "-o", str(tmp_path / "q")], tmp_path / "q",
           expected)


def test_a_sensitivity_file_serves_other_budgets_and_is_checked(llama_dir, tmp_path):
    from lowbit.calib import Sensitivity

    file = tmp_path / "sens.json"
    common = ["quantize", str(llama_dir), "--calib", str(VAL_TEXT), "--include",
              "model.layers.1.*", "--sensitivity-samples", "2", "--sensitivity-file", str(file)]
    r = runner.invoke(app, [*common, "-s", "w2g64,w4g128", "--bits", "3", "-o",
                            str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    measured = Sensitivity.load(file)
    assert len(measured.layers) == 7 and measured.n_positions == 512
    r = runner.invoke(app, [*common, "-s", "w4g128,w2g64", "--bits", "3.5", "-o",
                            str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert f"read the measurement from {file}" in r.stderr
    assert Sensitivity.load(file) == measured
    _fails([*common, "-s", "w2g64,w8", "--bits", "3", "-o", str(tmp_path / "c")],
           tmp_path / "c", "measured for candidates", "delete it")
    _fails([*common[:-4], "--sensitivity-samples", "3", "--sensitivity-file", str(file),
            "-s", "w2g64,w4g128", "--bits", "3", "-o", str(tmp_path / "d")],
           tmp_path / "d", "measured on other calibration tokens")
    file.write_text("{}")
    _fails([*common, "-s", "w2g64,w4g128", "--bits", "3", "-o", str(tmp_path / "e")],
           tmp_path / "e", "not a lowbit sensitivity file")


def test_a_moe_folder_is_quantized_block_by_block_expert_by_expert(llama_dir, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    moe = tmp_path / "moe"
    MixtralForCausalLM(MixtralConfig(
        vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, num_local_experts=4)).save_pretrained(moe)
    shutil.copy(llama_dir / "tokenizer.json", moe)
    shutil.copy(llama_dir / "tokenizer_config.json", moe)
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(moe), "-s", "w4g64", "--algorithm", "gptq",
                            "--calib", str(VAL_TEXT), "--calib-samples", "4",
                            "--calib-seq-len", "64", "--exclude", "lm_head", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "memory bounded: blocks were read from disk one at a time" in r.stdout
    assert "13: 13 x uint4-g64-asym" in r.stdout  # 4 attention, 4 experts x 2, the embedding
    assert "split into one Linear per expert projection" in r.stdout
    loaded = lowbit.load(out)
    assert "model.layers.0.mlp.experts.3.down_proj" in {m.name for m in
                                                         loaded.lowbit_summary.quantized}
    args = ["quantize", str(moe), "-s", "w4g64", "--algorithm", "gptq", "--calib",
            str(VAL_TEXT), "--calib-samples", "4", "--calib-seq-len", "64", "--overwrite",
            "-o", str(out)]
    r = runner.invoke(app, [*args, "--moe-calibration", "routed"])
    assert r.exit_code == 0, r.output
    assert "calibrated on the tokens routed to them" in r.stdout
    r = runner.invoke(app, [*args, "--moe-calibration", "some"])
    assert r.exit_code != 0 and "--moe-calibration some; allowed: all, routed" in r.output


def test_compressed_tensors_format(llama_dir, tmp_path):
    """--format compressed-tensors keeps the embedding float (the format's runtimes quantize
    Linear layers) and writes what transformers loads."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    r = runner.invoke(app, ["quantize", str(llama_dir), "-s", "w4g128-sym", "--exclude",
                            "lm_head", "--format", "compressed-tensors", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 Embedding / Conv layers stay float" in r.stderr
    assert "28: 28 x int4-g128-sym" in r.stdout and "compressed-tensors (read by vLLM" in r.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "pack-quantized")
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


@pytest.mark.parametrize(("extra", "expected"), [
    (["--format", "onnx"], "--format onnx; allowed: lowbit, compressed-tensors, gguf"),
    (["-s", "nf4g64", "--format", "compressed-tensors"], "spec nf4-g64 has no compressed"),
    (["--algorithm", "gptq-act-order", "--calib", str(VAL_TEXT), "--format",
      "compressed-tensors"], "use --algorithm gptq"),
])
def test_compressed_tensors_refusals_come_first(llama_dir, tmp_path, extra, expected):
    out = tmp_path / "ct"
    args = ["quantize", str(llama_dir), "-s", "w4g128", "-o", str(out), *extra]
    if "-s" in extra:
        args[2:4] = []  # the -s of extra
    _fails(args, out, expected)


def test_compressed_tensors_refuses_moe_experts_before_quantizing(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "moe"
    MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)).save_pretrained(folder)
    out = tmp_path / "ct"
    _fails(["quantize", str(folder), "-s", "int4-g32-sym", "--format", "compressed-tensors",
            "-o", str(out)], out, "mixture-of-experts layers", "--exclude '*experts*'")
    r = runner.invoke(app, ["quantize", str(folder), "-s", "int4-g32-sym", "--format",
                            "compressed-tensors", "--exclude", "*experts*", "-o", str(out)])
    assert r.exit_code == 0, r.output


def test_gguf_format(llama_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "g"
    r = runner.invoke(app, ["quantize", str(llama_dir), "-s", "q4_0", "--exclude", "lm_head",
                            "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "gguf (model.gguf: llama.cpp" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf"]


def test_gguf_k_quants_take_llama_cpps_fallback_where_rows_are_short(llama_dir, tmp_path):
    """q4_k on the 3M fixture (rows of 128 and 384 weights, no whole 256-weight super-block):
    every such layer takes Q5_0, as llama.cpp's quantizer does, and the run says so."""
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "g"
    r = runner.invoke(app, ["quantize", str(llama_dir), "-s", "q4_k", "-a", "gptq", "--calib",
                            str(VAL_TEXT), "--calib-samples", "4", "--calib-seq-len", "512",
                            "--exclude", "lm_head", "--format", "gguf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "take q5_0 (llama.cpp's fallback for uint4-g32-asym-fz-dq6x8)" in r.output
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors
             if t.name != "output.weight" and len(t.shape) > 1}
    assert types == {"Q5_0"}


@pytest.mark.parametrize(("scheme", "model", "expected"), [
    ("w4g128", "llama", "spec uint4-g128-asym has no GGUF block type"),
    ("q4_0", "gpt2", "model_type 'gpt2': the GGUF export writes llama"),
])
def test_gguf_refusals_come_first(llama_dir, gpt2_dir, tmp_path, scheme, model, expected):
    out = tmp_path / "g"
    folder = llama_dir if model == "llama" else gpt2_dir
    _fails(["quantize", str(folder), "-s", scheme, "--format", "gguf", "-o", str(out)], out,
           expected)


def test_gguf_checks_the_tokenizer_before_quantizing(llama_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, folder / name)
    out = tmp_path / "g"
    _fails(["quantize", str(folder), "-s", "q4_0", "-a", "gptq", "--calib", str(VAL_TEXT),
            "--format", "gguf", "-o", str(out)], out,
           "has neither tokenizer.json nor tokenizer.model")
