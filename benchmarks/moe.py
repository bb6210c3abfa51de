"""Mixture-of-experts layer speed on CPU: transformers' fused fp32 experts vs lowbit's split ones.

One Mixtral-style experts layer (``MixtralExperts``: E experts, SwiGLU, top-k routing from a
random router), hidden H and expert width I (default 2048 / 5632, E=8, top-2: a quarter-width
Mixtral), for M tokens in (1, 16, 128). Median time of one experts forward, interleaved
round-robin in the same run, for:

- fp32 fused with transformers' experts implementations ``grouped_mm`` (its default) and
  ``eager`` (``batched_mm`` gathers one weight matrix per token and expert: 24 GB at M=128);
- lowbit's ``LinearExperts`` in fp32 (the split alone) and quantized with each ``--spec``
  (one QuantLinear kernel per expert projection).

Also the experts' weight bytes. Then decoding: a random Mixtral-shaped causal LM (4 layers,
hidden 1024, 8 experts of width 2816, top-2, vocabulary 8192; --quick: smaller), batch 1, a
16-token prompt and 32 new tokens, greedy, with lowbit's Decoder and with transformers'
generate, fp32 vs each --spec (experts and attention quantized, lm_head too), tokens/s as the
median of interleaved rounds. Writes benchmarks/results/moe.md.
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
    lines += decode_table(specs, args)
    lines += ["", "Run: `python benchmarks/moe.py`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def decode_table(specs: list[str], args: argparse.Namespace) -> list[str]:
    """Decode tokens/s of a random Mixtral-shaped LM, fp32 vs each spec (markdown lines)."""
    from transformers import MixtralForCausalLM

    hidden, inner, layers = (256, 512, 2) if args.quick else (1024, 2816, 4)
    config = MixtralConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=inner,
                           num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    float_model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # routing that varies by token (the default init routes uniformly)
        for p in float_model.parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    models = {"fp32": float_model}
    for spec in specs:
        models[spec] = lowbit.quantize(copy.deepcopy(float_model), spec)
    prompt = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(1))
    new, rounds = 32, (2 if args.quick else 5)
    runners = {}
    for name, model in models.items():
        decoder = lowbit.Decoder(model, 1, 16 + new)
        runners[(name, "lowbit Decoder")] = (
            lambda d=decoder: d.generate(prompt, new))
        runners[(name, "transformers generate")] = (
            lambda m=model: m.generate(prompt, attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0))
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for run in runners.values():
            run()  # warm-up: kernels bound, caches built
        for _ in range(rounds):
            for key, run in runners.items():
                times.setdefault(key, []).append(median_ms(run, 1))
    lines = [
        "", f"## Decoding a random Mixtral-shaped LM ({date.today()})", "",
        f"{layers} layers, hidden {hidden}, 8 experts of width {inner}, top-2, vocabulary 8192 "
        f"(random weights, {sum(p.numel() for p in float_model.parameters()) / 1e6:.0f}M "
        f"parameters); batch 1, a 16-token prompt, {new} new tokens, greedy; tokens/s = {new} "
        f"/ median time of a whole generate over {rounds} interleaved rounds (prefill "
        "included). Speedup: vs fp32 in the same runtime.", "",
        "| model | runtime | tokens/s | vs fp32 |", "|---|---|---:|---:|",
    ]
    for runtime in ("lowbit Decoder", "transformers generate"):
        base = new / statistics.median(times[("fp32", runtime)]) * 1e3
        for name in models:
            tps = new / statistics.median(times[(name, runtime)]) * 1e3
            lines.append(f"| {name} | {runtime} | {tps:.1f} | {tps / base:.2f}x |")
    return lines


if __name__ == "__main__":
    main()
