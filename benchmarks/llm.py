"""LLM post-training algorithms on the fixture LM: perplexity, KL vs the float model, time, RSS.

Every quantization runs in its own subprocess (so its wall time and peak RSS are its own), from
the model folder (lowbit.quantize(path, ...): blocks read from disk one at a time), and saves the
result with lowbit.save; the parent loads each result and scores it against the float model on
the test split, with the float model's logits computed once.

    .venv/bin/python benchmarks/llm.py            # llama-19m, writes benchmarks/results/llm.md
    .venv/bin/python benchmarks/llm.py --quick    # fewer test tokens and calibration samples

Peer toolkits (``--peers``) run from a separate venv, never lowbit's, and only this section of
the results file is rewritten (lowbit's GPTQ and HQQ are rerun in the same run for the timing):

    python3.11 -m venv ../peers-venv
    ../peers-venv/bin/pip install -c constraints-cpu.txt torch==2.13.0 llmcompressor gptqmodel hqq
    .venv/bin/python benchmarks/llm.py --quick --peers --repeats 3
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
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported as a module

from _machine import FIXTURE_19M as DEFAULT_MODEL  # noqa: E402
from _machine import TEST, VAL, CachedReference  # noqa: E402

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
    # the architecture's transformers module (~2 s to import) is loaded before the timer, as
    # the peers' workers have it loaded (by from_pretrained) before theirs
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if type(config) in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM._model_mapping[type(config)]
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


def _unshadow_benchmarks() -> None:
    """Drop this script's folder from ``sys.path`` (a worker's ``sys.path[0]``), so no script
    here can shadow a package the peers import (``kernels.py``, since renamed
    ``weight_kernels.py``, once shadowed the ``kernels`` package transformers probes for)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]


def _ids_digest(ids) -> str:
    """A short hash of a (samples, seq_len) int64 tensor of token ids."""
    import hashlib

    return hashlib.sha256(ids.long().numpy().tobytes()).hexdigest()[:12]


def hqq_peer_worker(job: dict) -> dict:
    """The ``hqq`` package (run by the peers venv's python): HQQLinear on every decoder Linear,
    then the dequantized weights are written for the parent to score."""
    _unshadow_benchmarks()
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


def llmcompressor_peer_worker(job: dict) -> dict:
    """``llmcompressor``'s GPTQModifier (run by the peers venv's python) on every decoder-block
    Linear (``lm_head`` ignored; embeddings are not Linear), on CPU, with the same calibration
    ids as lowbit's worker (``job['calib_samples']`` x ``job['seq_len']``); writes the
    fake-quantized (dequantized) weights, each (out_features, in_features) float32, for the
    parent to score. Time = the ``oneshot`` call only."""
    _unshadow_benchmarks()
    import importlib.metadata as md

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model_dir = Path(job["model"])
    calib = calibration_ids(model_dir, job["calib_samples"], job["seq_len"])
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n]
    weights = {"num_bits": job["bits"], "type": "int", "symmetric": job["symmetric"],
               "strategy": "group", "group_size": job["group"]}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], actorder=None, block_size=128,
                          dampening_frac=0.01)
    baseline = _rss_kib("VmHWM")
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    out, grid_dev = {}, 0.0
    for n in names:
        mod = model.get_submodule(n)
        if not hasattr(mod, "weight_scale"):
            raise RuntimeError(f"llmcompressor left {n} unquantized")
        w = mod.weight.detach().float()
        scale = mod.weight_scale.detach().float().repeat_interleave(job["group"], dim=1)
        zero = mod.weight_zero_point.detach().float().repeat_interleave(job["group"], dim=1)
        codes = w / scale + zero
        grid_dev = max(grid_dev, (codes - codes.round()).abs().max().item())
        out[n + ".weight"] = w.contiguous()
    if grid_dev > 1e-3:
        raise RuntimeError(f"llmcompressor's weights are off its own grid by {grid_dev:.3g} codes")
    torch.save(out, job["out"])
    return {"ok": True, "seconds": seconds, "peak_rss_kib": peak, "baseline_rss_kib": baseline,
            "version": md.version("llmcompressor"), "modules": len(names),
            "grid_dev": grid_dev, "calib": _ids_digest(calib)}


