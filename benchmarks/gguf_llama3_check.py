"""Does llama.cpp compute what lowbit computes for a GGUF with Llama 3's rotary scaling and
tokenizer split? An exactness check of the export, not an accuracy benchmark.

A tiny random Llama (2 layers, hidden 128, 4 heads / 2 KV heads, head_dim 32) with Llama 3's
rotary scaling (theta 500000, factor 8, low / high frequency factors 1 / 4, original context
8192) and a tokenizer with Llama 3's split regex (the fixture's BPE vocabulary and merges) is
exported F32 with ``lowbit.save(format="gguf")``, and once more without its ``rope_freqs``
tensor (what the export would be without the scaling). llama.cpp (``--llama-python``: a venv
with llama-cpp-python and numpy) evaluates 600 positions of the val text; the table gives the
largest |logit difference| to lowbit's float model, and whether llama.cpp's tokenizer (read from
the GGUF) gives the HF ids on 20,000 characters of text.

    .venv/bin/python benchmarks/gguf_llama3_check.py --llama-python /tmp/llama-venv/bin/python

Writes benchmarks/results/gguf_llama3_check.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gguf_llama3_check.md"
POSITIONS = 600


def llama_side(job_file: Path) -> None:
    """In the llama.cpp venv: logits and token ids of each GGUF, written next to the job."""
    import llama_cpp
    import numpy as np

    job = json.loads(job_file.read_text())
    want = np.load(job["logits"])
    out = {"version": llama_cpp.__version__, "rows": {}}
    for name, path in job["files"].items():
        llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=1024, logits_all=True,
                              verbose=False)
        llm.eval(job["seq"])
        got = np.array(llm.scores[: len(job["seq"])])
        ids = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
        out["rows"][name] = {"max_diff": float(np.abs(got - want).max()),
                             "scale": float(np.abs(want).max()),
                             "tokenizer_ok": [int(i) for i in ids] == job["ids"]}
    (job_file.parent / "result.json").write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np
    import torch
    from _machine import SHARED, VAL, machine_line, run_llama_job
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    import lowbit.io.gguf as lowbit_gguf
    from lowbit.models.hf import load_hf_model

    fixture = SHARED / "models" / "llama-3m-shakespeare-mix"
    work = Path(tempfile.mkdtemp(prefix="lowbit-llama3-"))
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=131072, rope_parameters=rope)
    LlamaForCausalLM(config).save_pretrained(work / "hf")
    spec = json.loads((fixture / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": lowbit_gguf.LLAMA3_SPLIT},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    (work / "hf" / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixture / name, work / "hf" / name)
    model, tokenizer, _ = load_hf_model(work / "hf")
    text = VAL.read_text(encoding="utf-8")[:20_000] + " 1234567 12 abc's WE'RE  \n\n  x"
    ids = tokenizer(text)["input_ids"]
    seq = torch.tensor([ids[:POSITIONS]])
    with torch.no_grad():
        np.save(work / "logits.npy", model(seq).logits[0].numpy())
    lowbit.save(model, work / "f32", format="gguf", float_dtype=torch.float32)
    lowbit_gguf._rope_freq_factors = lambda *a, **k: None  # the export without the scaling
    lowbit.save(model, work / "no-rope-freqs", format="gguf", float_dtype=torch.float32)
    files = {"F32 with rope_freqs (lowbit's export)": str(work / "f32" / "model.gguf"),
             "F32 without rope_freqs (control)": str(work / "no-rope-freqs" / "model.gguf")}
    job = {"files": files, "logits": str(work / "logits.npy"), "seq": seq[0].tolist(),
           "text": text, "ids": ids}
    result = run_llama_job(args.llama_python, __file__, work, job)
    lines = ["# Llama 3 rotary scaling and tokenizer in llama.cpp", "",
             f"Written by `benchmarks/gguf_llama3_check.py` on {date.today().isoformat()}. "
             f"Machine: {machine_line()}. llama-cpp-python {result['version']} (llama.cpp built "
             "from source here).", "",
             "A tiny random Llama with Llama 3's rotary scaling (theta 500000, factor 8, low / "
             "high frequency factors 1 / 4, original context 8192; head_dim 32, GQA 4 / 2) and "
             "Llama 3's split regex over the fixture's BPE vocabulary, exported F32. Logits: "
             f"llama.cpp vs lowbit's float model on {POSITIONS} positions of "
             f"{VAL.name}; tokenizer: llama.cpp's ids (from the GGUF) vs HF's on "
             f"{len(text):,} characters ({len(ids):,} tokens).", "",
             "| GGUF | max abs logit diff | largest abs logit | tokenizer ids equal |",
             "|---|---:|---:|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['max_diff']:.2g} | {row['scale']:.3g} | "
                     f"{'yes' if row['tokenizer_ok'] else 'NO'} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-job":
        llama_side(Path(sys.argv[2]))
    else:
        sys.exit(main())
