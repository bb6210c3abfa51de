"""lowbit's GGUF export run by llama.cpp itself: fidelity and speed of Q4_0 / Q8_0 / Q4_K_M from
lowbit's RTN and GPTQ against llama.cpp's own quantizer, on the fixture LM.

Needs ``llama-cpp-python`` (llama.cpp compiled for this CPU), best in a separate venv with numpy
(``--llama-python``; this script re-runs itself there for the llama.cpp half). Steps:

1. lowbit (this venv): from /work/shared/models/llama-19m-shakespeare-mix, write the float
   model as an F32 GGUF with ``lowbit.save(format="gguf")``; llama.cpp quantizes it to Q4_0,
   Q8_0 (every tensor that type) and Q4_K_M (its own per-tensor mix: Q4_K where a row holds
   whole 256-weight super-blocks, Q6_K / Q8_0 for some attn_v / ffn_down, its fallbacks for
   the rest) with its own ``llama_model_quantize`` (its RTN, no importance matrix).
2. lowbit: RTN and GPTQ ``q4_0``, RTN ``q8_0``, and RTN and GPTQ with the very per-tensor
   types of llama.cpp's Q4_K_M file (read from it; lowbit's presets q4_k, q6_k, q5_0, q8_0),
   written with ``lowbit.save(format="gguf")`` (GPTQ calibration: 128 x 512 tokens of the val
   split; ``--quick``: 32 x 256).
3. llama.cpp: for every GGUF, the test split's perplexity and mean
   KL(F32 || model) (llama.cpp's logits, non-overlapping windows of ``--context`` tokens, the
   token ids of the HF tokenizer fed as they are), whether llama.cpp's tokenizer (read from the
   GGUF) gives the HF ids, and greedy decode tokens/s at batch 1 (32-token prompt,
   ``--new-tokens``, median of ``--rounds``).
4. lowbit: the same models in lowbit's Decoder (tokens/s, same prompt).

    .venv/bin/python benchmarks/gguf_llamacpp.py --llama-python /tmp/llama-venv/bin/python

Writes benchmarks/results/gguf_llamacpp.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gguf_llamacpp.md"
PROMPT = 32


# (row name, llama.cpp's llama_ftype, pure) of llama.cpp's own quantizations
LLAMA_CPP_TYPES = (("llama.cpp RTN q4_0", 2, True), ("llama.cpp RTN q8_0", 7, True),
                   ("llama.cpp RTN Q4_K_M", 15, False))
# GGUF block type -> the lowbit preset that writes it
PRESETS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0",
           "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}


def tensor_types(path: str) -> dict[str, str]:
    """GGUF tensor name -> block type name of a file (gguf's reader, lowbit's venv)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def weight_errors(files: dict[str, str], labels: list[str], reference: str) -> dict:
    """``{block type: (tensors, {label: relative squared error})}``: each quantized tensor of
    the files ``labels`` dequantized by gguf's reference code against the F32 file's tensor,
    summed over the tensors of each type (the files must hold the same types)."""
    import gguf
    import numpy as np

    ref = {t.name: np.asarray(t.data, dtype=np.float64) for t in
           gguf.GGUFReader(reference).tensors}
    out: dict = {}
    for label in labels:
        for t in gguf.GGUFReader(files[label]).tensors:
            kind = t.tensor_type.name
            if kind not in PRESETS:
                continue
            want = ref[t.name].reshape(-1)
            got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
            names, sums = out.setdefault(kind, (set(), {}))
            names.add(t.name)
            err, norm = sums.get(label, (0.0, 0.0))
            sums[label] = (err + float(((got - want) ** 2).sum()), norm + float((want ** 2).sum()))
    return {kind: (len(names), {k: e / n for k, (e, n) in sums.items()})
            for kind, (names, sums) in sorted(out.items())}


