"""Mixed precision on the fixture LM: measured per-layer sensitivity against uniform specs and
against mixes chosen without measuring, at the same bits per weight.

For each budget, three mixes of the same candidates fill it: lowbit's plan
(``lowbit.mixed_precision``: each layer's KL with only that layer quantized, then the least
summed KL that fits), a rule of thumb (``down_proj`` and ``v_proj`` layers promoted first, as
llama.cpp's K-quant mixes do, then the rest in module order) and random promotion orders. Every
model is scored against the float model on the test split; the plan's predicted KL (the sum of
its layers' single-layer KLs on the calibration tokens) is shown next to the measured one.

    .venv/bin/python benchmarks/mixed.py            # llama-19m, writes benchmarks/results/mixed.md
    .venv/bin/python benchmarks/mixed.py --quick    # fewer test tokens, fewer budgets
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported as a module

from _machine import FIXTURE_19M as DEFAULT_MODEL  # noqa: E402
from _machine import TEST, VAL  # noqa: E402

EXCLUDE = ["lm_head", "*embed*"]
CANDIDATES = ["w2g64", "w3g128", "w4g128", "w8"]
BUDGETS = [3.0, 3.5, 3.75, 4.5]
RULE_FIRST = ("down_proj", "v_proj")  # promoted first by the rule of thumb


def fill(layers, order: list[int], lo: str, hi: str, bits: float) -> dict[str, str]:
    """Every layer at ``lo``; layers promoted to ``hi`` in ``order`` while the budget holds."""
    budget = bits * sum(la.n_weights for la in layers) / 8
    choice = {la.name: lo for la in layers}
    used = sum(la.nbytes[lo] for la in layers)
    for i in order:
        extra = layers[i].nbytes[hi] - layers[i].nbytes[lo]
        if used + extra <= budget:
            used += extra
            choice[layers[i].name] = hi
    return choice


def bits_of(layers, choice: dict[str, str]) -> float:
    return (sum(la.nbytes[choice[la.name]] for la in layers) * 8
            / sum(la.n_weights for la in layers))


def predicted(layers, choice: dict[str, str]) -> float:
    return sum(la.damage[choice[la.name]] for la in layers)


def main() -> None:
    from _machine import protocol_parser

    ap = protocol_parser(__doc__.splitlines()[0], DEFAULT_MODEL,
                         ROOT / "benchmarks" / "results" / "mixed.md")
    ap.add_argument("--sens-samples", type=int, default=8)
    ap.add_argument("--sens-seq-len", type=int, default=256)
    ap.add_argument("--random-orders", type=int, default=3)
    ap.add_argument("--gptq", action="store_true",
                    help="also GPTQ (32 x 512 calibration tokens) on the uniform specs and plans")
    args = ap.parse_args()
    if not (args.model / "config.json").exists() or not TEST.exists():
        raise SystemExit(f"model or test split absent ({args.model}, {TEST})")
    max_tokens = args.max_tokens or (4096 if args.quick else 32768)
    budgets = [3.5] if args.quick else BUDGETS

    import torch
    from _machine import CachedReference, machine_line
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit.calib import allocate_bits, measure_sensitivity
    from lowbit.eval import compare_logits

    tok = AutoTokenizer.from_pretrained(args.model)
    test_ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    val_ids = tok(VAL.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n_sens = args.sens_samples * args.sens_seq_len
    sens_ids = val_ids[:n_sens].reshape(args.sens_samples, args.sens_seq_len)
    gptq_ids = val_ids[: 32 * 512].reshape(32, 512)
    float_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = CachedReference(float_model)
    machine, load0 = machine_line(), os.getloadavg()[0]

    start = time.perf_counter()
    sens = measure_sensitivity(float_model, CANDIDATES, sens_ids, exclude=EXCLUDE,
                               show_progress=True)
    sens_seconds = time.perf_counter() - start
    layers = sens.layers
    keys = [str(s) for s in sens.candidates]
    print(f"sensitivity of {len(layers)} layers x {len(keys)} candidates: {sens_seconds:.1f} s",
          flush=True)

    def score(choice: dict[str, str], algorithm: str = "rtn") -> object:
        model = copy.deepcopy(float_model)
        specs = {name: lowbit.as_spec(spec) for name, spec in choice.items()}
        lowbit.quantize(model, specs, algorithm=algorithm,
                        calib=gptq_ids if algorithm != "rtn" else None)
        return compare_logits(model.eval(), reference, test_ids, context=args.context,
                              stride=args.stride, max_tokens=max_tokens)

    rows = []  # (budget label, mix, bits, predicted KL, algorithm, comparison or list of them)

    def add(label, mix, choice, algorithm="rtn"):
        cmp = score(choice, algorithm)
        rows.append((label, mix, bits_of(layers, choice), predicted(layers, choice), algorithm,
                     cmp))
        print(f"{label:>8} {mix:34s} {algorithm:5s} bits {rows[-1][2]:.3f} "
              f"KL {cmp.kl_mean:.4f} ppl {cmp.ppl:.3f}", flush=True)

    for key in keys:
        add("uniform", key, {la.name: key for la in layers})
    by_bits = sorted(keys, key=lambda k: sens.layers[0].nbytes[k])
    rule = sorted(range(len(layers)), key=lambda i: (
        not layers[i].name.endswith(RULE_FIRST), i))
    plans = {}
    for bits in budgets:
        plans[bits] = plan = allocate_bits(sens, bits)
        add(f"{bits:g}", "measured (lowbit.mixed_precision)",
            {n: str(s) for n, s in plan.choice.items()})
        lo = max((k for k in by_bits
                  if bits_of(layers, {la.name: k for la in layers}) <= bits),
                 key=by_bits.index)
        hi = by_bits[by_bits.index(lo) + 1]
        add(f"{bits:g}", f"rule of thumb ({lo.split('-')[0]} -> {hi.split('-')[0]})",
            fill(layers, rule, lo, hi, bits))
        randoms = []
        for seed in range(args.random_orders):
            order = list(range(len(layers)))
            random.Random(seed).shuffle(order)
            choice = fill(layers, order, lo, hi, bits)
            randoms.append((choice, score(choice)))
        mid = sorted(randoms, key=lambda r: r[1].kl_mean)[len(randoms) // 2]
        rows.append((f"{bits:g}", f"random order (median of {len(randoms)})",
                     bits_of(layers, mid[0]), predicted(layers, mid[0]), "rtn",
                     [r[1] for r in randoms]))
        print(f"{bits:>8} random: KL " + ", ".join(f"{r[1].kl_mean:.4f}" for r in randoms),
              flush=True)
    if args.gptq:
        for key in keys[1:3]:
            add("uniform", key, {la.name: key for la in layers}, "gptq")
        for bits in budgets:
            add(f"{bits:g}", "measured (lowbit.mixed_precision)",
                {n: str(s) for n, s in plans[bits].choice.items()}, "gptq")
    write(args, rows, sens, sens_seconds, machine, (load0, os.getloadavg()[0]), max_tokens,
          plans)
    print(f"wrote {args.out}")


def write(args, rows, sens, sens_seconds, machine, loads, max_tokens, plans) -> None:
    fp_ppl = rows[0][5].reference_ppl
    lines = [f"# Mixed precision on {args.model.name}", "",
             f"Machine: {machine}. Written by `benchmarks/mixed.py"
             + (" --quick" if args.quick else "") + (" --gptq" if args.gptq else "") + "`.", "",
             "Protocol:",
             f"- quantized: every Linear of the decoder blocks ({len(sens.layers)} layers); "
             "`lm_head` and the embeddings stay in float; bits per weight count codes, scales "
             "and zero-points of the quantized layers.",
             f"- candidates: {', '.join(f'`{s}`' for s in sens.candidates)}.",
             f"- sensitivity: `lowbit.calib.measure_sensitivity` on {sens.n_sequences} x "
             f"{args.sens_seq_len} tokens from the start of `shakespeare-mix-val.txt`: the mean "
             "KL(float || model with one layer quantized, RTN) per token, for every layer and "
             f"candidate; {sens_seconds:.0f} s for {len(sens.layers) * len(sens.candidates)} "
             "layer x candidate forwards (the blocks before a layer replay their float outputs).",
             f"- test: `shakespeare-mix-test.txt`, first {max_tokens:,} tokens, context "
             f"{args.context}, stride {args.stride} (`lowbit.eval.compare_logits`); KL = mean "
             "KL(float || quantized) per token in nats, top-1 = share of positions where both "
             f"models' argmax agree. Float model perplexity: {fp_ppl:.3f}.",
             "- mixes at a budget: all layers start at the largest candidate that fits it "
             "uniformly, then layers are promoted to the next candidate while the budget holds: "
             "in lowbit's measured order (which may also use other candidates), in a rule of "
             f"thumb's order ({' and '.join(RULE_FIRST)} first, then module order), or in "
             f"random orders (seeds 0-{args.random_orders - 1}; the row shows the median by KL "
             "and the range).",
             "- predicted KL: the sum of the chosen layers' single-layer KLs on the calibration "
             "tokens (what the allocation minimizes); measured KL is on the test tokens.",
             f"- load average (1 min): {loads[0]:.1f} at the start, {loads[1]:.1f} at the end.",
             "",
             "| budget | mix | algorithm | bits/weight | ppl | KL | top-1 | predicted KL |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, mix, bits, pred, algorithm, cmp in rows:
        if isinstance(cmp, list):
            kls = sorted(c.kl_mean for c in cmp)
            mid = sorted(cmp, key=lambda c: c.kl_mean)[len(cmp) // 2]
            lines.append(f"| {label} | {mix} | {algorithm} | {bits:.3f} | {mid.ppl:.3f} | "
                         f"{mid.kl_mean:.4f} ({kls[0]:.4f}-{kls[-1]:.4f}) | "
                         f"{mid.top1_agreement:.3f} | {pred:.4f} |")
        else:
            lines.append(f"| {label} | {mix} | {algorithm} | {bits:.3f} | {cmp.ppl:.3f} | "
                         f"{cmp.kl_mean:.4f} | {cmp.top1_agreement:.3f} | {pred:.4f} |")
    lines += ["", "## What the plans chose", ""]
    for bits, plan in plans.items():
        lines += [f"### {bits:g} bits per weight ({plan.bits_per_weight:.3f} used)", "",
                  plan.table(), ""]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
