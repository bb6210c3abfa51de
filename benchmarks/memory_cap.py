"""Quantize a model several times larger than an imposed memory cap, layer by layer from disk.

The fixture LMs are small (72 MiB in float32), so this builds a wider and deeper Llama with the
19M fixture's tokenizer and random weights (a memory demonstration, not an accuracy claim):
hidden 2048, MLP 2048, 16 blocks, vocab 8192 (~500M parameters, ~1.9 GiB in float32), written
as float32 safetensors shards of at most 256 MB. Then GPTQ w4g128 runs in a fresh process under
``RLIMIT_AS`` = (virtual size after imports) + cap, once from the folder (``lowbit.quantize(path)``:
one block in float at a time) and once after loading the whole float model, reusing
``benchmarks/llm.py``'s cap runner. Writes benchmarks/results/memory_cap.md.

    python benchmarks/memory_cap.py [--caps 1024] [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line  # noqa: E402
from llm import cap_section, memory_cap_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "models" / "llama-19m-shakespeare-mix"
OUT = ROOT / "benchmarks" / "results" / "memory_cap.md"


def build_model(folder: Path, layers: int, hidden: int, mlp: int) -> int:
    """A random-weight Llama with the fixture's tokenizer, saved as float32 shards; its bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                  head_dim=64, dtype="float32")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="256MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE / name, folder / name)
    return sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="1024", help="comma-separated caps above baseline, MiB")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=2048)
    ap.add_argument("--algorithm", default="gptq")
    ap.add_argument("--keep", type=Path, default=None, help="build (or reuse) the model here")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    tmp = None
    folder = args.keep
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-big-")
        folder = Path(tmp.name)
    try:
        if not (folder / "config.json").exists():
            fp32_bytes = build_model(folder, args.layers, args.hidden, args.mlp)
        else:
            from safetensors import safe_open

            fp32_bytes = 0
            for shard in folder.glob("*.safetensors"):
                with safe_open(shard, "pt") as f:
                    fp32_bytes += sum(4 * _numel(f.get_slice(k).get_shape()) for k in f.keys())
        shard_mb = max(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        print(f"model: {fp32_bytes / 2**30:.2f} GiB float32 in {folder}", flush=True)
        # GPTQ needs at least in_features calibration tokens for a full-rank Hessian
        calib_samples = -(-max(args.hidden, args.mlp) // 512) + 1
        rows = memory_cap_runs(folder, caps, calib_samples, 512, args.algorithm)
    finally:
        if tmp is not None:
            tmp.cleanup()
    lines = [
        "# Quantizing a model larger than the memory cap", "",
        f"Machine: {machine_line()}. Written by `benchmarks/memory_cap.py --caps {args.caps} "
        f"--layers {args.layers}`.", "",
        f"Model: a Llama with hidden {args.hidden}, MLP {args.mlp}, {args.layers} blocks, vocab "
        f"8192 (the 19M fixture's tokenizer), random weights: **{fp32_bytes / 2**20:,.0f} MiB "
        f"in float32**, stored as float32 safetensors shards of at most {shard_mb:.0f} MiB. "
        "Random weights make this a memory demonstration only (no accuracy claim).", "",
        *(line.replace("2 x 512", f"{calib_samples} x 512")
          for line in cap_section(rows, args.algorithm, fp32_bytes)[2:]), "",
        "Reading: every cap here is below the float32 model's size. Loading the model "
        "first cannot fit; `lowbit.quantize(path)` reads one block's tensors from the shards, "
        "quantizes them, keeps only the packed weights and moves on. `RLIMIT_AS` caps virtual "
        "memory, which is stricter than RSS: safetensors maps a whole shard, so the shard size "
        "counts against the cap.", "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    main()
