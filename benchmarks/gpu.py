"""GPU kernels on one CUDA device: correctness against the oracles, then timings (issue #5).

Run from the repository root on a machine with a CUDA GPU, torch's CUDA build and triton:

    python benchmarks/gpu.py [--out PATH]     # a few minutes on an H100 (budget: --budget-s)
    python benchmarks/gpu.py --dry-run        # CPU rehearsal: tiny shapes, Triton interpreter

(a) Checks every CUDA kernel against its oracle, computed on the CPU: ``triton_int4`` (w4g128),
    ``triton_int8`` (w8), ``triton_lut4`` (nf4g64, fp4g32) and ``triton_fp8`` (fp8), each kernel
    kind forced in turn (gemv, gemv2 but for tables, gemm, dequant), against
    float64 products of the exact float32 weights (fp16, bf16, fp32 activations; float32
    accumulation and weight rounding to x's dtype allowed), ``cuda_w8a8`` (w8a8,
    w8a8-static) bit for bit against ``int8-reference``, ``cuda_fp8`` (fp8a8) against
    ``fp8-reference`` (fp8 tensor-core accumulation error allowed). A kernel that fails is left
    out of the timings and the script exits 1.
(b) Times, for M in (1, 16, 128, 2048) x (K, N) in (4096x4096, 4096x11008, 11008x4096), fp16
    ``F.linear`` against each kernel with fp16 activations: CUDA events around a CUDA graph of
    repeated calls (launch overhead out), warm-up first, median of replays, the weight rotated
    among copies totalling > 3x the L2 cache so every call reads it from device memory (eager
    timings too). Achieved GB/s = bytes moved (weight as the kernel reads it + x + y) / time,
    against the measured device copy bandwidth; the M=1 floor is those bytes / copy bandwidth.
    The Triton kernels autotune their launch config at the first call of each shape (the
    picks are listed in the report; --no-autotune times the defaults).
(c) Decodes end to end on the device: greedy tokens/s of a Llama shaped like the 19M fixture
    (random fp16 weights) in lowbit's Decoder and transformers' generate, fp16 vs w4g128 / w8
    (skipped where transformers is missing).
(d) Writes benchmarks/results/gpu.md (card, versions, protocol, tables, the issue's GPU targets
    met / not met) and prints a short table last.

Exit status: 0 all checks passed, 1 a check failed, 2 no usable CUDA device (or a CPU-only
torch). Needs nothing beyond torch (CUDA build), triton and this repository: its ``src`` goes
first on the path, so ``pip install`` is optional (the device machine has no network).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

T0 = time.perf_counter()  # the budget counts from here (imports included)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu.md"
ROWS = (1, 16, 128, 2048)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)
DRY_ROWS = (1, 16, 33)
DRY_SHAPES = ((256, 128), (128, 192))
# (kernel, preset) timed against fp16 F.linear
TIMED = (("triton_int4", "w4g128"), ("triton_int8", "w8"), ("triton_lut4", "nf4g64"),
         ("triton_fp8", "fp8"), ("cuda_w8a8", "w8a8"), ("cuda_fp8", "fp8a8"))
TABLE_KERNELS = ("triton_lut4", "triton_fp8")  # no gemv2 kind (its bit trick has no table form)
CUDA_ONLY = {"cuda_w8a8": "torch._int_mm on a GPU (its CPU arithmetic: tests/kernels/"
                          "test_cuda_w8a8.py)",
             "cuda_fp8": "torch._scaled_mm on an sm_89+ GPU (CPU arithmetic: tests/kernels/"
                         "test_cuda_w8a8.py)"}
TARGET_SPEEDUP, TARGET_FLOOR = 3.0, 1.3  # issue #5: int4 GEMV at M=1 vs fp16 / vs the floor



def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU rehearsal of the whole flow: tiny shapes, TRITON_INTERPRET=1, "
                             "CUDA-only kernels skipped")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown to write (default: benchmarks/results/gpu.md; a temp "
                             "file for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no new timing after this many seconds (default 300)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="time the Triton kernels' default configs (LOWBIT_TRITON_AUTOTUNE=0)")
    return parser.parse_args()


ARGS = _parse()
if ARGS.dry_run:  # must precede the first @triton.jit (the kernels are built lazily)
    os.environ["TRITON_INTERPRET"] = "1"
if ARGS.no_autotune:
    os.environ["LOWBIT_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))  # this checkout's lowbit, installed or not
from _machine import machine_line  # noqa: E402

from lowbit.kernels import (  # noqa: E402
    KERNELS,
    cuda_w8a8,
    select_kernel,
    triton_act,
    triton_int4,
)
from lowbit.kernels.int8 import int8_reference_linear  # noqa: E402
from lowbit.spec import preset  # noqa: E402
from lowbit.tensor import QuantizedTensor  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def over_budget() -> bool:
    return time.perf_counter() - T0 > ARGS.budget_s


# ---- device ---------------------------------------------------------------------------------
def pick_device() -> torch.device:
    if ARGS.dry_run:
        return torch.device("cpu")
    if torch.version.cuda is None:
        print(f"gpu.py: torch {torch.__version__} is a CPU-only build; run on a machine with "
              "torch's CUDA build (or --dry-run)", file=sys.stderr)
        raise SystemExit(2)
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("gpu.py: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run on a GPU machine (or --dry-run)", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda", 0)


DEVICE = pick_device()
ON_GPU = DEVICE.type == "cuda"
COPY_MIB = 1024 if ON_GPU else 64


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def qt_to(qt: QuantizedTensor, device: torch.device) -> QuantizedTensor:
    """A copy of ``qt`` with its tensors on ``device`` (cloned: a distinct weight in memory)."""
    moved = {f.name: getattr(qt, f.name) for f in dataclasses.fields(qt)}
    for name, v in moved.items():
        if isinstance(v, torch.Tensor):
            moved[name] = v.to(device, copy=True)
    return QuantizedTensor(**moved)


def quantized(w: torch.Tensor, spec) -> QuantizedTensor:
    """``w`` quantized with ``spec`` (a preset name or QuantSpec) on its own device (falls back
    to the CPU)."""
    try:
        qt = QuantizedTensor.from_float(w, spec)
    except Exception as e:  # a torch op lowbit's Q uses may lack a CUDA kernel
        log(f"quantizing on {w.device} failed ({type(e).__name__}: {e}); quantizing on the CPU")
        qt = qt_to(QuantizedTensor.from_float(w.cpu(), spec), w.device)
    return qt


def kernel_available(name: str, qt: QuantizedTensor, x: torch.Tensor) -> str | None:
    """None when ``name`` can run this call here, else why not."""
    if not ON_GPU:
        if name in CUDA_ONLY:
            return f"CUDA-only: {CUDA_ONLY[name]}"
        if not triton_int4.triton_available():
            return "triton is not importable here"
        return None
    if name not in KERNELS:
        return "not registered"
    if not KERNELS[name].supports(qt, x):
        why = {"triton_int4": "triton missing?", "triton_int8": "triton missing?",
               "triton_lut4": "triton missing?", "triton_fp8": "triton missing?",
               "cuda_w8a8": "torch._int_mm missing?",
               "cuda_fp8": f"needs compute capability >= 8.9 and torch._scaled_mm; this is "
                           f"sm_{''.join(map(str, torch.cuda.get_device_capability(DEVICE)))}"}
        return f"supports() is False ({why.get(name, '')})"
    return None


# ---- (a) correctness ------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    kernel: str
    preset: str
    shape: tuple[int, int, int]
    dtype: str
    ok: bool
    detail: str


# each code path of the Triton kernels, forced (the dispatch default is autotuned per shape)
TRITON_KINDS = {
    "gemv": triton_int4.Config("gemv", block_n=4, block_k=512, num_warps=4),
    "gemv2": triton_int4.Config("gemv2", block_n=8, block_k=2048, num_warps=2),
    "gemm": triton_int4.Config("gemm", 16, 32, 128, num_warps=4, num_stages=4),
    "gemm-split4": triton_int4.Config("gemm", 16, 32, 128, num_warps=4, num_stages=4,
                                      split_k=4),
    "dequant": triton_int4.Config("dequant", block_n=16, block_k=512, num_warps=4),
}


def _weight_only_oracle(x, qt, bias):
    """(float64 reference, tolerance) from the exact float32 weights ``(code - zc) * s`` (CPU):
    float32 sums, one rounding of the output to x's dtype, and for the dequant kind one rounding
    of each weight to x's dtype (``eps / 2 * mag``)."""
    xc, qc = x.cpu(), qt_to(qt, torch.device("cpu"))
    w = qc.dequantize(torch.float32).double()
    ref = xc.double() @ w.T
    mag = xc.double().abs() @ w.abs().T
    if bias is not None:
        b = bias.cpu().to(x.dtype).double()
        ref, mag = ref + b, mag + b.abs()
    k = x.shape[1]
    eps = torch.finfo(x.dtype).eps
    tol = 16 * k**0.5 * 2.0**-24 * mag + eps * (ref.abs() + mag / 2) + 1e-6
    return ref, tol


