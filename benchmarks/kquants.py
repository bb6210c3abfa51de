"""k-quants (double-quantized scales) against llama.cpp's legacy block types, on the fixture LM.

llama.cpp's Q4_K stores each group of 32 weights' scale and minimum as 6-bit codes under one
fp16 scale (and one fp16 minimum scale) per 256 weights: 4.5 bits per weight, as Q4_0 (fp16
scale per 32, symmetric) and 0.5 below Q4_1 (fp16 scale and offset per 32). This measures what
the cheaper scales cost in accuracy, spec by spec and algorithm by algorithm, in lowbit (every
row runs lowbit's own kernels; the GGUF files and llama.cpp itself: gguf_llamacpp.py).

    .venv/bin/python benchmarks/kquants.py            # writes benchmarks/results/kquants.md
    .venv/bin/python benchmarks/kquants.py --quick    # 4,096 test tokens, 8 calibration samples
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import TEST, VAL, machine_line, spec_grid_data, spec_grid_parser  # noqa: E402

SPECS = ["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "w4g128", "q5_0", "q5_1", "q5_k", "q6_k",
         "q8_0"]
ALGORITHMS = ["rtn", "hqq", "gptq"]
EXCLUDE = ["lm_head", "*embed*"]


def main() -> None:
    args = spec_grid_parser(__doc__.splitlines()[0],
                            ROOT / "benchmarks" / "results" / "kquants.md", SPECS,
                            ALGORITHMS).parse_args()
    import torch
    from tqdm import tqdm

    import lowbit
    from lowbit.eval import compare_logits
    from lowbit.spec import as_spec

    max_tokens, calib_samples, float_model, ids, calib, reference = spec_grid_data(args)

    jobs = [(s, a) for s in args.specs.split(",") for a in args.algorithms.split(",")]
    rows = []
    for name, alg in tqdm(jobs, desc="quantize + score", unit="config"):
        spec = as_spec(name)
        model = lowbit.quantize(copy.deepcopy(float_model), spec, algorithm=alg,
                                calib=calib if alg == "gptq" else None, exclude=EXCLUDE)
        layers = [m.qweight for m in model.modules() if isinstance(m, lowbit.nn.QuantLinear)]
        bits = sum(q.nbytes for q in layers) * 8 / sum(q.numel for q in layers)
        with torch.inference_mode():
            cmp = compare_logits(model, reference, ids, context=args.context,
                                 stride=args.stride, max_tokens=max_tokens)
        rows.append((name, str(spec), alg, bits, cmp))
        tqdm.write(f"{name:8s} {alg:5s} {bits:.3f} b/w ppl {cmp.ppl:8.3f} KL {cmp.kl_mean:.4f}")
    write(args, rows, calib_samples)


def write(args, rows, calib_samples: int) -> None:
    first = rows[0][4]
    lines = [
        f"# k-quants (double-quantized scales) on {args.model.name}", "",
        f"Machine: {machine_line()}. Written by `benchmarks/kquants.py"
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
        "- bits/weight: stored bytes of the quantized Linears (codes, scales, zero-points, "
        "super-scales) x 8 / their weights. The model's rows are 384 and 1024 wide, so a row "
        "of 384 ends in a half super-block of 128 weights whose fp16 super-scales cost as much "
        "as a whole one: above the 4.5 / 5.5 / 6.5625 of 4096-wide rows.", "",
        f"Float model: perplexity {first.reference_ppl:.3f} on these tokens.", "",
        "| preset | spec | algorithm | bits/weight | ppl | KL |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name, spec, alg, bits, cmp in rows:
        lines.append(f"| {name} | `{spec}` | {alg} | {bits:.3f} | {cmp.ppl:.3f} | "
                     f"{cmp.kl_mean:.4f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
