"""Mixture-of-experts layer speed on CPU: transformers' fused fp32 experts vs lowbit's split ones.

One Mixtral-style experts layer (``MixtralExperts``: E experts, SwiGLU, top-k routing from a
random router), hidden H and expert width I (default 2048 / 5632, E=8, top-2: a quarter-width
Mixtral), for M tokens in (1, 16, 128). Median time of one experts forward, interleaved
round-robin in the same run, for:

- fp32 fused with transformers' experts implementations ``grouped_mm`` (its default) and
  ``eager`` (``batched_mm`` gathers one weight matrix per token and expert: 24 GB at M=128);
- lowbit's ``LinearExperts`` in fp32 (the split alone) and quantized with each ``--spec``
  (one QuantLinear kernel per expert projection).

Also the experts' weight bytes. Writes benchmarks/results/moe.md.
Run: python benchmarks/moe.py [--hidden 2048 --inner 5632 --experts 8 --top-k 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from _machine import machine_line
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import lowbit
from lowbit.models.experts import LinearExperts

RESULTS = Path(__file__).parent / "results" / "moe.md"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--spec", action="append", help="lowbit specs (default: w4g128, w8)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per M")
    parser.add_argument("--quick", action="store_true", help="small layer, few rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.inner, args.rounds = 256, 512, 3
    specs = args.spec or ["w4g128", "w8"]
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.inner,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    fused = MixtralExperts(config).eval()
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, args.hidden ** -0.5)
        fused.down_proj.normal_(0, args.inner ** -0.5)
    router = torch.randn(args.experts, args.hidden)

    def with_implementation(name: str) -> torch.nn.Module:
        module = copy.copy(fused)  # shares the weights; its own config for the implementation
        module.config = copy.copy(config)
        module.config._experts_implementation = name
        return module

    candidates: dict[str, torch.nn.Module] = {
        f"fp32 fused ({name})": with_implementation(name)
        for name in ("grouped_mm", "eager")}
    split = LinearExperts(copy.deepcopy(fused))
    candidates["fp32 split (lowbit)"] = split
    for spec in specs:
        quantized = copy.deepcopy(split)
        lowbit.quantize(quantized, spec)
        candidates[f"{spec} split (lowbit)"] = quantized
    rows = (1, 16, 128)
    times: dict[tuple[str, int], list[float]] = {}
    errors: dict[str, float] = {}
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, args.hidden)
            weights, index = torch.topk(torch.softmax(x @ router.t(), -1), args.top_k, -1)
            weights = weights / weights.sum(-1, keepdim=True)
            reference = candidates["fp32 fused (eager)"](x, index, weights)
            for name, module in candidates.items():  # warm up, and check against eager
                out = module(x, index, weights)
                errors[name] = max(errors.get(name, 0.0), float(
                    (out - reference).norm() / reference.norm()))
            for _ in range(args.rounds):
                for name, module in candidates.items():
                    times.setdefault((name, m), []).append(
                        median_ms(lambda mod=module, a=(x, index, weights): mod(*a), 1))
    base = "fp32 fused (grouped_mm)"
    lines = [
        f"# MoE experts layer on CPU ({date.today()})", "",
        f"Machine: {machine_line()}.", "",
        f"One Mixtral-style experts layer: E={args.experts} experts, top-{args.top_k}, hidden "
        f"{args.hidden}, expert width {args.inner} (random weights and router). Median ms of "
        f"one experts forward over {args.rounds} interleaved rounds; speedup = "
        f"{base} / this, measured side by side. Rel. error: of the output vs the fp32 eager "
        f"forward, worst over M. Weight bytes: the experts' parameters and buffers.", "",
        "| experts | weight bytes | rel. error | " + " | ".join(
            f"M={m} ms (speedup)" for m in rows) + " |",
        "|---|---:|---:|" + "---:|" * len(rows),
    ]
    for name, module in candidates.items():
        cells = []
        for m in rows:
            ms = statistics.median(times[(name, m)])
            cells.append(f"{ms:.2f} ({statistics.median(times[(base, m)]) / ms:.2f}x)")
        lines.append(f"| {name} | {weight_bytes(module):,} | {errors[name]:.1e} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Run: `python benchmarks/moe.py`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