def _fp8_oracle(x, qt, bias):
    xc, qc = x.cpu(), qt_to(qt, torch.device("cpu"))
    ref = cuda_w8a8.fp8_reference_linear(xc, qc, None if bias is None else bias.cpu(), {})
    xq, sx = cuda_w8a8.quantize_act_fp8(xc, qc)
    wq = cuda_w8a8.fp8_weight_layout(qc, xc.device)[0][: qc.shape[0], : qc.shape[1]]
    mag = (xq.double().abs() @ wq.double().abs().T) * sx.double() * qc.scale.double().reshape(
        1, -1)
    # Hopper's fp8 MMA keeps fewer accumulator bits than fp32 between promotions
    tol = 2.0**-10 * mag + torch.finfo(x.dtype).eps * ref.double().abs() + 1e-6
    return ref.double(), tol


def run_checks() -> list[Check]:
    """Every kernel x a few shapes and activation dtypes, against its oracle on the CPU."""
    if ON_GPU:
        shapes = [(1, 4096, 4096), (7, 1024, 1000), (33, 2048, 520), (130, 512, 264)]
    else:
        shapes = [(1, 256, 64), (7, 128, 40), (33, 128, 24)]
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16,
                                                                             torch.float32]
    w8g128 = preset("w8").replace(format="uint8", symmetric=False, granularity="group",
                                  group_size=128)
    cases = [("triton_int4", "w4g128"), ("triton_int4", "w4g128-sym"),
             ("triton_int4", preset("w4g128").replace(zero_point="float")),
             ("triton_int8", "w8"), ("triton_int8", w8g128),
             ("triton_lut4", "nf4g64"), ("triton_lut4", "fp4g32"), ("triton_fp8", "fp8"),
             ("cuda_w8a8", "w8a8"), ("cuda_w8a8", "w8a8-static"), ("cuda_w8a8", "w7a8"),
             ("cuda_fp8", "fp8a8")]
    out: list[Check] = []
    for kernel, spec in cases:
        for si, (m, k, n) in enumerate(shapes):
            torch.manual_seed(si)
            w = torch.randn(n, k, device=DEVICE) * torch.rand(n, 1, device=DEVICE)
            qt = quantized(w, spec)
            if qt.spec.act is not None and not qt.spec.act.dynamic:
                qt.act_scale = torch.tensor(6.0 / 127, device=DEVICE)
            for dtype in dtypes:
                if kernel.startswith("triton") and dtype == torch.bfloat16 and not ON_GPU:
                    continue  # the interpreter's bf16 is not faithful
                if dtype != torch.float16 and si % 2:
                    continue  # bf16 and fp32 on every other shape (fewer Triton compiles)
                x = (torch.randn(2, m, k, device=DEVICE) * 2).to(dtype)
                bias = torch.randn(n, device=DEVICE) if si % 2 == 0 else None
                why = kernel_available(kernel, qt, x)
                label = (kernel, str(spec), (m, k, n), str(dtype).removeprefix("torch."))
                if why is not None:
                    out.append(Check(*label, ok=True, detail=f"SKIP: {why}"))
                    break
                kinds = TRITON_KINDS if kernel.startswith("triton") else {"": None}
                for kind, cfg in kinds.items():
                    if kernel in TABLE_KERNELS and kind == "gemv2":
                        continue
                    name = f"{kernel} {kind}".strip()
                    try:
                        y = _run_kernel(kernel, cfg, x, qt, bias)
                        out.append(Check(name, *label[1:], *_compare(kernel, x, qt, bias, y)))
                    except Exception as e:  # a failure to run is a failed check
                        out.append(Check(name, *label[1:], ok=False,
                                         detail=f"{type(e).__name__}: {e}"[:300]))
                    log(f"check {name} {label[1]} {label[2]} {label[3]}: "
                        f"{'PASS' if out[-1].ok else 'FAIL'} {out[-1].detail}")
    if ON_GPU:
        out += _act_code_checks()
    return out