def gptqmodel_peer_worker(job: dict) -> dict:
    """``gptqmodel``'s GPTQ (run by the peers venv's python) on every decoder-block Linear, on
    CPU, with the same calibration ids as lowbit's worker, in their order; writes each packed
    module's dequantized weight, (out_features, in_features) float32, checked against the
    module's own forward. Time = the ``quantize`` call only (it includes packing)."""
    _unshadow_benchmarks()
    # its CPU thread pool asks for 2 workers per pool; the default on 2 cores is 1 (ValueError)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import importlib.metadata as md

    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    model_dir = Path(job["model"])
    calib = calibration_ids(model_dir, job["calib_samples"], job["seq_len"])
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    # plain GPTQ like lowbit's: no act-order, and no group-aware reordering (on by default)
    cfg = QuantizeConfig(bits=job["bits"], group_size=job["group"], sym=job["symmetric"],
                         desc_act=False, act_group_aware=False, damp_percent=0.01,
                         offload_to_disk=False)
    wrapped = GPTQModel.load(str(model_dir), cfg, device="cpu", dtype=torch.float32)
    baseline = _rss_kib("VmHWM")
    start = time.perf_counter()
    wrapped.quantize(data, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    # the in-memory modules right after quantize() dequantize one zero-point step off (their
    # qzeros are in the checkpoint's v1 layout); score what its checkpoint loads back to
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save(tmp)
        # its plain torch kernel keeps the fp16 scales (the CPU auto choice at 4 bits: bf16)
        model = GPTQModel.load(tmp, device="cpu", dtype=torch.float16,
                               backend=BACKEND.GPTQ_TORCH).model
    names = [n for n, m in model.named_modules() if ".layers." in n and hasattr(m, "qweight")]
    out, fwd_dev = {}, 0.0
    for n in names:
        mod = model.get_submodule(n).eval()
        w = mod.dequantize_weight().float()
        if w.shape == (mod.in_features, mod.out_features):
            w = w.t()  # GPTQ packing keeps (in, out)
        with torch.no_grad():
            xi = torch.randn(3, mod.in_features, dtype=mod.scales.dtype)
            y = mod(xi).float()
            bias = 0 if getattr(mod, "bias", None) is None else mod.bias.float()
            fwd_dev = max(fwd_dev, ((y - (xi.float() @ w.t() + bias)).abs().max()
                                    / y.abs().max()).item())
        out[n + ".weight"] = w.contiguous()
    if fwd_dev > 1e-2:
        raise RuntimeError(f"dequantized weights disagree with the module forward ({fwd_dev:.3g})")
    torch.save(out, job["out"])
    return {"ok": True, "seconds": seconds, "peak_rss_kib": peak, "baseline_rss_kib": baseline,
            "version": md.version("gptqmodel"), "modules": len(names), "fwd_dev": fwd_dev,
            "dtype": str(mod.scales.dtype).removeprefix("torch."), "calib": _ids_digest(calib)}


PEER_WORKERS = {"hqq": hqq_peer_worker, "llmcompressor": llmcompressor_peer_worker,
                "gptqmodel": gptqmodel_peer_worker}

PEER_SPECS = {"w4g128": (4, 128, False), "w4g128-sym": (4, 128, True),
              "w3g128": (3, 128, False), "w2g64": (2, 64, False)}


def run_peers(args) -> None:
    """Peer toolkits side by side with lowbit, back to back in one run, per spec: lowbit GPTQ,
    llmcompressor GPTQ, gptqmodel GPTQ, lowbit HQQ, hqq (``--repeats`` rounds, interleaved).
    Rewrites only the results file's "## Peer toolkits" section."""
    import torch
    from _machine import machine_line
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit
    from lowbit.eval import compare_logits

    python = Path(args.peers_python)
    if not python.exists():
        raise SystemExit(f"--peers-python {python} does not exist")
    specs = args.specs.split(",") if args.specs else ["w4g128", "w3g128", "w2g64"]
    bad = [s for s in specs if s not in PEER_SPECS]
    if bad:
        raise SystemExit(f"--specs {bad} not supported with --peers; allowed: {list(PEER_SPECS)}")
    only = set(args.only.split(",")) if args.only else None
    max_tokens = args.max_tokens or (4096 if args.quick else 32768)
    calib_samples = args.calib_samples or (8 if args.quick else 32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    calib_digest = _ids_digest(calibration_ids(args.model, calib_samples, args.seq_len))
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = CachedReference(ref)
    n_linear = sum(isinstance(m, torch.nn.Linear) and ".layers." in n
                   for n, m in ref.named_modules())
    fp_ppl, machine, load0 = None, machine_line(), os.getloadavg()[0]
    # (toolkit label, how it is run, algorithm) per row; lowbit via its own worker (this venv)
    toolkits = [("lowbit gptq", "lowbit", "gptq"), ("llmcompressor gptq", "llmcompressor", None),
                ("gptqmodel gptq", "gptqmodel", None), ("lowbit hqq", "lowbit", "hqq"),
                ("hqq", "hqq", None)]
    toolkits = [t for t in toolkits if only is None or t[0].split()[-1] in only
                or t[1] in only]
    rows: dict[tuple[str, str], dict] = {}

    def run_one(spec: str, label: str, kind: str, alg: str | None, out: str | None) -> dict:
        bits, group, sym = PEER_SPECS[spec]
        if kind == "lowbit":
            return run_worker({"model": str(args.model), "spec": spec, "algorithm": alg,
                               "calib_samples": calib_samples, "seq_len": args.seq_len,
                               "out": out, "threads": args.threads})
        job = {"model": str(args.model), "bits": bits, "group": group, "symmetric": sym,
               "calib_samples": calib_samples, "seq_len": args.seq_len, "peer": kind,
               "out": out or f"{out_dir}/scratch.pt", "threads": args.threads}
        proc = subprocess.run([str(python), __file__, "--worker", json.dumps(job)],
                              capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            return {"ok": False, "error": f"exit {proc.returncode}: {tail}"}
        return json.loads(lines[-1])

    with tempfile.TemporaryDirectory() as out_dir:
        for spec in specs:
            runs: dict[str, list] = {label: [] for label, _, _ in toolkits}
            for r in range(args.repeats):  # interleaved: A B C D, A B C D, ...
                for label, kind, alg in toolkits:
                    if runs[label] and not runs[label][-1]["ok"]:
                        continue
                    out = f"{out_dir}/{kind}-{alg}" + ("" if kind == "lowbit" else ".pt")
                    runs[label].append(run_one(spec, label, kind, alg, out if r == 0 else None))
                    print(f"{spec} {label} run {r}: {runs[label][-1]}", flush=True)
            for label, kind, alg in toolkits:
                first = runs[label][0]
                if not all(x["ok"] for x in runs[label]):
                    err = next(x["error"] for x in runs[label] if not x["ok"])
                    rows[(spec, label)] = {"error": err}
                    continue
                if kind == "lowbit":
                    model = lowbit.load(f"{out_dir}/{kind}-{alg}").eval()
                else:
                    model = AutoModelForCausalLM.from_pretrained(
                        args.model, dtype=torch.float32).eval()
                    state = torch.load(f"{out_dir}/{kind}-{alg}.pt")
                    missing = set(state) - set(model.state_dict())
                    if missing:
                        raise RuntimeError(f"{label}: unknown keys {sorted(missing)[:3]}")
                    model.load_state_dict(state, strict=False)
                cmp = compare_logits(model, reference, ids, context=args.context,
                                     stride=args.stride, max_tokens=max_tokens)
                fp_ppl = cmp.reference_ppl
                rows[(spec, label)] = {
                    "cmp": cmp, "first": first,
                    "seconds": statistics.median(x["seconds"] for x in runs[label]),
                    "spread": (min(x["seconds"] for x in runs[label]),
                               max(x["seconds"] for x in runs[label])),
                    "peak": statistics.median(x["peak_rss_kib"] for x in runs[label]) / 1024}
                if first.get("calib") and first["calib"] != calib_digest:
                    rows[(spec, label)]["note"] = "calibration ids differ from lowbit's"
                if first.get("modules", n_linear) != n_linear:
                    rows[(spec, label)]["note"] = f"{first['modules']}/{n_linear} Linears"
                print(f"{spec} {label}: ppl {cmp.ppl:.3f} KL {cmp.kl_mean:.4f} "
                      f"top1 {cmp.top1_agreement:.3f} {rows[(spec, label)]['seconds']:.1f} s",
                      flush=True)
                _write_peer_section(args, python, specs, toolkits, rows, fp_ppl, max_tokens,
                                    calib_samples, machine, (load0, os.getloadavg()[0]))


def _peer_config(spec: str, label: str) -> str:
    bits, group, sym = PEER_SPECS[spec]
    kind = "sym" if sym else "asym"
    if label == "lowbit gptq":
        groups = ("fixed up front (static, the default at <= 2 bits)" if bits <= 2
                  else "from the error-updated weight")
        return (f"`{spec}` preset: int{bits} {kind} g{group}, fp16 scale/zero; damp 0.01, "
                f"no act-order, block 128; group qparams {groups}, each group's range "
                "searched (default clip_grid=20, max_shrink=0.4: the shrink of min-max with "
                "the least diag(H)-weighted weight error); sequential within a block "
                "(default: later Linears see the already quantized earlier ones)")
    if label == "llmcompressor gptq":
        return (f"GPTQModifier int{bits} {kind} group {group} (fp32 scale, int zero); "
                "damp 0.01, actorder=None, block 128; group qparams fixed up front (min-max of "
                "the original weight)")
    if label == "gptqmodel gptq":
        return (f"QuantizeConfig(bits={bits}, group_size={group}, sym={sym}, desc_act=False, "
                "act_group_aware=False (default True), damp_percent=0.01), fp16 scales; "
                "true_sequential (default: a block's later Linears see the already quantized "
                "earlier ones); scored from its saved checkpoint")
    if label == "lowbit hqq":
        return f"`{spec}` preset, `hqq` algorithm"
    return f"HQQLinear nbits={bits} group_size={group}, float32 scale/zero"


def _write_peer_section(args, python, specs, toolkits, rows, fp_ppl, max_tokens, calib_samples,
                        machine, load) -> None:
    versions = {label: r["first"].get("version") for (_, label), r in rows.items()
                if "first" in r}
    threads = "" if args.threads is None else f" --threads {args.threads}"
    lines = [
        "## Peer toolkits", "",
        f"Machine: {machine}. Written by `benchmarks/llm.py{' --quick' if args.quick else ''} "
        f"--peers --repeats {args.repeats}{threads}` with the peers run by `{python}` (a separate "
        f"venv, see the module docstring); timing runs per config: {args.repeats} (median), "
        "the rounds interleaved (every toolkit once, then again).", "",
        f"Same model, same test tokens as the main table ({max_tokens:,}, context "
        f"{args.context}, stride {args.stride}), float ppl {fp_ppl:.3f}; same calibration ids for "
        f"the three GPTQs ({calib_samples} x {args.seq_len} tokens from the start of "
        "`shakespeare-mix-val.txt`, `calibration_ids()`, checked by hash); quantized: every "
        "Linear of the decoder blocks, `lm_head` and embeddings in float. Every row ran in its "
        "own subprocess, back to back (never two at once), in this one run. lowbit rows: "
        "`lowbit.quantize(path)` from disk, saved and reloaded; peer rows: the peer's "
        "fake-quantized (dequantized) weights loaded into the float model and scored the same "
        "way. time = wall seconds of the quantization call only (lowbit.quantize / "
        "llmcompressor.oneshot / gptqmodel's quantize / the HQQLinear loop), including each "
        "one's calibration forward passes (lowbit's includes reading the weights from disk; "
        "its worker imports the model's transformers module before the timer, as the peers' "
        "workers have by loading the model); peak RSS = the worker's VmHWM after quantizing (the "
        "peers load the whole float model first; lowbit streams blocks from disk). Load "
        f"average (1 min) of the shared machine: {load[0]:.1f} at the start of this run, "
        f"{load[1]:.1f} at the last row; other jobs ran at the same time, so compare times "
        "within a spec only."
        + ("" if args.threads is None else f" Every worker (lowbit's and the peers') ran with "
           f"`torch.set_num_threads({args.threads})`: with 2 threads per worker on this shared "
           "2-core machine, wall times swung by up to 10x between runs of the same config."),
        "",
        "| spec | toolkit | config | ppl | KL | top-1 | time s: median (min-max) | peak RSS MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for spec in specs:
        for label, _, _ in toolkits:
            r = rows.get((spec, label))
            if r is None:
                continue
            name = label if not versions.get(label) else f"{label} {versions[label]}"
            if "error" in r:
                lines.append(f"| {spec} | {label} | {_peer_config(spec, label)} | "
                             f"failed: {r['error']} | | | | |")
                continue
            cmp = r["cmp"]
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {spec} | {name}{note} | {_peer_config(spec, label)} | "
                         f"{cmp.ppl:.3f} | {cmp.kl_mean:.4f} | {cmp.top1_agreement:.3f} | "
                         f"{r['seconds']:.1f} ({r['spread'][0]:.1f}-{r['spread'][1]:.1f}) | "
                         f"{r['peak']:.0f} |")
    lines += ["", "lowbit against each peer at the same spec, same run. Quality: 'matches or "
              "beats' = KL and ppl both no worse, 'MIXED' = one of them worse; with 4,096 scored "
              "tokens, ppl differences below ~0.3 at w4g128 are within noise (KL and top-1 are "
              "steadier). Time: 'faster'/'SLOWER' only where the timing runs do not overlap.",
              ""]
    for spec in specs:
        for ours, theirs in (("lowbit gptq", "llmcompressor gptq"),
                             ("lowbit gptq", "gptqmodel gptq"), ("lowbit hqq", "hqq")):
            a, b = rows.get((spec, ours)), rows.get((spec, theirs))
            if not a or not b or "error" in a or "error" in b:
                continue
            ka, kb = a["cmp"].kl_mean, b["cmp"].kl_mean
            pa, pb = a["cmp"].ppl, b["cmp"].ppl
            better = (ka <= kb) + (pa <= pb)
            quality = ("matches or beats", "is MIXED against", "is WORSE than")[2 - better]
            speed = b["seconds"] / max(a["seconds"], 1e-9)
            if a["spread"][1] < b["spread"][0]:
                verdict = "faster (no overlap of the runs)"
            elif a["spread"][0] > b["spread"][1]:
                verdict = "SLOWER (no overlap of the runs)"
            else:
                verdict = "tied (the runs overlap)"
            lines.append(f"- {spec}: {ours} {quality} {theirs} (KL {ka:.4f} vs {kb:.4f}, ppl "
                         f"{pa:.3f} vs {pb:.3f}, top-1 {a['cmp'].top1_agreement:.3f} vs "
                         f"{b['cmp'].top1_agreement:.3f}); time: {theirs} took {speed:.2f}x "
                         f"lowbit's median ({b['seconds']:.1f} s vs {a['seconds']:.1f} s) -> "
                         f"lowbit {verdict}.")
    lines.append("")
    text = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(_replace_section(text, "## Peer toolkits", "\n".join(lines)))
    print(f"wrote {args.out}")


def _replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with the level-2 section starting at ``heading`` (up to the next '## ') replaced
    by ``section``, or ``section`` appended when there is none."""
    if heading not in text:
        return text.rstrip("\n") + "\n\n" + section
    head, _, rest = text.partition(heading)
    nxt = rest.find("\n## ")
    tail = "" if nxt < 0 else rest[nxt + 1:]
    return head + section + ("\n" + tail if tail else "")


def run_worker(job: dict) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"} if job.get("cap_mb") else None
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def main() -> None:
    from _machine import protocol_parser

    ap = protocol_parser(__doc__.splitlines()[0], DEFAULT_MODEL,
                         ROOT / "benchmarks" / "results" / "llm.md")
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="timing runs per config (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each --peers worker (default: torch's own)")
    ap.add_argument("--only", default=None, help="comma-separated algorithms to run")
    ap.add_argument("--specs", default=None, help="comma-separated specs (default: all)")
    ap.add_argument("--caps", default="100", help="memory caps in MiB for the cap runs")
    ap.add_argument("--cap-algorithm", default="gptq")
    ap.add_argument("--caps-only", action="store_true",
                    help="only the memory-cap runs; write their section to --out")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peers", action="store_true",
                    help="run peer toolkits (llmcompressor, gptqmodel, hqq) from --peers-python "
                    "next to lowbit's GPTQ/HQQ and rewrite their section")
    ap.add_argument("--peers-python", default=str(ROOT.parent / "peers-venv" / "bin" / "python"),
                    help="python of the separate peers venv (see the module docstring)")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(PEER_WORKERS[job["peer"]](job) if job.get("peer") else worker(job)))
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
    from _machine import machine_line
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    load0 = os.getloadavg()[0]

    def write(cap_rows: list) -> None:
        write_markdown(args, rows, cap_rows, fp32_bytes, max_tokens, calib_samples, machine,
                       (load0, os.getloadavg()[0]))

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


def write_markdown(args, rows, cap_rows, fp32_bytes, max_tokens, calib_samples, machine,
                   load: tuple[float, float]) -> None:
    """Write the main section (up to the first '## ') of ``args.out``; the old file's later
    sections are kept as they are, except "## Memory cap", replaced when this run made cap
    rows. ``load``: the 1-minute load average at the start of the run and now."""
    name = args.model.name
    ok = [r for r in rows if r[2] is not None]
    fp_ppl = ok[0][2]["cmp"].reference_ppl if ok else float("nan")
    lines = [
        f"# LLM post-training algorithms on {name}",
        "",
        f"Machine: {machine}. Written by `benchmarks/llm.py{' --quick' if args.quick else ''}"
        f"{'' if args.repeats == 1 else f' --repeats {args.repeats}'}`.",
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
        f"- load average (1 min) of the machine: {load[0]:.1f} at the start of this run, "
        f"{load[1]:.1f} at its last row; each worker ran with torch's default thread count; "
        "wall times on a shared machine are noisy, so compare them within this table only.",
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
            kls = {alg: r["cmp"].kl_mean for s, alg, r, _ in ok if s == spec}
            kl_best = min((k, a) for a, k in kls.items() if a != "rtn")
            lines.append(f"- target 'best closes >= half of RTN's gap' at {spec}: best {best} "
                         f"closes {closed:.0%} -> {'met' if closed >= 0.5 else 'NOT met'} "
                         f"(KL: RTN {kls['rtn']:.4f}, lowest {kl_best[1]} {kl_best[0]:.4f}).")
    gptq = [r["seconds"] for s, alg, r, _ in ok if alg.startswith("gptq")]
    if gptq:
        lines.append(f"- target 'GPTQ under a minute': GPTQ (incl. act-order) took "
                     f"{min(gptq):.1f}-{max(gptq):.1f} s -> "
                     f"{'met' if max(gptq) < 60 else 'NOT met'} (load average {load[0]:.1f} at "
                     f"the start of the run, {load[1]:.1f} at its last row).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    tail = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    cap = "\n".join(cap_section(cap_rows, "gptq", fp32_bytes))
    if not tail:
        tail = cap + "\n\n" + PEERS_NOTE + "\n"
    elif cap_rows:  # this run's cap rows replace the old "## Memory cap" section
        tail = _replace_section(tail, "## Memory cap", cap + "\n")
    args.out.write_text("\n".join(lines) + "\n\n" + tail)
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
