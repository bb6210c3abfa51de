"""QAT vs PTQ on the fixture LM: perplexity on the held-out test split, steps, wall time.

Protocol: llama-3m-shakespeare-mix in float32; embeddings and lm_head stay in float (as
benchmarks/llm.py). PTQ: RTN, HQQ and GPTQ (calibration on the val split) via lowbit.quantize;
"best PTQ" is the lowest perplexity. QAT: lowbit.qat.prepare (LSQ, HQQ init), trained on random
windows of the VAL split (never test) with KL distillation from the float model, Adam, then
lowbit.qat.convert; "scales" trains only scales (EfficientQAT E2E-QP), "all" weights too.
Perplexity: the first --max-tokens tokens of the TEST split, context 256, stride 256.

Run: .venv/bin/python benchmarks/qat.py [--steps 60] -> benchmarks/results/qat.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "llama-3m-shakespeare-mix"
EXCLUDE = ["lm_head", "*embed*"]


def main() -> None:
    import lowbit
    from lowbit.eval.perplexity import perplexity
    from lowbit.models.hf import load_hf_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--weight-lr", type=float, default=1e-4)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--specs", default="w3g128,w2g64")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_hf_model(MODEL)
    read = lambda split: tok(  # noqa: E731
        (SHARED / "data" / f"shakespeare-mix-{split}.txt").read_text(encoding="utf-8"),
        return_tensors="pt").input_ids[0]
    val, test = read("val"), read("test")

    def ppl(m) -> float:
        with torch.no_grad():
            return perplexity(m, test, 256, 256, max_tokens=args.max_tokens, batch_size=8).ppl

    fp = ppl(model)
    print(f"fp32 {fp:.3f}", flush=True)
    calib = val[: 64 * 256].reshape(64, 256)
    rows = []
    for spec in args.specs.split(","):
        ptq = {}
        for alg in ("rtn", "hqq", "gptq"):
            t = time.perf_counter()
            q = lowbit.quantize(copy.deepcopy(model), spec, algorithm=alg, exclude=EXCLUDE,
                                calib=calib if alg == "gptq" else None)
            ptq[alg] = (ppl(q), time.perf_counter() - t)
            print(spec, alg, ptq[alg], flush=True)
            rows.append((spec, f"PTQ {alg}", ptq[alg][0], "", ptq[alg][1]))
        best_alg = min(ptq, key=lambda a: ptq[a][0])
        best = ptq[best_alg][0]
        for train in ("scales", "all"):
            t = time.perf_counter()
            m = lowbit.qat.prepare(copy.deepcopy(model), spec, learn="lsq", init="hqq",
                                   train=train, exclude=EXCLUDE)
            opt = lowbit.qat.make_optimizer(m, args.lr, args.weight_lr)
            losses = lowbit.qat.train(m, val, args.steps, opt, batch_size=args.batch_size,
                                      seq_len=args.seq_len, teacher=model)
            lowbit.qat.convert(m)
            seconds = time.perf_counter() - t
            p = ppl(m)
            closed = (best - p) / max(best - fp, 1e-9)
            print(spec, train, p, f"{closed:.0%}", losses[0], losses[-1], flush=True)
            rows.append((spec, f"QAT {train} (vs best PTQ = {best_alg})", p, f"{closed:.0%}",
                         seconds))
    from _machine import machine_line

    lines = [
        "# QAT vs PTQ (llama-3m-shakespeare-mix, CPU)", "",
        f"Machine: {machine_line()}", "",
        f"Protocol: float32 model; embeddings and lm_head in float. Perplexity on the first "
        f"{args.max_tokens:,} tokens of the TEST split (context 256, stride 256). GPTQ "
        "calibrates on 64 x 256 tokens of the VAL split. QAT: LSQ step sizes (HQQ init), "
        f"{args.steps} Adam steps of {args.batch_size} x {args.seq_len} random VAL windows, KL "
        f"distillation from the fp32 model, lr {args.lr} (scales, relative to their size) / "
        f"{args.weight_lr} (weights); "
        "'scales' trains only the quantization scales (E2E-QP), 'all' the weights too. Time: "
        "wall seconds of quantize (PTQ) or prepare+train+convert (QAT), one run each, on a "
        "shared machine (other processes may have competed for the cores: compare times only "
        "loosely); perplexities are deterministic.",
        "", f"fp32 perplexity: **{fp:.3f}**", "",
        "| spec | method | test ppl | PTQ->fp32 gap closed | time s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {s} | {m} | {p:.3f} | {c} | {t:.1f} |" for s, m, p, c, t in rows]
    lines += ["", "'gap closed' = (ppl_bestPTQ - ppl_QAT) / (ppl_bestPTQ - ppl_fp32) at the same "
              "spec. Target: >= 50% at w2g64."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