def _act_code_checks() -> list[Check]:
    """The fused activation quantizer's codes and scales (kernels/triton_act.py) against the
    torch operations it replaces, bit for bit, on the GPU (the interpreter's fp8 conversion is
    not faithful, so CI cannot check the fp8 codes)."""
    out = []
    for spec_name, fn in (("w8a8", cuda_w8a8.quantize_act_int8),
                          ("w7a8", cuda_w8a8.quantize_act_int8),
                          ("fp8a8", cuda_w8a8.quantize_act_fp8)):
        qt = quantized(torch.randn(64, 4096, device=DEVICE), spec_name)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            torch.manual_seed(1)
            x = torch.randn(33, 4096, device=DEVICE) * 3
            x[1] = 0
            x[2, :64] = torch.arange(64, device=DEVICE) * 0.5 * x[2].abs().max() / 127
            x = x.to(dtype)
            label = ("triton_act", spec_name, (33, 4096, 0), str(dtype).removeprefix("torch."))
            try:
                ref, rsx = fn(x, qt)
                top = (float(cuda_w8a8.qrange(qt.spec.act)[1]) if spec_name != "fp8a8"
                       else 448.0)
                codes = torch.empty_like(ref)
                sx = triton_act.quantize_act(x, codes, top=top, bounds=(
                    (-top, top) if spec_name == "fp8a8" else cuda_w8a8.qrange(qt.spec.act)))
                sync()
                same = torch.equal(codes.view(torch.uint8), ref.view(torch.uint8)) and \
                    torch.equal(sx, rsx)
                diff = int((codes.view(torch.uint8) != ref.view(torch.uint8)).sum())
                out.append(Check(*label, same, "bit-exact" if same else
                                 f"{diff} codes differ, scales equal: {torch.equal(sx, rsx)}"))
            except Exception as e:
                out.append(Check(*label, False, f"{type(e).__name__}: {e}"[:300]))
            log(f"check triton_act {spec_name} {label[3]}: {'PASS' if out[-1].ok else 'FAIL'} "
                f"{out[-1].detail}")
    return out


