"""Weight-only kernel speed on CPU: fp32 F.linear vs lowbit's kernels, against copy bandwidth.

For M in (1, 16, 128, 2048) x (K, N) in (4096x4096, 4096x11008, 11008x4096), and M=288 on
all-MiniLM-L6-v2's layer shapes (384x384, 384x1536, 1536x384; not with --quick): median time of
fp32 ``F.linear``, the ``reference`` kernel (dequantize + F.linear) and the fast kernel dispatch
picks for ``--spec`` (``cpu_int4`` for w4g128, ``cpu_int8`` for w8), interleaved round-robin
in the same run (the machine may be shared, so all kernels see the same load). At M=1 torch's
own int4 CPU op (``_weight_int4pack_mm_for_cpu``, tinygemm layout) is timed too for 4-bit
specs, as the rejected candidate. GB/s = stored weight bytes / time; the physical limit for
batch-1 is the machine's memory bandwidth, measured here as a 512 MiB tensor copy
((read + write bytes) / time).

Writes benchmarks/results/kernels.md (kernels_<spec>.md for other specs).
Run: python benchmarks/weight_kernels.py [--spec w4g128] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine_line

from lowbit import QuantizedTensor
from lowbit.kernels import KERNELS, cpu_avx2, select_kernel

RESULTS = Path(__file__).parent / "results" / "kernels.md"
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)
ROWS = (1, 16, 128, 2048)
# An encoder's layers at a batch: all-MiniLM-L6-v2's (K, N) at M=288 (lowbit demo's 16 x 18 tokens)
ENCODER_SHAPES, ENCODER_ROWS = ((384, 384), (384, 1536), (1536, 384)), (288,)


def copy_bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write bytes (median)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def tinygemm_layout(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout for an asymmetric uint4 qt: w = (q - 8) * s + zero_tg, so
    zero_tg = (8 - z) * s. Returns (packed weight, scales_and_zeros [K/g, N, 2] fp32)."""
    codes = qt.codes().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale = qt.scale.float()
    zero = (8 - qt.zero_point.float()) * scale
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def candidates(x, w, qt, cache, tinygemm, fast: str) -> dict:
    """name -> zero-argument callable computing ``x @ W^T`` that way."""
    bound = KERNELS[fast].bound(qt, None, cache)  # as a QuantLinear runs it: bound once
    fns = {
        "fp32": lambda: F.linear(x, w),
        "reference": lambda: KERNELS["reference"].fn(x, qt, None, {}),
        fast: lambda: bound(x),
    }
    if tinygemm is not None:
        packed, scales_zeros = tinygemm
        group = qt.spec.group_size
        fns["torch int4pack"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, group, scales_zeros
        )
    return fns


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up (also builds cached layouts)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in (1, 16), 4096x4096 only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--spec", default="w4g128")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: results/kernels.md for w4g128, "
                             "results/kernels_<spec>.md otherwise)")
    parser.add_argument("--threads", type=int, default=0, help="torch/kernel threads (0: default)")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS if args.spec == "w4g128" else RESULTS.with_name(
            f"kernels_{args.spec}.md")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = ROWS[:2] if args.quick else ROWS
    if cpu_avx2.extension() is None:
        raise SystemExit(f"cpu kernels unavailable: {cpu_avx2._LIB.error}")
    fast = select_kernel(QuantizedTensor.from_float(torch.randn(64, 256), args.spec),
                         torch.randn(1, 256)).name
    if fast == "reference":
        raise SystemExit(f"--spec {args.spec}: no fast CPU kernel, nothing to compare")

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth:.1f} GB/s")
    lines = []
    plan = [(k, n, rows) for k, n in shapes]
    if not args.quick:
        plan += [(k, n, ENCODER_ROWS) for k, n in ENCODER_SHAPES]
    for k, n, rows in plan:
        torch.manual_seed(0)
        w = torch.randn(n, k)
        qt = QuantizedTensor.from_float(w, args.spec)
        cache: dict = {}
        tg = tinygemm_layout(qt) if qt.spec.has_zero_point and qt.spec.bits == 4 else None
        for m in rows:
            x = torch.randn(m, k)
            fns = candidates(x, w, qt, cache, tg if m == 1 else None, fast)
            repeats = args.repeats if m * k * n < 2**34 else max(3, args.repeats // 2)
            t = interleaved_medians(fns, repeats)
            fp32_gbs = n * k * 4 / t["fp32"] / 1e9
            fast_gbs = qt.nbytes / t[fast] / 1e9
            tg_cell = (
                f"{t['torch int4pack'] * 1e3:.2f} ({t['fp32'] / t['torch int4pack']:.2f}x)"
                if "torch int4pack" in t else ""
            )
            line = (
                f"| {m} | {k}x{n} | {t['fp32'] * 1e3:.2f} | {t['reference'] * 1e3:.2f} | "
                f"{t[fast] * 1e3:.2f} | **{t['fp32'] / t[fast]:.2f}x** | "
                f"{t['fp32'] / t['reference']:.2f}x | {tg_cell} | {fp32_gbs:.1f} | "
                f"{fast_gbs:.1f} ({100 * fast_gbs / bandwidth:.0f}%) |"
            )
            print(line, flush=True)
            lines.append(line)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(
        [
            "# Weight-only kernels on CPU",
            "",
            f"Machine: {machine_line()}. Date: {date.today()}. Spec: {args.spec} "
            f"({qt.bits_per_weight:.3f} bits/weight stored). Measured copy bandwidth: "
            f"**{bandwidth:.1f} GB/s** (512 MiB `copy_`, read + write bytes).",
            "",
            f"Protocol: `python benchmarks/weight_kernels.py --spec {args.spec}"
            f"{' --quick' if args.quick else ''} "
            f"--threads {torch.get_num_threads()}`; "
            f"random fp32 weights and activations; the fast kernel bound once to its weight "
            f"(as a QuantLinear runs it); per shape one warm-up call of each kernel, "
            f"then {args.repeats} rounds (half for the largest products) in which every kernel "
            "runs once in turn (interleaved, so all see the same machine load); medians. "
            "The machine was shared with other jobs while this ran: absolute times are noisy, "
            "ratios within a row are the meaningful numbers. GB/s = stored weight bytes "
            "(fp32: 4 B/weight; quantized: packed codes + scales + zero-points) / time.",
            "",
            f"| M | K x N | fp32 ms | reference ms | {fast} ms | {fast} vs fp32 | "
            "reference vs fp32 | torch int4pack ms (vs fp32) | fp32 GB/s | "
            f"{fast} GB/s (% of copy BW) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *lines,
            "",
            f"{fast} runs its fused AVX2 GEMV for M <= {cpu_avx2.GEMV_MAX_ROWS} (weights of "
            f"fewer than {cpu_avx2.GEMV_SMALL_WEIGHT} elements: {cpu_avx2.GEMV_SMALL_MAX_ROWS}) "
            "and above it dequantizes the weight (AVX2; whole up to "
            f"{cpu_avx2.DEQUANT_WHOLE_MAX * 4 >> 20} MiB of fp32, else "
            f"{cpu_avx2.DEQUANT_BLOCK_ROWS} rows at a time) into a reused buffer and multiplies "
            "with the fp32 GEMM; at large M the layer is compute-bound "
            "and no weight-only kernel can beat fp32 on this CPU (there is no faster float "
            "GEMM than fp32 here: bf16 is ~7x slower, and integer GEMMs need quantized "
            "activations, i.e. W8A8 or W4A8). `torch int4pack` is torch's own CPU int4 op "
            "(`_weight_int4pack_mm_for_cpu`), rejected because it is far slower than fp32 "
            "on this AVX2 (no AVX-512) CPU.",
            "",
        ]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
