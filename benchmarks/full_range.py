"""Full-range symmetric scales (``-full``) against absmax ones, on the fixture LM.

A symmetric b-bit grid has levels -2**(b-1) .. 2**(b-1) - 1. The absmax rule
``s = absmax / (2**(b-1) - 1)`` never uses the lowest level; the full-range rule (llama.cpp's
Q4_0 / Q5_0) puts the block's largest-magnitude value on it, ``s = v / -2**(b-1)`` with v's sign.
Each pair of rows differs only in that rule: same bits per weight, same kernels.

    .venv/bin/python benchmarks/full_range.py            # writes benchmarks/results/full_range.md
    .venv/bin/python benchmarks/full_range.py --quick    # 4,096 test tokens, 8 calibration samples
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import TEST, VAL, machine_line, spec_grid_data, spec_grid_parser  # noqa: E402

SPECS = ["int4-g128-sym", "int4-g32-sym", "int3-g128-sym", "int2-g64-sym", "int8-ch-sym"]
ALGORITHMS = ["rtn", "hqq", "gptq"]
EXCLUDE = ["lm_head", "*embed*"]


def main() -> None:
    args = spec_grid_parser(__doc__.splitlines()[0],
                            ROOT / "benchmarks" / "results" / "full_range.md", SPECS,
                            ALGORITHMS).parse_args()
    import torch
    from tqdm import tqdm

    import lowbit
    from lowbit.eval import compare_logits
    from lowbit.spec import as_spec

    max_tokens, calib_samples, float_model, ids, calib, reference = spec_grid_data(args)

    specs = args.specs.split(",")
    for text in specs:
        spec = as_spec(text)
        if not (spec.kind == "affine" and spec.symmetric and not spec.full_range):
            raise SystemExit(f"--specs: {text!r} is not a symmetric integer spec without -full")
    jobs = [(s, a, full) for s in specs for a in args.algorithms.split(",") for full in (0, 1)]
    rows = []
    for text, alg, full in tqdm(jobs, desc="quantize + score", unit="config"):
        spec = as_spec(text).replace(full_range=bool(full))
        model = lowbit.quantize(copy.deepcopy(float_model), spec, algorithm=alg,
                                calib=calib if alg != "rtn" and alg != "hqq" else None,
                                exclude=EXCLUDE)
        with torch.inference_mode():
            cmp = compare_logits(model, reference, ids, context=args.context,
                                 stride=args.stride, max_tokens=max_tokens)
        rows.append((text, alg, cmp))
        tqdm.write(f"{spec!s:22s} {alg:5s} ppl {cmp.ppl:8.3f} KL {cmp.kl_mean:.4f}")
    write(args, rows, calib_samples)


def write(args, rows, calib_samples: int) -> None:
    first = rows[0][2]
    lines = [
        f"# Full-range symmetric scales on {args.model.name}", "",
        f"Machine: {machine_line()}. Written by `benchmarks/full_range.py"
        f"{' --quick' if args.quick else ''}`.", "",
        "Protocol:",
        f"- model: `{args.model.name}` in float32; every Linear of the decoder blocks quantized, "
        f"`lm_head` and the embeddings float (`exclude={EXCLUDE}`).",
        f"- test: `{TEST.name}`, {first.tokens:,} scored tokens"
        f"{' (all of it)' if not args.quick and not args.max_tokens else ''}, context "
        f"{first.context}, stride {first.stride} (`lowbit.eval.compare_logits`); KL = mean "
        "KL(float || quantized) of the next-token distributions in nats.",
        f"- calibration (gptq): {calib_samples} x 512 tokens from the start of `{VAL.name}`; "
        "rtn and hqq use none.",
        "- each pair of rows differs only in the scale rule: absmax `s = absmax / (2**(b-1) - 1)`"
        " vs full range `s = v / -2**(b-1)` (v = the block's value of largest magnitude, with "
        "its sign); bits per weight and kernels are the same.", "",
        f"Float model: perplexity {first.reference_ppl:.3f} on these tokens.", "",
        "| spec | algorithm | ppl absmax | ppl full | KL absmax | KL full | KL full / absmax |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i in range(0, len(rows), 2):
        (spec, alg, a), (_, _, f) = rows[i], rows[i + 1]
        lines.append(f"| {spec} | {alg} | {a.ppl:.3f} | {f.ppl:.3f} | {a.kl_mean:.4f} | "
                     f"{f.kl_mean:.4f} | {f.kl_mean / a.kl_mean:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
