"""compressed-tensors interop on the fixture LM: lowbit's exports read by transformers, and
compressed-tensors checkpoints (lowbit's, and llm-compressor's own) run by lowbit.

Checkpoints of /work/shared/models/llama-19m-shakespeare-mix, lm_head and embeddings in float:
lowbit GPTQ w4g128-sym and w4g128 (asymmetric), lowbit w8a8 (RTN, dynamic int8 activations), all
saved with ``lowbit.save(format="compressed-tensors")``; with ``--peers-python`` also
llm-compressor's GPTQ W4A16 (symmetric, groups of 128) saved by its own ``save_pretrained``.
Calibration: 128 x 512 tokens of the val split (``--quick``: 32 x 256).

Each checkpoint is loaded twice: by ``lowbit.load`` (quantized modules, lowbit's kernels) and by
transformers' compressed-tensors loader (``AutoModelForCausalLM.from_pretrained``; asymmetric ones
with ``CompressedTensorsConfig(dequantize=True)``, which transformers needs for them). Rows:
test-split perplexity of each (protocol in the table), the largest logit difference between the
two on the first window, weight memory (params + buffers), and greedy decode tokens/s at batch 1
(32-token prompt, ``--new-tokens``): ``lowbit.Decoder`` on lowbit's model vs transformers'
``generate`` on its own; rounds interleave the two, medians are quoted.

    .venv/bin/python benchmarks/interop.py [--quick] [--peers-python ../peers-venv/bin/python]

Writes benchmarks/results/interop.md.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from _machine import FIXTURE_19M, TEST, VAL, machine_line, protocol_parser

import lowbit
from lowbit.eval.perplexity import compare_logits, perplexity
from lowbit.eval.speed import weight_bytes

MODEL = FIXTURE_19M
RESULTS = Path(__file__).parent / "results" / "interop.md"
EXCLUDE = ["lm_head", "*embed_tokens"]
PROMPT = 32

# llm-compressor, run by the peers venv's python: GPTQ W4A16 on every decoder-block Linear, saved
# compressed by its own save_pretrained. argv: model, calibration ids (.pt), output folder.
LLMCOMPRESSOR_JOB = """
import sys, torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, ids_file, out = sys.argv[1:4]
calib = torch.load(ids_file)
data = Dataset.from_dict({"input_ids": calib.tolist(),
                          "attention_mask": torch.ones_like(calib).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
           "group_size": 128}
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                      ignore=["lm_head"], actorder=None, block_size=128, dampening_frac=0.01)
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
import importlib.metadata as md
print("llmcompressor", md.version("llmcompressor"), "compressed-tensors",
      md.version("compressed-tensors"))
