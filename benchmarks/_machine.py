"""Shared by the benchmark scripts: the machine a benchmark ran on (stated in every results
table), the evaluation protocol's command-line options and the fixtures' paths."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE_19M = SHARED / "models" / "llama-19m-shakespeare-mix"
VAL = SHARED / "data" / "shakespeare-mix-val.txt"  # calibration text
TEST = SHARED / "data" / "shakespeare-mix-test.txt"  # held out: perplexity, KL


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {gpu}"
    )


def protocol_parser(description: str, model: Path, out: Path) -> argparse.ArgumentParser:
    """A parser with the options every LM-evaluating benchmark takes: --model, --quick, --out
    and the perplexity protocol (--context, --stride, --max-tokens)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=model)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None)
    return parser


def run_llama_job(python: Path, script: str, work: Path, job: dict) -> dict:
    """Run ``script --llama-job work/job.json`` with the llama.cpp venv's ``python`` (a venv
    without torch, so the script's llama.cpp half imports nothing of lowbit's) and return the
    ``work/result.json`` it writes."""
    (work / "job.json").write_text(json.dumps(job))
    done = subprocess.run([str(python), script, "--llama-job", str(work / "job.json")],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp side failed:\n{done.stderr[-3000:]}")
    return json.loads((work / "result.json").read_text())


class CachedReference:
    """The float model's logits per input batch, computed once and reused for every config."""

    def __init__(self, model) -> None:
        self.model, self.cache = model, {}

    def __call__(self, input_ids):
        key = (tuple(input_ids.shape), hash(input_ids.numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids).logits
        return self.cache[key]


def spec_grid_parser(description: str, out: Path, specs: list[str],
                     algorithms: list[str]) -> argparse.ArgumentParser:
    """:func:`protocol_parser` on the 19M fixture plus a specs x algorithms grid's options:
    --specs, --algorithms (comma-separated) and --calib-samples."""
    parser = protocol_parser(description, FIXTURE_19M, out)
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--specs", default=",".join(specs), help="comma-separated specs")
    parser.add_argument("--algorithms", default=",".join(algorithms))
    return parser


def spec_grid_data(args: argparse.Namespace):
    """``(max_tokens, calib_samples, float model, TEST ids, calibration ids, reference)`` of a
    :func:`spec_grid_parser` run: ``--quick`` scores 4,096 tokens with 8 calibration samples,
    else everything (or ``--max-tokens``) with 32; ``reference`` is a :class:`CachedReference`."""
    max_tokens = args.max_tokens or (4096 if args.quick else None)
    calib_samples = args.calib_samples or (8 if args.quick else 32)
    float_model, ids, calib = fixture_eval_data(args.model, calib_samples)
    return max_tokens, calib_samples, float_model, ids, calib, CachedReference(float_model)


def fixture_eval_data(model: Path, calib_samples: int, seq_len: int = 512):
    """``(float32 model in eval mode, TEST ids [T], VAL calibration ids [calib_samples,
    seq_len])`` of a model folder, tokenized whole with its own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    calib_ids = tok(VAL.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    calib = calib_ids[: calib_samples * seq_len].reshape(calib_samples, seq_len)
    float_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    return float_model, ids, calib
