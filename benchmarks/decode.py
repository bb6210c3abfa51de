"""End-to-end greedy decode speed of the fixture LM on CPU: fp32 vs lowbit schemes, in lowbit's
Decoder and in transformers' ``generate``.

Loads /work/shared/models/llama-19m-shakespeare-mix in float32 with transformers, quantizes
copies with ``lowbit.quantize(model, scheme)`` and times greedy decoding of exactly
``--new-tokens`` new tokens after a 32-token prompt from the held-out val text, at batch 1 and 8,
with two runtimes: ``lowbit.Decoder`` (static KV cache, Linears bound to their kernels, fused CPU
step ops) and ``model.generate`` (transformers, KV cache). Every round runs each (runtime, scheme)
once in turn (interleaved, so all see the same machine load); medians over rounds; speedups are
against fp32 in the same runtime. Also splits a Decoder step at batch 1 into its Linear layers
and the rest (a Decoder whose Linears answer from a cache after their first call, timed in the
same rounds).

Writes benchmarks/results/decode.md. Run: python benchmarks/decode.py [--rounds 5]
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

import lowbit
from lowbit.kernels import select_kernel
from lowbit.models.decode import STEP_LINEARS
from lowbit.nn.modules import QuantLinear

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "llama-19m-shakespeare-mix"
TEXT = ROOT.parent / "shared" / "data" / "shakespeare-mix-val.txt"
RESULTS = Path(__file__).parent / "results" / "decode.md"
SCHEMES = ("fp32", "w4g128", "w8", "w8a8", "w4a8", "w3g128", "nf4g64")
PROMPT = 32


def prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(encoding="utf-8")[:200_000], return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * 1000 : i * 1000 + length] for i in range(batch)])


def hf_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=1,
    )
    elapsed = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return elapsed


def decoder_seconds(decoder: lowbit.Decoder, ids: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    decoder.generate(ids, new_tokens)
    return time.perf_counter() - t0


def memoized(linear):
    """``linear`` answering every later call with its first output for that input shape."""
    outputs = {}

    def answer(x):
        if x.shape not in outputs:
            outputs[x.shape] = linear(x)
        return outputs[x.shape]

    return answer


def without_linears(model, batch: int, max_len: int) -> lowbit.Decoder:
    """A Decoder of ``model`` whose bound Linears (and lm_head) cost nothing after their first
    call: what is left of a step is everything else (norms, rotary, attention, embedding,
    Python)."""
    decoder = lowbit.Decoder(model, batch, max_len)
    for block in decoder.blocks:
        for name in STEP_LINEARS:
            setattr(block, name, memoized(getattr(block, name)))
    decoder.lm_head = memoized(decoder.lm_head)
    resolve = decoder._resolve_steps

    def resolve_without_linears() -> None:  # the fused step's Linears: calls that do nothing
        resolve()
        idle = dict.fromkeys(STEP_LINEARS, lambda: None)
        decoder._program = [layer._replace(**idle) for layer in decoder._program]

    if decoder.fused:
        decoder._resolve_steps = resolve_without_linears
        resolve_without_linears()
    return decoder


def per_step(run: list[float], prefill: list[float], new_tokens: int) -> float:
    """Seconds per decode step: a run's median less its prefill's (the prompt and the first
    token), over the other new tokens."""
    return (statistics.median(run) - statistics.median(prefill)) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--threads", type=int, default=0, help="torch/kernel threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not MODEL.exists():
        raise SystemExit(f"fixture model not found at {MODEL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    models = {}
    for scheme in args.schemes.split(","):
        models[scheme] = base if scheme == "fp32" else lowbit.quantize(copy.deepcopy(base), scheme)
    kernels_used = {}
    for scheme, model in models.items():
        names = sorted({
            select_kernel(m.qweight, torch.randn(1, m.qweight.shape[1])).name
            for m in model.modules() if isinstance(m, QuantLinear)
        })
        kernels_used[scheme] = ", ".join(names) or "torch fp32"

    table, steps = [], {}
    with torch.inference_mode():
        for batch in (1, 8):
            ids = prompts(tokenizer, batch, PROMPT)
            decoders = {s: lowbit.Decoder(m, batch, PROMPT + args.new_tokens)
                        for s, m in models.items()}
            runs = {}  # (runtime, scheme) -> (time fn, its target, new tokens)
            for scheme in models:
                runs[("lowbit Decoder", scheme)] = (decoder_seconds, decoders[scheme],
                                                    args.new_tokens)
            if batch == 1:  # the step split: with and without Linears, prefill alone too
                for scheme, model in models.items():
                    bare = without_linears(model, batch, PROMPT + args.new_tokens)
                    runs[("prefill", scheme)] = (decoder_seconds, decoders[scheme], 1)
                    runs[("no Linear", scheme)] = (decoder_seconds, bare, args.new_tokens)
                    runs[("no Linear prefill", scheme)] = (decoder_seconds, bare, 1)
            for scheme, model in models.items():
                runs[("transformers generate", scheme)] = (hf_seconds, model, args.new_tokens)
            for fn, target, _ in runs.values():  # warm-up (builds kernel caches)
                fn(target, ids, 4)
            times = {key: [] for key in runs}
            for _ in range(args.rounds):
                for key, (fn, target, tokens) in runs.items():
                    times[key].append(fn(target, ids, tokens))
            for runtime, scheme in runs:
                if runtime not in ("lowbit Decoder", "transformers generate"):
                    continue
                tps = batch * args.new_tokens / statistics.median(times[(runtime, scheme)])
                base_tps = batch * args.new_tokens / statistics.median(times[(runtime, "fp32")])
                line = (f"| {batch} | {runtime} | {scheme} | {kernels_used[scheme]} | "
                        f"{tps:.1f} | **{tps / base_tps:.2f}x** |")
                print(line, flush=True)
                table.append(line)
            if batch == 1:
                for scheme in models:
                    step, rest = (per_step(times[(full, scheme)], times[(prefill, scheme)],
                                           args.new_tokens)
                                  for full, prefill in (("lowbit Decoder", "prefill"),
                                                        ("no Linear", "no Linear prefill")))
                    steps[scheme] = (step, step - rest)
    split = [
        f"| {scheme} | {step * 1e3:.2f} | {lin * 1e3:.2f} | {(step - lin) * 1e3:.2f} | "
        f"{lin / step:.0%} |"
        for scheme, (step, lin) in steps.items()
    ]

    text = "\n".join([
        "# Greedy decode speed of the fixture LM (CPU)",
        "",
        f"Machine: {machine_line()}. Date: {date.today()}. Model: llama-19m-shakespeare-mix "
        "(8 layers, hidden 384, MLP 1024, vocab 8192), loaded float32; quantized with "
        "`lowbit.quantize(model, scheme)` (RTN, every Linear and the embedding).",
        "",
        f"Protocol: `python benchmarks/decode.py --threads {torch.get_num_threads()} "
        f"--rounds {args.rounds} --new-tokens {args.new_tokens}"
        f"{'' if args.out == RESULTS else f' --out results/{args.out.name}'}`; greedy with a KV "
        "cache, "
        f"{PROMPT}-token prompts from the val text, exactly {args.new_tokens} new tokens, in two "
        "runtimes: `lowbit.Decoder` (static cache, Linears bound to their kernels once, fused "
        "CPU step ops) and transformers' `model.generate`. One warm-up call each, then "
        f"{args.rounds} rounds, each running every (runtime, scheme) once in turn; tokens/s = "
        "batch x new tokens / median time (prompt prefill included); speedup vs fp32 in the "
        "same runtime. The machine is shared: compare ratios within a batch size and runtime.",
        "",
        "| batch | runtime | scheme | kernels | tokens/s | vs fp32 |",
        "| ---: | --- | --- | --- | ---: | ---: |",
        *table,
        "",
        "Where a batch-1 decode step of the Decoder goes (step = (median time of the run - "
        "median time of the prompt's prefill and first token) / (new tokens - 1); rest = the "
        "same for a Decoder whose step program's Linear calls do nothing (their buffers keep "
        "zeros) and whose prefill Linears answer every call after the first from a cache, "
        "timed in the same rounds; Linear = step - rest. The rest runs without the Linears' "
        "weights streaming through the caches, so it is a lower bound):",
        "",
        "| scheme | step ms | Linear ms | rest ms | Linear share |",
        "| --- | ---: | ---: | ---: | ---: |",
        *split,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