"""


def token_ids(tokenizer, path: Path) -> torch.Tensor:
    return tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]


def transformers_load(folder: Path, asymmetric: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = ({"quantization_config": CompressedTensorsConfig(dequantize=True)}
             if asymmetric else {})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():  # compressed-tensors decompresses on the first forward
        model(torch.zeros(1, 1, dtype=torch.long))
    return model


def generate_seconds(run, new_tokens: int) -> float:
    t0 = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t0
    if out.shape[1] != PROMPT + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - PROMPT} tokens, not {new_tokens}")
    return elapsed


def main() -> None:
    parser = protocol_parser(__doc__.splitlines()[0], MODEL, RESULTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--peers-python", type=Path, default=None,
                        help="python of a venv with llmcompressor (never lowbit's venv)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples, seq_len = (32, 256) if args.quick else (128, 512)
    calib = token_ids(tokenizer, VAL)[: samples * seq_len].reshape(samples, seq_len)
    test = token_ids(tokenizer, TEST)
    max_tokens = args.max_tokens or (16_384 if args.quick else None)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fp_ppl = perplexity(base, test, args.context, args.stride, max_tokens)

    work = Path(tempfile.mkdtemp(prefix="lowbit-interop-"))
    checkpoints: list[tuple[str, Path, bool]] = []  # (label, folder, asymmetric)
    for label, spec, algorithm in (("lowbit GPTQ w4g128-sym", "w4g128-sym", "gptq"),
                                   ("lowbit GPTQ w4g128 (asym)", "w4g128", "gptq"),
                                   ("lowbit w8a8 (RTN)", "w8a8", "rtn")):
        q = lowbit.quantize(copy.deepcopy(base), spec, algorithm=algorithm,
                            calib=calib if algorithm != "rtn" else None, exclude=EXCLUDE)
        folder = work / spec
        lowbit.save(q, folder, format="compressed-tensors")
        tokenizer.save_pretrained(folder)
        checkpoints.append((label, folder, not q.model.layers[0].mlp.down_proj.spec.symmetric))
        del q
    peer_versions = ""
    if args.peers_python is not None:
        ids_file = work / "calib.pt"
        torch.save(calib, ids_file)
        folder = work / "llmcompressor"
        done = subprocess.run([str(args.peers_python), "-c", LLMCOMPRESSOR_JOB, str(args.model),
                               str(ids_file), str(folder)], capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
        if done.returncode != 0:
            raise SystemExit(f"llm-compressor run failed:\n{done.stderr[-3000:]}")
        peer_versions = done.stdout.strip().splitlines()[-1]
        checkpoints.append(("llm-compressor GPTQ W4A16 (sym)", folder, False))

    prompt = token_ids(tokenizer, VAL)[10_000 : 10_000 + PROMPT][None]
    rows = []
    for label, folder, asymmetric in checkpoints:
        ours = lowbit.load(folder)
        theirs = transformers_load(folder, asymmetric)
        window = test[: args.context][None]
        with torch.no_grad():
            diff = (ours(window).logits - theirs(window).logits).abs().max().item()
        ppl_ours = compare_logits(ours, base, test, args.context, args.stride, max_tokens)
        ppl_theirs = perplexity(theirs, test, args.context, args.stride, max_tokens)
        decoder = lowbit.Decoder(ours, 1, PROMPT + args.new_tokens)
        runs = {"lowbit": lambda d=decoder: d.generate(prompt, args.new_tokens),
                "transformers": lambda m=theirs: m.generate(
                    prompt, attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=1)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for run in runs.values():  # warm-up: kernels' layouts, first-call allocations
            generate_seconds(run, args.new_tokens)
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(generate_seconds(run, args.new_tokens))
        tok_s = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
        rows.append((label, ppl_ours.ppl, ppl_ours.kl_mean, ppl_theirs.ppl, diff,
                     weight_bytes(ours),
                     weight_bytes(theirs), tok_s["lowbit"], tok_s["transformers"],
                     sum(p.stat().st_size for p in folder.glob("*.safetensors"))))
        print(rows[-1], flush=True)
        del ours, theirs, decoder
    write(args, rows, fp_ppl, max_tokens, samples, seq_len, peer_versions)


def write(args, rows, fp_ppl, max_tokens, samples, seq_len, peer_versions) -> None:
    import compressed_tensors
    import transformers

    mb = 1e6
    lines = [
        "# compressed-tensors interop", "",
        f"Written by `benchmarks/interop.py{' --quick' if args.quick else ''}` on "
        f"{date.today().isoformat()}. Machine: {machine_line()}. transformers "
        f"{transformers.__version__}, compressed-tensors {compressed_tensors.__version__}"
        + (f"; peer: {peer_versions}" if peer_versions else "") + ".", "",
        f"Model: {args.model.name} (float32 perplexity {fp_ppl.ppl:.3f}). Perplexity protocol: "
        f"{TEST.name}, context {args.context}, stride {args.stride}, "
        f"{fp_ppl.tokens:,} tokens scored"
        + (f" (first {max_tokens:,} tokens)" if max_tokens else "") + ". Calibration: "
        f"{samples} x {seq_len} tokens of {VAL.name}. lm_head and embeddings stay float.", "",
        "Each compressed-tensors checkpoint loaded by `lowbit.load` (lowbit's quantized modules "
        "and kernels) and by transformers (its compressed-tensors loader, which decompresses "
        "the weights to float on the first forward; asymmetric checkpoints need "
        "`CompressedTensorsConfig(dequantize=True)` there). Decode: greedy, batch 1, "
        f"{PROMPT}-token prompt, {args.new_tokens} new tokens, median of {args.rounds} "
        "interleaved rounds: `lowbit.Decoder` vs transformers' `generate`.", "",
        "| checkpoint | file MB | KL vs float | ppl (lowbit) | ppl (transformers) | "
        "max logit diff | weights MB (lowbit) | weights MB (transformers) | tok/s lowbit | "
        "tok/s transformers | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, p_ours, kl, p_theirs, diff, w_ours, w_theirs, t_ours, t_theirs, size) in rows:
        lines.append(f"| {label} | {size / mb:.2f} | {kl:.4f} | {p_ours:.3f} | {p_theirs:.3f} | "
                     f"{diff:.2g} | {w_ours / mb:.2f} | {w_theirs / mb:.2f} | {t_ours:.0f} | "
                     f"{t_theirs:.0f} | {t_ours / t_theirs:.1f}x |")
    lines += ["", "KL vs float: mean KL(float || model) per scored token, lowbit runtime (the "
              "fidelity measure: on this small model perplexity moves up or down by chance by "
              "about 1%, so a lower perplexity alone says little).", "",
              "The logit difference is the two runtimes' arithmetic, not the checkpoint: "
              "transformers forms dequantized weights in the scales' fp16 and emulates W8A8 "
              "on an activation grid of absmax / 127.5 (lowbit: fp32, absmax / 127).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