def _run_kernel(kernel: str, cfg, x, qt, bias):
    """One call: a Triton kernel with a forced launch config (each kind its own code path), or
    the kernel dispatch selects on the GPU (as a module calls it)."""
    if cfg is not None:
        layout = triton_int4.execution_layout(qt).to(x.device)
        b = None if bias is None else bias.to(x.dtype)
        y = triton_int4.wo_matmul(x.reshape(-1, x.shape[-1]), layout, b, cfg)
        y = y.reshape(*x.shape[:-1], qt.shape[0])
    else:
        fn = select_kernel(qt, x, kernel).fn if ON_GPU else KERNELS[kernel].fn
        y = fn(x, qt, bias, {})
    sync()
    return y


def _compare(kernel, x, qt, bias, y) -> tuple[bool, str]:
    n = qt.shape[0]
    y = y.cpu()
    if y.shape != (*x.shape[:-1], n) or y.dtype != x.dtype:
        return False, f"shape/dtype {tuple(y.shape)} {y.dtype}"
    if not bool(torch.isfinite(y).all()):
        return False, "non-finite output"
    x2 = x.reshape(-1, x.shape[-1])
    if kernel == "cuda_w8a8":
        qc = qt_to(qt, torch.device("cpu"))
        ref = int8_reference_linear(x.cpu(), qc, None if bias is None else bias.cpu(), {})
        same = torch.equal(y, ref)
        diff = float((y.float() - ref.float()).abs().max())
        return same, "bit-exact" if same else f"max |diff| {diff:.3g} (must be 0)"
    oracle = _fp8_oracle if kernel == "cuda_fp8" else _weight_only_oracle
    ref, tol = oracle(x2, qt, bias)
    err = (y.reshape(-1, n).double() - ref.reshape(-1, n)).abs()
    ratio = float((err / tol).max())
    return ratio <= 1.0, f"max err/tol {ratio:.3f}"


# ---- timing -------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """GB/s of a large device copy, read + write bytes (median of 10)."""
    nbytes = COPY_MIB << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        times.append(_elapsed(lambda: dst.copy_(src)))
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def _elapsed(fn) -> float:
    """Seconds of one call of ``fn`` (CUDA events on the GPU)."""
    if ON_GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_calls(calls: list, trials: int = 5) -> tuple[float, float | None]:
    """(eager seconds per call, graph seconds per call or None): ``calls`` rotate the weight
    copies; warm-up, then ``trials`` timings of a loop over a repeat count sized to ~2 ms."""
    for fn in calls:  # warm-up: compiles, caches layouts
        fn()
    sync()
    one = _elapsed(lambda: [fn() for fn in calls]) / len(calls)
    per_loop = max(1, min(200, int(2e-3 / max(one, 1e-7)) // len(calls)))
    seq = calls * per_loop

    def loop():
        for fn in seq:
            fn()

    eager = statistics.median(_elapsed(loop) for _ in range(trials)) / len(seq)
    if not ON_GPU:
        return eager, None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        graph.replay()
        sync()
        replay = statistics.median(_elapsed(graph.replay) for _ in range(trials)) / len(seq)
        del graph
    except Exception as e:
        log(f"CUDA graph capture failed ({type(e).__name__}: {e}); eager timing only")
        replay = None
    return eager, replay


def n_copies(weight_bytes: int) -> int:
    """Weight copies to rotate so that they exceed 3x the L2 cache (1 on the CPU)."""
    if not ON_GPU:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(3 * l2 / weight_bytes)))


@dataclasses.dataclass
class Timing:
    kernel: str
    m: int
    k: int
    n: int
    eager_s: float
    graph_s: float | None
    nbytes: int  # weight as read + x + y

    @property
    def best_s(self) -> float:
        return self.graph_s if self.graph_s is not None else self.eager_s


