"""Every weight-only format on CPU: the kernel dispatch picks for it vs fp32 ``F.linear``.

For each weight-only preset (plus w4g128 with a GPTQ act-order group index) on LLM layer shapes
(K x N = 4096x4096 and 11008x4096), at M = 1, 16 and 128: median time of the kernel lowbit's
dispatch picks for float32 CPU inputs and of fp32 ``F.linear``, all interleaved round-robin in
the same run (the machine may be shared, so all see the same load); GB/s at M=1 = stored
weight bytes / time. On 4096x4096 the ``reference`` kernel (dequantize + ``F.linear``, what
formats without a fast kernel run on every call) is timed too at M=1, in a few rounds of its
own.

Writes benchmarks/results/format_kernels.md. Run: python benchmarks/format_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine_line
from weight_kernels import copy_bandwidth, interleaved_medians

from lowbit import PRESETS, QuantizedTensor
from lowbit.kernels import KERNELS, cpu_avx2, select_kernel
from lowbit.spec import preset

RESULTS = Path(__file__).parent / "results" / "format_kernels.md"
SHAPES = ((4096, 4096), (11008, 4096))  # (K, N)
ROWS = (1, 16, 128)
ROUNDS_FACTOR = {1: 5, 16: 2}  # rounds = --repeats x this
ACT_ORDER = "w4g128 + g_idx"  # w4g128 with a GPTQ act-order group index


def weight_formats() -> list[str]:
    return [name for name in PRESETS if preset(name).act is None] + [ACT_ORDER]


def quantized(w: torch.Tensor, name: str) -> QuantizedTensor:
    if name != ACT_ORDER:
        return QuantizedTensor.from_float(w, name)
    qt = QuantizedTensor.from_float(w, "w4g128")
    k, group = w.shape[1], qt.spec.group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    qt.g_idx = torch.empty(k, dtype=torch.int32)
    qt.g_idx[order] = torch.arange(k, dtype=torch.int32) // group
    return qt


def reference_ms(x: torch.Tensor, qt: QuantizedTensor, repeats: int) -> float:
    fn = KERNELS["reference"].fn
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, qt, None, {})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, M in (1, 16)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch/kernel threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = ROWS[:2] if args.quick else ROWS
    names = weight_formats()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth:.1f} GB/s")

    sections = []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k)
        weights = {name: quantized(w, name) for name in names}
        caches: dict[str, dict] = {name: {} for name in names}
        probe = torch.randn(1, k)
        kernel = {name: select_kernel(qt, probe).name for name, qt in weights.items()}
        times: dict[int, dict[str, float]] = {}
        for m in rows:
            x = torch.randn(m, k)
            fns = {"fp32": partial(F.linear, x, w)}
            for name, qt in weights.items():
                # bound once, as a QuantLinear runs it
                fns[name] = partial(KERNELS[kernel[name]].bound(qt, None, caches[name]), x)
            # the short calls get more rounds: their medians resist the shared machine's bursts
            times[m] = interleaved_medians(fns, args.repeats * ROUNDS_FACTOR.get(m, 1))
            print(f"{k}x{n} M={m}: " + ", ".join(
                f"{name} {times[m]['fp32'] / t:.2f}x" for name, t in times[m].items()), flush=True)
        reference = {}
        if (k, n) == SHAPES[0]:  # the slow path, a few rounds of its own
            x = torch.randn(1, k)
            for name, qt in weights.items():
                reference[name] = reference_ms(x, qt, repeats=3)
        header = (["format", "bits/weight", "kernel"]
                  + [f"M={m} ms (vs fp32)" for m in rows] + ["GB/s at M=1 (% of copy)"]
                  + (["reference at M=1 ms (vs fp32)"] if reference else []))
        lines = [
            f"### {k} x {n} (K x N)",
            "",
            "| " + " | ".join(header) + " |",
            "| --- | ---: | --- | " + " | ".join("---:" for _ in header[3:]) + " |",
        ]
        fp32_row = (["fp32", "32", "torch F.linear"]
                    + [f"{times[m]['fp32'] * 1e3:.2f} (1.00x)" for m in rows]
                    + [f"{n * k * 4 / times[1]['fp32'] / 1e9:.1f}"
                       f" ({100 * n * k * 4 / times[1]['fp32'] / 1e9 / bandwidth:.0f}%)"]
                    + (["-"] if reference else []))
        lines.append("| " + " | ".join(fp32_row) + " |")
        for name, qt in weights.items():
            gbs = qt.nbytes / times[1][name] / 1e9
            cells = [name, f"{qt.bits_per_weight:.3f}", kernel[name]]
            cells += [f"{times[m][name] * 1e3:.2f} (**{times[m]['fp32'] / times[m][name]:.2f}x**)"
                      for m in rows]
            cells.append(f"{gbs:.1f} ({100 * gbs / bandwidth:.0f}%)")
            if reference:
                ref = reference[name]
                cells.append(f"{ref:.1f} ({times[1]['fp32'] * 1e3 / ref:.3f}x)")
            lines.append("| " + " | ".join(cells) + " |")
        sections += [*lines, ""]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        "# Every weight-only format on CPU",
        "",
        f"Machine: {machine_line()}. Date: {date.today()}. Measured copy bandwidth: "
        f"**{bandwidth:.1f} GB/s** (512 MiB `copy_`, read + write bytes).",
        "",
        f"Protocol: `python benchmarks/format_kernels.py{' --quick' if args.quick else ''} "
        f"--threads {torch.get_num_threads()}`; random fp32 weights (N(0, 1)) and "
        "activations; each format quantized with RTN (`QuantizedTensor.from_float`), "
        f"`{ACT_ORDER}` is w4g128 with a random GPTQ act-order group index. Per shape and M, "
        f"one warm-up call each, then {args.repeats * ROUNDS_FACTOR[1]} (M=1), "
        f"{args.repeats * ROUNDS_FACTOR[16]} (M=16) or {args.repeats} (M=128) rounds in which "
        "fp32 and every format's kernel run once in turn (interleaved); medians. The "
        "`reference` column (dequantize + `F.linear`, which formats without a fast kernel run "
        "on every call) is the median of 3 calls of its own. The machine is shared: compare "
        "ratios within a row.",
        "",
        *sections,
        "The weight-only kernels (cpu_int1-4, cpu_int8, cpu_lut, cpu_fp8) run a fused AVX2 "
        f"GEMV for M <= {cpu_avx2.GEMV_MAX_ROWS} (the codes never exist as fp32); above it "
        "they dequantize the "
        "weight, 256 rows at a time for these shapes, into a reused fp32 buffer for torch's "
        "fp32 GEMM: the same multiply-adds as fp32 plus the dequantization, on blocks that "
        "stay in cache.",
        "",
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
