"""LLM post-training algorithms on the fixture LM: perplexity, KL vs the float model, time, RSS.

Every quantization runs in its own subprocess (so its wall time and peak RSS are its own), from
the model folder (lowbit.quantize(path, ...): blocks read from disk one at a time), and saves the
result with lowbit.save; the parent loads each result and scores it against the float model on
the test split, with the float model's logits computed once.

    .venv/bin/python benchmarks/llm.py            # llama-19m, writes benchmarks/results/llm.md
    .venv/bin/python benchmarks/llm.py --quick    # fewer test tokens and calibration samples
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "llama-19m-shakespeare-mix"
VAL = SHARED / "data" / "shakespeare-mix-val.txt"
TEST = SHARED / "data" / "shakespeare-mix-test.txt"
EXCLUDE = ["lm_head", "*embed*"]
WEIGHT_SPECS = ["w4g128", "w3g128", "w2g64"]
WEIGHT_ALGORITHMS = ["rtn", "gptq", "gptq-act-order", "hqq", "awq"]
ACT_ALGORITHMS = ["rtn", "smoothquant"]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def calibration_ids(model_dir: Path, samples: int, seq_len: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(VAL.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    if ids.numel() < samples * seq_len:
        raise SystemExit(f"val split has {ids.numel()} tokens; need {samples * seq_len}")
    return ids[: samples * seq_len].reshape(samples, seq_len)


def worker(job: dict) -> dict:
    """Quantize one configuration (in this process) and save it; report time and peak RSS."""
    import torch

    import lowbit
    from lowbit.algorithms import get_algorithm

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model_dir = Path(job["model"])
    alg = get_algorithm(job["algorithm"])
    calib = calibration_ids(model_dir, job["calib_samples"], job["seq_len"])
    if not alg.needs_calibration:
        calib = None
    if job.get("cap_mb"):  # map the lazily imported libraries before the cap
        import scipy.linalg  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        from safetensors import safe_open  # noqa: F401
    baseline = _rss_kib("VmHWM")
    if job.get("cap_mb"):
        cap = _rss_kib("VmSize") * 1024 + job["cap_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    try:
        if job.get("in_memory"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model = lowbit.quantize(model, job["spec"], algorithm=alg, calib=calib,
                                    exclude=EXCLUDE)
        else:
            model = lowbit.quantize(str(model_dir), job["spec"], algorithm=alg, calib=calib,
                                    exclude=EXCLUDE)
    except (MemoryError, RuntimeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")  # this process's own high-water mark (ru_maxrss survives exec)
    errors = [m.error for m in model.lowbit_summary.quantized if m.error is not None]
    if job.get("out"):
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        lowbit.save(model, job["out"], overwrite=True)
    return {"ok": True, "seconds": seconds, "peak_rss_kib": peak, "baseline_rss_kib": baseline,
            "mean_layer_error": statistics.mean(errors) if errors else None}


def hqq_peer_worker(job: dict) -> dict:
    """The ``hqq`` package (run by the peers venv's python): HQQLinear on every decoder Linear,
    then the dequantized weights are written for the parent to score."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    bits, group = job["bits"], job["group"]
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    start = time.perf_counter()
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        setattr(model.get_submodule(parent), child, q)
    seconds = time.perf_counter() - start
    weights = {n + ".weight": model.get_submodule(n).dequantize().float().contiguous()
               for n in names}
    torch.save(weights, job["out"])
    import importlib.metadata as md

    return {"ok": True, "seconds": seconds, "peak_rss_kib": _rss_kib("VmHWM"),
            "version": md.version("hqq")}


def run_peers(args) -> None:
    """Score the hqq package at the weight specs and replace the results file's peer section."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.eval import compare_logits

    python = Path(args.peers_python)
    if not python.exists():
        raise SystemExit(f"--peers-python {python} does not exist")
    max_tokens = args.max_tokens or (4096 if args.quick else 32768)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = CachedReference(ref)
    lines = ["## Peer toolkits", "",
             f"Same model, test tokens ({max_tokens:,}, context {args.context}, stride "
             f"{args.stride}) and exclusions; run with `{python}` (a separate venv, "
             "`benchmarks/llm.py --peers`). hqq: `HQQLinear(BaseQuantizeConfig(nbits, "
             "group_size))` on every decoder Linear, compute dtype float32 (its scales/zeros "
             "are kept in float, lowbit's in fp16); scored by loading its dequantized weights.",
             "", "| spec | toolkit | ppl | KL | top-1 | time s | peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        for spec, bits, group in (("w4g128", 4, 128), ("w3g128", 3, 128), ("w2g64", 2, 64)):
            job = {"model": str(args.model), "bits": bits, "group": group,
                   "out": f"{tmp}/w.pt", "peer": "hqq"}
            proc = subprocess.run([str(python), __file__, "--worker", json.dumps(job)],
                                  capture_output=True, text=True, cwd=ROOT)
            out = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not out:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                lines.append(f"| {spec} | hqq | failed: {tail} | | | | |")
                continue
            res = json.loads(out[-1])
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            model.load_state_dict(torch.load(f"{tmp}/w.pt"), strict=False)
            cmp = compare_logits(model, reference, ids, context=args.context,
                                 stride=args.stride, max_tokens=max_tokens)
            lines.append(f"| {spec} | hqq {res['version']} | {cmp.ppl:.3f} | {cmp.kl_mean:.4f} "
                         f"| {cmp.top1_agreement:.3f} | {res['seconds']:.1f} | "
                         f"{res['peak_rss_kib'] / 1024:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", "Not run: llmcompressor and gptqmodel (GPTQ peers) were not installed: both "
              "pull large CUDA-oriented dependency trees (gptqmodel builds CUDA kernels; "
              "llmcompressor needs compressed-tensors + accelerate + datasets), which did not fit "
              "this session's time; the GPTQ side-by-side comparison is still missing.", ""]
    text = args.out.read_text() if args.out.exists() else ""
    head = text.split("## Peer toolkits")[0]
    args.out.write_text(head + "\n".join(lines))
    print(f"wrote {args.out}")


def run_worker(job: dict) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"} if job.get("cap_mb") else None
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


class CachedReference:
    """The float model's logits per input batch, computed once and reused for every config."""

    def __init__(self, model) -> None:
        self.model, self.cache = model, {}

    def __call__(self, input_ids):
        key = (tuple(input_ids.shape), hash(input_ids.numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids).logits
        return self.cache[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm.md")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="timing runs per config (median)")
    ap.add_argument("--only", default=None, help="comma-separated algorithms to run")
    ap.add_argument("--specs", default=None, help="comma-separated specs (default: all)")
    ap.add_argument("--caps", default="100", help="memory caps in MiB for the cap runs")
    ap.add_argument("--cap-algorithm", default="gptq")
    ap.add_argument("--caps-only", action="store_true",
                    help="only the memory-cap runs; write their section to --out")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peers", action="store_true",
                    help="run peer toolkits (hqq) from --peers-python and rewrite their section")
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(hqq_peer_worker(job) if job.get("peer") == "hqq" else worker(job)))
        return
    if args.peers:
        run_peers(args)
        return
    if args.caps_only:
        caps = [int(c) for c in args.caps.split(",") if c]
        rows = memory_cap_runs(args.model, caps, 2, args.seq_len, args.cap_algorithm)
        args.out.write_text("\n".join(cap_section(rows, args.cap_algorithm)) + "\n")
        print(f"wrote {args.out}")
        return
    if not (args.model / "config.json").exists() or not TEST.exists():
        raise SystemExit(f"model or test split absent ({args.model}, {TEST})")
    max_tokens = args.max_tokens or (4096 if args.quick else 32768)
    calib_samples = args.calib_samples or (8 if args.quick else 32)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _machine import machine_line

    import lowbit
    from lowbit.algorithms import ALGORITHMS
    from lowbit.eval import compare_logits

    registered = set(ALGORITHMS) | {"gptq-act-order"}
    only = set(args.only.split(",")) if args.only else None

    def wanted(a: str) -> bool:
        return a in registered and (only is None or a in only)

    specs = args.specs.split(",") if args.specs else [*WEIGHT_SPECS, "w8a8"]
    jobs = [(s, a) for s in specs if s != "w8a8" for a in WEIGHT_ALGORITHMS if wanted(a)]
    jobs += [("w8a8", a) for a in ACT_ALGORITHMS if wanted(a) and "w8a8" in specs]
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    float_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fp32_bytes = sum(p.numel() * 4 for p in float_model.parameters())
    reference = CachedReference(float_model)
    rows = []
    machine = machine_line()

    def write(cap_rows: list) -> None:
        write_markdown(args, rows, cap_rows, fp32_bytes, max_tokens, calib_samples, machine)

    with tempfile.TemporaryDirectory() as tmp:
        caps = [int(c) for c in args.caps.split(",") if c]
        cap_rows = memory_cap_runs(args.model, caps, calib_samples=2, seq_len=args.seq_len)
        write(cap_rows)
        for spec, alg in jobs:
            runs = []
            for r in range(args.repeats):
                job = {"model": str(args.model), "spec": spec, "algorithm": alg,
                       "calib_samples": calib_samples, "seq_len": args.seq_len,
                       "out": f"{tmp}/q" if r == 0 else None}
                runs.append(run_worker(job))
                if not runs[-1]["ok"]:
                    break
            if not runs[-1]["ok"]:
                print(f"{spec} {alg}: FAILED {runs[-1]['error']}", flush=True)
                rows.append((spec, alg, None, runs[-1]["error"]))
                write(cap_rows)
                continue
            model = lowbit.load(f"{tmp}/q").eval()
            cmp = compare_logits(model, reference, ids, context=args.context,
                                 stride=args.stride, max_tokens=max_tokens)
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_rss_kib"] for r in runs) * 1024
            base = statistics.median(r["baseline_rss_kib"] for r in runs) * 1024
            rows.append((spec, alg, dict(cmp=cmp, seconds=seconds, peak=peak, base=base,
                                         err=runs[0]["mean_layer_error"]), None))
            print(f"{spec:7s} {alg:15s} ppl {cmp.ppl:8.3f} (fp {cmp.reference_ppl:.3f}) "
                  f"KL {cmp.kl_mean:.4f} top1 {cmp.top1_agreement:.3f} {seconds:6.1f}s "
                  f"peak {peak / 2**20:.0f} MiB", flush=True)
            write(cap_rows)


def memory_cap_runs(model_dir: Path, caps: list[int], calib_samples: int, seq_len: int,
                    algorithm: str = "gptq") -> list:
    """GPTQ w4g128 from disk vs loading the whole float model first, under an address-space cap
    (RLIMIT_AS = the process's virtual size after imports + cap)."""
    out = []
    for cap in caps:
        for in_memory in (False, True):
            job = {"model": str(model_dir), "spec": "w4g128", "algorithm": algorithm,
                   "calib_samples": calib_samples, "seq_len": seq_len, "cap_mb": cap,
                   "in_memory": in_memory}
            res = run_worker(job)
            out.append((cap, in_memory, res))
            print(f"cap +{cap} MiB in_memory={in_memory}: {res}", flush=True)
    return out


def write_markdown(args, rows, cap_rows, fp32_bytes, max_tokens, calib_samples, machine):
    name = args.model.name
    ok = [r for r in rows if r[2] is not None]
    fp_ppl = ok[0][2]["cmp"].reference_ppl if ok else float("nan")
    lines = [
        f"# LLM post-training algorithms on {name}",
        "",
        f"Machine: {machine}. Written by `benchmarks/llm.py{' --quick' if args.quick else ''}`.",
        "",
        "Protocol:",
        f"- model: `{name}` (fp16 checkpoint, run in float32: {fp32_bytes / 2**20:.1f} MiB of "
        "float32 parameters); quantized: every Linear of the decoder blocks; `lm_head` and the "
        f"embeddings stay in float (`exclude={EXCLUDE}`).",
        f"- test: `shakespeare-mix-test.txt`, first {max_tokens:,} tokens, context {args.context}, "
        f"stride {args.stride} (`lowbit.eval.compare_logits`); KL = mean KL(float || quantized) "
        "of the next-token distributions in nats; top-1 = share of targets where both models' "
        "argmax agrees; the float reference is the same checkpoint in float32.",
        f"- calibration (gptq, awq, smoothquant): {calib_samples} x {args.seq_len} tokens from the "
        "start of `shakespeare-mix-val.txt` (never the test split).",
        "- each quantization runs in a fresh subprocess from the model folder "
        "(`lowbit.quantize(path, ...)`: non-block tensors loaded, then one block at a time read "
        "from disk, quantized, and only its packed weights kept); time = wall seconds of "
        "`lowbit.quantize` (median of "
        f"{args.repeats} run(s)); peak RSS = the worker's `VmHWM` after quantization, including "
        "Python + torch + transformers (the 'base' column is `VmHWM` just before quantizing).",
        "- the machine is shared with other jobs; wall times are noisy (taken while the load "
        "average was high), so compare them within this table only.",
        "",
        f"Float model: perplexity {fp_ppl:.3f} on these tokens.",
        "",
        "| spec | algorithm | ppl | KL | top-1 | mean layer rel. err | gap closed | time s | "
        "peak RSS MiB | base MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rtn_ppl = {spec: r["cmp"].ppl for spec, alg, r, _ in ok if alg == "rtn"}
    for spec, alg, r, err in rows:
        if r is None:
            lines.append(f"| {spec} | {alg} | failed: {err} | | | | | | | |")
            continue
        cmp = r["cmp"]
        gap = "" if alg == "rtn" or spec not in rtn_ppl else (
            f"{(rtn_ppl[spec] - cmp.ppl) / max(rtn_ppl[spec] - fp_ppl, 1e-9):.0%}")
        le = "" if r["err"] is None else f"{r['err']:.4f}"
        lines.append(
            f"| {spec} | {alg} | {cmp.ppl:.3f} | {cmp.kl_mean:.4f} | {cmp.top1_agreement:.3f} | "
            f"{le} | {gap} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} | "
            f"{r['base'] / 2**20:.0f} |")
    lines += [
        "",
        "'gap closed' = (ppl_RTN - ppl) / (ppl_RTN - ppl_float) at the same spec. 'mean layer "
        "rel. err' = mean over quantized linears of ||X(W-Q)^T|| / ||XW^T|| on the calibration "
        "inputs (only for calibration algorithms; W8A8 rows count weight error only).",
        "",
    ]
    for spec in ("w4g128", "w3g128"):
        cands = [(r["cmp"].ppl, alg) for s, alg, r, _ in ok if s == spec and alg != "rtn"]
        if cands and spec in rtn_ppl:
            best_ppl, best = min(cands)
            closed = (rtn_ppl[spec] - best_ppl) / max(rtn_ppl[spec] - fp_ppl, 1e-9)
            lines.append(f"- target 'best closes >= half of RTN's gap' at {spec}: best {best} "
                         f"closes {closed:.0%} -> {'met' if closed >= 0.5 else 'NOT met'}.")
    gptq = [r["seconds"] for s, alg, r, _ in ok if alg == "gptq"]
    if gptq:
        lines.append(f"- target 'GPTQ under a minute': GPTQ took {min(gptq):.1f}-{max(gptq):.1f} s "
                     f"-> {'met' if max(gptq) < 60 else 'NOT met'} (on the loaded shared machine).")
    lines += ["", *cap_section(cap_rows, "gptq", fp32_bytes)]
    lines += ["", PEERS_NOTE, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def cap_section(cap_rows: list, algorithm: str, fp32_bytes: int | None = None) -> list[str]:
    size = "" if fp32_bytes is None else f" The float32 model is {fp32_bytes / 2**20:.1f} MiB."
    lines = ["## Memory cap", "",
             f"{algorithm} w4g128 (2 x 512 calibration tokens where it calibrates) under "
             "`RLIMIT_AS` = the worker's virtual size after importing torch/transformers/lowbit "
             "and tokenizing + the cap. 'from disk' = `lowbit.quantize(path)` (one block in "
             "float at a time); 'in memory' = `from_pretrained` (whole float32 model) then "
             f"`lowbit.quantize`.{size}", "",
             "| cap above baseline | path | result | time s | peak RSS MiB | base RSS MiB |",
             "| ---: | --- | --- | ---: | ---: | ---: |"]
    for cap, in_memory, res in cap_rows:
        path = "in memory" if in_memory else "from disk"
        if res.get("ok"):
            peak, base = res["peak_rss_kib"] / 1024, res["baseline_rss_kib"] / 1024
            lines.append(f"| +{cap} MiB | {path} | ok | {res['seconds']:.1f} | {peak:.0f} | "
                         f"{base:.0f} |")
        else:
            lines.append(f"| +{cap} MiB | {path} | failed: {res['error']} | | | |")
    return lines


PEERS_NOTE = (
    "## Peer toolkits\n\nNot run in this table: no peer toolkit (hqq, llmcompressor, gptqmodel) "
    "is installed in a separate benchmark environment on this machine yet, so there is no "
    "side-by-side comparison and the issue's 'match or beat each peer' target is not checked."
)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