def llama_side(job: dict) -> dict:
    """Run in the llama.cpp venv: quantize with llama.cpp, then score and time every GGUF."""
    import ctypes

    import llama_cpp
    import numpy as np

    work = Path(job["work"])
    if job["phase"] == "quantize":
        files = {}
        for name, ftype, pure in LLAMA_CPP_TYPES:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = job["threads"]
            params.pure = pure  # True: every tensor this type, as lowbit's file
            params.quantize_output_tensor = False  # output.weight stays F32, as lowbit's
            out = work / f"{name.split()[-1]}-llamacpp.gguf"
            rc = llama_cpp.llama_model_quantize(str(work / "f32.gguf").encode(),
                                                str(out).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({name}) returned {rc}")
            files[name] = str(out)
        return {"files": files}
    test = np.array(job["test_ids"], dtype=np.int64)
    ctx = job["context"]
    windows = [test[i : i + ctx] for i in range(0, len(test) - ctx + 1, ctx)]

    def window_logprobs(llm, window) -> np.ndarray:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.array(llm.scores[: len(window)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    out = {"version": llama_cpp.__version__, "rows": {}}
    llms = {name: llama_cpp.Llama(model_path=path, n_ctx=ctx, logits_all=True, verbose=False,
                                  n_threads=job["threads"], n_batch=ctx)
            for name, path in job["files"].items()}
    nll = dict.fromkeys(llms, 0.0)
    kl = dict.fromkeys(llms, 0.0)
    n = 0
    for w in windows:  # window by window: every model against the F32 run (no logits kept)
        reference = None
        for name, llm in llms.items():
            lp = window_logprobs(llm, w)
            nll[name] -= lp[np.arange(len(w) - 1), w[1:]].sum()
            if reference is None:
                reference = lp
            else:
                kl[name] += (np.exp(reference) * (reference - lp)).sum(-1)[:-1].sum()
        n += len(w) - 1
    for name, llm in llms.items():
        text_ids = [int(t) for t in llm.tokenize(job["text"].encode(), add_bos=False,
                                                 special=False)]
        prompt = job["prompt"]
        times = []
        for _ in range(job["rounds"] + 1):  # the first run warms up
            llm.reset()
            t0 = time.perf_counter()
            count = 0
            for _tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                count += 1
                if count == job["new_tokens"]:
                    break
            times.append(time.perf_counter() - t0)
        out["rows"][name] = {"ppl": float(np.exp(nll[name] / n)), "kl": kl[name] / n,
                             "tokens": n, "tokenizer_ok": text_ids == job["text_ids"],
                             "tok_s": job["new_tokens"] / statistics.median(times[1:]),
                             "bytes": Path(job["files"][name]).stat().st_size}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    # (here, not at the top: the llama.cpp venv that re-runs this file has no torch)
    from _machine import FIXTURE_19M as MODEL
    from _machine import TEST, VAL, machine_line, run_llama_job
    from transformers import AutoTokenizer

    import lowbit
    from lowbit.models.hf import load_hf_model

    threads = torch.get_num_threads()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ids = {p: tokenizer(p.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
           for p in (VAL, TEST)}
    samples, seq_len = (32, 256) if args.quick else (128, 512)
    calib = ids[VAL][: samples * seq_len].reshape(samples, seq_len)
    max_tokens = args.max_tokens or (32_768 if args.quick else None)
    test = ids[TEST][:max_tokens] if max_tokens else ids[TEST]
    base, _, _ = load_hf_model(MODEL)
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    files = {}
    lowbit.save(base, work / "f32", format="gguf", float_dtype=torch.float32)
    files["F32 (lowbit export)"] = str(work / "f32" / "model.gguf")
    (work / "f32.gguf").symlink_to(work / "f32" / "model.gguf")
    theirs = run_llama_job(args.llama_python, __file__, work,
                           {"phase": "quantize", "work": str(work), "threads": threads})["files"]
    # llama.cpp's Q4_K_M mix, tensor by tensor, as lowbit specs
    import gguf

    kinds = tensor_types(theirs["llama.cpp RTN Q4_K_M"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base.config.num_hidden_layers)
    mix = {}
    for module_name, module in base.named_modules():
        target = names.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and target in kinds \
                and kinds[target] in PRESETS:
            mix[module_name] = PRESETS[kinds[target]]
    quantized = {}
    for label, spec, alg, folder in (("lowbit RTN q4_0", "q4_0", "rtn", "q4_0/rtn"),
                                     ("lowbit GPTQ q4_0", "q4_0", "gptq", "q4_0/gptq"),
                                     ("lowbit RTN q8_0", "q8_0", "rtn", "q8_0/rtn"),
                                     ("lowbit RTN Q4_K_M mix", mix, "rtn", "q4km/rtn"),
                                     ("lowbit GPTQ Q4_K_M mix", mix, "gptq", "q4km/gptq")):
        q = lowbit.quantize(copy.deepcopy(base), spec, algorithm=alg,
                            calib=calib if alg == "gptq" else None, exclude=["lm_head"])
        lowbit.save(q, work / folder, format="gguf", float_dtype=torch.float32)
        files[label] = str(work / folder / "model.gguf")
        quantized[label] = q
        if isinstance(spec, dict) and tensor_types(files[label]) != kinds:
            raise SystemExit(f"{label}: lowbit's tensor types differ from llama.cpp's Q4_K_M")
    files.update(theirs)
    prompt = ids[VAL][10_000 : 10_000 + PROMPT]
    text = VAL.read_text(encoding="utf-8")[:20_000]
    job = {"phase": "score", "work": str(work), "files": files, "test_ids": test.tolist(),
           "context": args.context, "threads": threads, "rounds": args.rounds,
           "new_tokens": args.new_tokens, "prompt": prompt.tolist(), "text": text,
           "text_ids": tokenizer(text)["input_ids"]}
    result = run_llama_job(args.llama_python, __file__, work, job)

    lowbit_tok_s = {}
    for label, q in quantized.items():
        decoder = lowbit.Decoder(q, 1, PROMPT + args.new_tokens)
        decoder.generate(prompt[None], args.new_tokens)
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            decoder.generate(prompt[None], args.new_tokens)
            times.append(time.perf_counter() - t0)
        lowbit_tok_s[label] = args.new_tokens / statistics.median(times)

    compared = ["lowbit RTN Q4_K_M mix", "llama.cpp RTN Q4_K_M"]
    errors = weight_errors(files, compared, files["F32 (lowbit export)"])
    rows = result["rows"]
    n = rows["F32 (lowbit export)"]["tokens"]
    lines = [
        "# lowbit's GGUF in llama.cpp", "",
        f"Written by `benchmarks/gguf_llamacpp.py{' --quick' if args.quick else ''}` on "
        f"{date.today().isoformat()}. Machine: {machine_line()}. llama-cpp-python "
        f"{result['version']} (llama.cpp built from source on this machine), {threads} threads.",
        "",
        f"Model: {MODEL.name}. Protocol (llama.cpp's logits): {TEST.name}, non-overlapping "
        f"windows of {args.context} tokens, {n:,} tokens scored, the HF tokenizer's ids fed as "
        "they are; KL = mean KL(F32 || model) per token against llama.cpp's F32 run. lm_head "
        "stays F32 in every file; token embeddings are quantized with the rest (llama.cpp's "
        f"quantizer keeps them too). GPTQ calibration: {samples} x {seq_len} tokens of "
        f"{VAL.name}. Decode: greedy, batch 1, {PROMPT}-token prompt, {args.new_tokens} new "
        f"tokens, median of {args.rounds}; lowbit's Decoder runs the same quantized weights.", "",
        "Q4_K_M mix: the tensor types llama.cpp's quantizer chose for this model (rows of 384 "
        "weights cannot hold a 256-weight super-block, so most tensors fall back to Q5_0): "
        + ", ".join(f"{n} {k}" for k, n in sorted(Counter(kinds[t] for t in kinds
                                                           if kinds[t] in PRESETS).items()))
        + "; the lowbit rows write the same type for every tensor.", "",
        "| GGUF | file MB | ppl | KL vs F32 | llama.cpp tokenizer = HF | llama.cpp tok/s | "
        "lowbit Decoder tok/s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for label, row in rows.items():
        ours = lowbit_tok_s.get(label)
        lines.append(f"| {label} | {row['bytes'] / 1e6:.2f} | {row['ppl']:.3f} | "
                     f"{row['kl']:.4f} | {'yes' if row['tokenizer_ok'] else 'NO'} | "
                     f"{row['tok_s']:.0f} | {f'{ours:.0f}' if ours else '-'} |")
    lines += [
        "", "Weight error of the Q4_K_M mix, tensor type by type: sum of squared differences "
        "between each tensor dequantized by gguf's reference code and the F32 file's, over the "
        "sum of squares of the F32 weights (both files hold the same types; RTN chooses each "
        "group's scale and minimum for the weights alone, no calibration).", "",
        "| type | tensors | " + " | ".join(compared) + " | ratio |",
        "|---|---:|" + "---:|" * (len(compared) + 1),
    ]
    for kind, (count, rel) in errors.items():
        ours, theirs = (rel[k] for k in compared)
        lines.append(f"| {kind} | {count} | {ours:.3e} | {theirs:.3e} | {ours / theirs:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the GGUF files (hundreds of MB)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-job":
        job_file = Path(sys.argv[2])
        job = json.loads(job_file.read_text())
        (job_file.parent / "result.json").write_text(json.dumps(llama_side(job)))
    else:
        sys.exit(main())