def weight_read_bytes(kernel: str, qt: QuantizedTensor | None, w16: torch.Tensor) -> int:
    if kernel == "fp16":
        return w16.numel() * w16.element_size()
    if kernel.startswith("triton"):
        return triton_int4.execution_layout(qt).nbytes
    n, k = qt.shape
    multiple = cuda_w8a8.INT_MM_MULTIPLE if kernel == "cuda_w8a8" else \
        cuda_w8a8.SCALED_MM_MULTIPLE
    padded = (-(-n // multiple) * multiple) * (-(-k // multiple) * multiple)
    return padded + qt.scale.numel() * 4


def run_timings(failed: set[str]) -> tuple[list[Timing], dict[str, str], list]:
    """Kernels x shapes x M. Returns (timings, skipped, the autotuner's picks)."""
    rows, shapes = (DRY_ROWS, DRY_SHAPES) if not ON_GPU else (ROWS, SHAPES)
    timings: list[Timing] = []
    skipped: dict[str, str] = {}
    for k, n in shapes:
        if over_budget():
            log("time budget spent: remaining shapes not timed")
            break
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEVICE) * 0.02
        w16 = w.half()
        qts: dict[str, list[QuantizedTensor]] = {}
        for kernel, spec_name in TIMED:
            if kernel in failed:
                skipped[kernel] = "failed its check"
                continue
            qt = quantized(w, spec_name)
            why = kernel_available(kernel, qt, torch.zeros(1, k, device=DEVICE,
                                                          dtype=torch.float16))
            if why is not None:
                skipped[kernel] = why
                continue
            copies = n_copies(weight_read_bytes(kernel, qt, w16))
            qts[kernel] = [qt] + [qt_to(qt, DEVICE) for _ in range(copies - 1)]
        w16s = [w16] + [w16.clone() for _ in range(n_copies(w16.numel() * 2) - 1)]
        del w
        for m in rows:
            if over_budget():
                log("time budget spent: remaining rows not timed")
                break
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            io = (m * k + m * n) * 2
            cells = {"fp16": ([lambda w_=w_, x=x: F.linear(x, w_) for w_ in w16s],
                              weight_read_bytes("fp16", None, w16) + io)}
            for kernel, copies in qts.items():
                fn = KERNELS[kernel].fn
                caches = [{} for _ in copies]
                cells[kernel] = ([lambda q=q, c=c, fn=fn, x=x: fn(x, q, None, c)
                                  for q, c in zip(copies, caches, strict=True)],
                                 weight_read_bytes(kernel, copies[0], w16) + io)
            done = []
            for kernel, (calls, nbytes) in cells.items():
                try:
                    done.append(Timing(kernel, m, k, n, *time_calls(calls), nbytes))
                except Exception as e:  # report the rest rather than lose the run
                    log(f"timing {kernel} M={m} K={k} N={n} failed: {type(e).__name__}: {e}")
                    skipped[kernel] = f"timing failed: {type(e).__name__}: {e}"[:200]
                    sync()
            timings += done
            log(f"timed M={m} K={k} N={n}: " + ", ".join(
                f"{t.kernel} {t.best_s * 1e6:.1f}us" for t in done))
        del qts, w16s
        if ON_GPU:
            torch.cuda.empty_cache()
    return timings, skipped, triton_int4.tuned_configs()


# ---- (c) report ---------------------------------------------------------------------------
def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not importable"
    cuda = torch.version.cuda or "none (CPU build)"
    return f"torch {torch.__version__} (CUDA {cuda}), triton {tv}, Python {sys.version.split()[0]}"


def _card() -> str:
    if not ON_GPU:
        return "no GPU (--dry-run on the CPU, Triton interpreter)"
    p = torch.cuda.get_device_properties(DEVICE)
    cap = torch.cuda.get_device_capability(DEVICE)
    l2 = getattr(p, "L2_cache_size", 0) >> 20
    return (f"{torch.cuda.get_device_name(DEVICE)} (sm_{cap[0]}{cap[1]}, "
            f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, {l2} MiB L2)")


def targets(timings: list[Timing], bandwidth: float) -> list[str]:
    """The issue's GPU targets for triton_int4 at M=1, per (K, N)."""
    by = {(t.kernel, t.m, t.k, t.n): t for t in timings}
    lines = []
    for k, n in (SHAPES if ON_GPU else DRY_SHAPES):
        t4, t16 = by.get(("triton_int4", 1, k, n)), by.get(("fp16", 1, k, n))
        if t4 is None or t16 is None:
            lines.append(f"- {k}x{n}: not measured")
            continue
        speed = t16.best_s / t4.best_s
        floor = t4.nbytes / (bandwidth * 1e9)
        over = t4.best_s / floor
        ok = speed >= TARGET_SPEEDUP and over <= TARGET_FLOOR
        lines.append(
            f"- K x N = {k}x{n}: int4 {t4.best_s * 1e6:.1f} us vs fp16 {t16.best_s * 1e6:.1f} "
            f"us = **{speed:.2f}x** (target >= {TARGET_SPEEDUP}x: "
            f"{'met' if speed >= TARGET_SPEEDUP else 'not met'}); bandwidth floor "
            f"{floor * 1e6:.1f} us ({t4.nbytes / 1e6:.2f} MB at {bandwidth:.0f} GB/s), int4 at "
            f"**{over:.2f}x** of it (target <= {TARGET_FLOOR}x: "
            f"{'met' if over <= TARGET_FLOOR else 'not met'}) -> "
            f"**{'MET' if ok else 'NOT MET'}**")
    return lines


def write_report(checks, timings, skipped, tuned, bandwidth, out: Path,
                 decode: list[str]) -> list[str]:
    kernels = ["fp16"] + [k for k, _ in TIMED if any(t.kernel == k for t in timings)]
    by = {(t.kernel, t.m, t.k, t.n): t for t in timings}
    presets = dict(TIMED)
    head = "| M | K x N | " + " | ".join(
        f"{k} us" if k == "fp16" else f"{k} ({presets[k]}) us (vs fp16)" for k in kernels) + " |"
    table = [head, "| ---: | --- |" + " ---: |" * len(kernels)]
    gbs = ["| M | K x N | " + " | ".join(f"{k} GB/s (% of copy)" for k in kernels) + " |",
           "| ---: | --- |" + " ---: |" * len(kernels)]
    eager = ["| M | K x N | " + " | ".join(f"{k} eager us" for k in kernels) + " |",
             "| ---: | --- |" + " ---: |" * len(kernels)]
    short = [f"{'M':>5} {'KxN':>11} " + " ".join(f"{k[:11]:>14}" for k in kernels)]
    seen = sorted({(t.m, t.k, t.n) for t in timings}, key=lambda r: (r[1], r[2], r[0]))
    for m, k, n in seen:
        base = by.get(("fp16", m, k, n))
        cells, gcells, ecells, scells = [], [], [], []
        for kern in kernels:
            t = by.get((kern, m, k, n))
            if t is None:
                cells.append("")
                gcells.append("")
                ecells.append("")
                scells.append(f"{'-':>14}")
                continue
            ratio = base.best_s / t.best_s if base is not None else float("nan")
            cells.append(f"{t.best_s * 1e6:.1f}" + ("" if kern == "fp16" else
                                                     f" (**{ratio:.2f}x**)"))
            g = t.nbytes / t.best_s / 1e9
            gcells.append(f"{g:.0f} ({100 * g / bandwidth:.0f}%)")
            ecells.append(f"{t.eager_s * 1e6:.1f}")
            scells.append(f"{t.best_s * 1e6:8.1f}" + ("      " if kern == "fp16" else
                                                      f" {ratio:4.2f}x"))
        table.append(f"| {m} | {k}x{n} | " + " | ".join(cells) + " |")
        gbs.append(f"| {m} | {k}x{n} | " + " | ".join(gcells) + " |")
        eager.append(f"| {m} | {k}x{n} | " + " | ".join(ecells) + " |")
        short.append(f"{m:>5} {f'{k}x{n}':>11} " + " ".join(scells))
    check_lines = ["| kernel | preset | M x K x N | x dtype | result |",
                   "| --- | --- | --- | --- | --- |"]
    for c in checks:
        res = c.detail if c.detail.startswith("SKIP") else \
            f"{'PASS' if c.ok else '**FAIL**'} ({c.detail})"
        check_lines.append(f"| {c.kernel} | {c.preset} | {'x'.join(map(str, c.shape))} | "
                           f"{c.dtype} | {res} |")
    tuned_lines = ["| rows (bucket) | N | K | codes | group | x dtype | config |",
                   "| ---: | ---: | ---: | --- | ---: | --- | --- |"]
    for (rows, n, k, bits, group, dt, *rest), cfg in sorted(tuned.items(), key=lambda kv: (
            kv[0][-1], kv[0][3], kv[0][2], kv[0][1], kv[0][0])):
        codes = f"{bits}-bit {'table' if rest[-1] else 'affine'}"
        desc = (f"{cfg.kind} {cfg.block_n}x{cfg.block_k} / {cfg.num_warps} warps"
                + (f", {cfg.run_words}-word runs" if cfg.kind == "gemv2" else "")
                if cfg.kind in ("gemv", "gemv2")
                else "dequant + F.linear" if cfg.kind == "dequant"
                else f"gemm {cfg.block_m}x{cfg.block_n}x{cfg.block_k} / {cfg.num_warps} warps, "
                     f"{cfg.num_stages} stages" + (f", split-K {cfg.split_k}"
                                                   if cfg.split_k > 1 else ""))
        tuned_lines.append(f"| {rows} | {n} | {k} | {codes} | {group or 'row'} | "
                           f"{str(dt).removeprefix('torch.')} "
                           f"| {desc} |")
    target_lines = targets(timings, bandwidth)
    text = "\n".join([
        "# Quantized linear kernels on a GPU" + (" (dry run on the CPU)" if not ON_GPU else ""),
        "",
        f"Card: **{_card()}**. {_versions()}. Host: {machine_line()}. Date: {date.today()}.",
        f"Measured copy bandwidth: **{bandwidth:.0f} GB/s** ({COPY_MIB} MiB `copy_` on the "
        "device, read + write bytes, median of 10).",
        "",
        "Protocol: `python benchmarks/gpu.py" + (" --dry-run" if not ON_GPU else "") + "`. "
        "Random weights (N(0, 0.02)) and fp16 activations (N(0, 1)); each kernel as dispatch "
        "runs it (`KERNELS[name].fn` with a layout cache per weight copy). Per cell: warm-up "
        "calls, then a loop of calls sized to ~2 ms, rotating among copies of the weight "
        "that total > 3x the L2 cache (each call reads its weight from device memory), "
        "captured in a CUDA graph; time = median of 5 graph replays (CUDA events) / calls. "
        "Eager times (the same loop without a graph, so with launch overhead) are listed "
        "below. Bytes = weight as the kernel reads it (codes + scales + zero-points; padded "
        "int8/fp8 weight + fp32 scales) + x + y; GB/s = bytes / time. w8a8 and fp8 times "
        "include the per-token activation quantization and the float32 epilogue.",
        "",
        "## Issue #5 GPU targets (triton_int4, w4g128, M=1)",
        "",
        *target_lines,
        "",
        "## Time per call (graph replay), speedup vs fp16 `F.linear`",
        "",
        *table,
        "",
        "## Achieved bandwidth",
        "",
        *gbs,
        "",
        "## Eager time per call (launch overhead included)",
        "",
        *eager,
        "",
        "## Launch configs the autotuner picked (Triton kernels)",
        "",
        "At the first call of each (rows rounded up to a power of two, N, K, bits, dtypes) "
        "`triton_int4.wo_matmul` times its candidates (`candidate_configs`: GEMV on CUDA cores "
        "for M <= 4, tensor-core GEMM tiles, or dequantize to x's dtype + `F.linear`) with "
        "`triton.testing.do_bench` and keeps the fastest.",
        "",
        *(tuned_lines if tuned else ["(none: autotuning off or not run)"]),
        "",
        "## Decode end to end (lowbit Decoder vs transformers generate)",
        "",
        *decode,
        "",
        "## Correctness checks (oracles on the CPU)",
        "",
        *check_lines,
        "",
        *([f"Not timed: {', '.join(f'{k} ({v})' for k, v in skipped.items())}.", ""]
          if skipped else []),
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out}")
    return short + [""] + target_lines + [""] + [ln for ln in decode if ln.startswith("|")]



# ---- end-to-end decode ------------------------------------------------------------------------
FIXTURE_CONFIG = ROOT.parent / "shared" / "models" / "llama-19m-shakespeare-mix" / "config.json"
DECODE_SCHEMES = ("fp16", "w4g128", "w8")


def _decode_model():
    """A Llama with the 19M fixture's shape (its config.json where present) and random weights
    in fp16 on the device (tiny and fp32 on the CPU for --dry-run): speed needs no training."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    if ARGS.dry_run:
        fields = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    elif FIXTURE_CONFIG.is_file():
        fields = {k: v for k, v in json.loads(FIXTURE_CONFIG.read_text()).items()
                  if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                           "rms_norm_eps", "rope_theta", "max_position_embeddings")}
    else:
        fields = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
                  "num_attention_heads": 6, "num_key_value_heads": 6, "vocab_size": 8192}
    torch.manual_seed(0)
    dtype = torch.float32 if ARGS.dry_run else torch.float16
    return LlamaForCausalLM(LlamaConfig(**fields)).to(DEVICE, dtype).eval(), fields


def run_decode() -> list[str]:
    """Greedy tokens/s at batch 1 of lowbit's Decoder (eager: every Linear bound to the kernel
    dispatch picks) and of transformers' generate, fp16 vs w4g128 / w8 (RTN), on the device;
    the Decoder's tokens against transformers' on each model (reported, not a failure: random
    weights give near-tied logits, where fp16 rounding may pick another token)."""
    import copy

    try:
        import lowbit
        from lowbit.models.decode import Decoder
    except ImportError as e:
        return [f"Not run: {e} (lowbit's Decoder needs transformers)."]
    try:
        base, fields = _decode_model()
    except ImportError as e:
        return [f"Not run: transformers is not importable here ({e})."]
    new, prompt_len = (8, 8) if ARGS.dry_run else (64, 32)
    ids = torch.randint(3, fields["vocab_size"], (1, prompt_len),
                        generator=torch.Generator().manual_seed(1)).to(DEVICE)
    models = {"fp16": base}
    for scheme in DECODE_SCHEMES[1:]:
        models[scheme] = lowbit.quantize(copy.deepcopy(base), scheme)
    rows, equal = [], {}
    for scheme, model in models.items():
        if over_budget():
            rows.append((scheme, None, None, "over budget"))
            continue
        decoder = Decoder(model, 1, prompt_len + new)
        kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                  "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
        with torch.inference_mode():
            ours, theirs = decoder.generate(ids, new), model.generate(ids, **kwargs)
            equal[scheme] = bool(torch.equal(ours, theirs))
            runs = {"lowbit Decoder": lambda d=decoder: d.generate(ids, new),
                    "transformers generate": lambda m=model, kw=kwargs: m.generate(ids, **kw)}
            times = {runtime: [] for runtime in runs}
            for _ in range(3):
                for runtime, fn in runs.items():
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[runtime].append(time.perf_counter() - t0)
        kernel = select_kernel(model.model.layers[0].mlp.up_proj.qweight, ids.new_zeros(
            1, fields["hidden_size"], dtype=base.dtype)).name if scheme != "fp16" else "F.linear"
        rows.append((scheme, kernel, {k: new / statistics.median(v) for k, v in times.items()},
                     ""))
        log(f"decode {scheme}: " + ", ".join(f"{k} {new / statistics.median(v):.0f} tok/s"
                                            for k, v in times.items()))
    base_tps = rows[0][2]
    lines = ["| scheme | kernel | lowbit Decoder tok/s (vs fp16) | transformers generate tok/s "
             "(vs fp16) | Decoder tokens == generate's |", "| --- | --- | ---: | ---: | --- |"]
    for scheme, kernel, tps, note in rows:
        if tps is None:
            lines.append(f"| {scheme} | | {note} | | |")
            continue
        cells = [f"{tps[r]:.0f} ({tps[r] / base_tps[r]:.2f}x)" if base_tps else f"{tps[r]:.0f}"
                 for r in ("lowbit Decoder", "transformers generate")]
        lines.append(f"| {scheme} | {kernel} | {cells[0]} | {cells[1]} | "
                     f"{'yes' if equal[scheme] else 'no'} |")
    shape = ", ".join(f"{k}={v}" for k, v in fields.items())
    return [f"Llama with random weights ({shape}), {base.dtype}, batch 1, {prompt_len}-token "
            f"prompt, exactly {new} greedy new tokens, median of 3 runs each after one "
            "untimed run; eager (no CUDA graph: launch overhead included).", "", *lines]


def main() -> int:
    log(f"device: {_card()}; {_versions()}")
    if not ON_GPU and not triton_int4.triton_available():
        log("triton is not importable: the Triton kernels are skipped")
    if ON_GPU:  # what dispatch picks by default for fp16 activations on this device
        x = torch.zeros(1, 256, device=DEVICE, dtype=torch.float16)
        picks = {name: select_kernel(quantized(torch.randn(64, 256, device=DEVICE), name), x).name
                 for name in ("w4g128", "w8", "w8a8", "w8a8-static", "fp8a8")}
        log("dispatch picks: " + ", ".join(f"{k} -> {v}" for k, v in picks.items()))
    checks = run_checks()
    failed = {c.kernel.split()[0] for c in checks if not c.ok}
    n_pass = sum(c.ok and not c.detail.startswith("SKIP") for c in checks)
    log(f"checks: {n_pass} PASS, {sum(not c.ok for c in checks)} FAIL, "
        f"{sum(c.detail.startswith('SKIP') for c in checks)} SKIP"
        + (f"; failing kernels left out of the timings: {', '.join(sorted(failed))}"
           if failed else ""))
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth {bandwidth:.0f} GB/s")
    try:
        timings, skipped, tuned = run_timings(failed)
    except Exception as e:  # still write what the checks found
        log(f"timings aborted: {type(e).__name__}: {e}")
        timings, skipped, tuned = [], {"all": f"timings aborted: {type(e).__name__}: {e}"}, {}
        failed = failed | {"timings"}
    try:
        decode = run_decode()
    except Exception as e:  # the kernel results above still count
        log(f"decode aborted: {type(e).__name__}: {e}")
        decode = [f"Aborted: {type(e).__name__}: {e}"]
    out = ARGS.out or (RESULTS if ON_GPU else Path(os.environ.get("TMPDIR", "/tmp"))
                       / "lowbit_gpu_dry_run.md")
    short = write_report(checks, timings, skipped, tuned, bandwidth, out, decode)
    for c in checks:
        if not c.ok:
            print(f"FAIL {c.kernel} {c.preset} {c.shape} {c.dtype}: {c.detail}")
    print("\n".join(short))
    print(f"checks: {'ALL PASS' if not failed else 'FAILED: ' + ', '.join(sorted(failed))}; "
          f"total {time.perf_counter() - T0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
