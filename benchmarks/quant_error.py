"""Quantization error, size and speed of every preset on 4096x4096 Gaussian and Student-t weights.

Writes benchmarks/results/quant_error.md. Run: python benchmarks/quant_error.py [--size N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from _machine import machine_line

from lowbit import QuantizedTensor, preset
from lowbit.quant import sqnr_db
from lowbit.spec import PRESETS

RESULTS = Path(__file__).parent / "results" / "quant_error.md"


def weights(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n, n, generator=g)
    # Student-t with 4 degrees of freedom: a normal over sqrt(chi2_4 / 4), heavy tails like LLM
    # weights' outliers (kurtosis infinite for df <= 4).
    chi2 = torch.distributions.Chi2(torch.tensor(4.0)).sample((n, n))
    student = torch.randn(n, n, generator=g) / torch.sqrt(chi2 / 4)
    return {"gaussian": gauss, "student-t(4)": student}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = weights(args.size)
    lines = [
        "# Quantization error per preset",
        "",
        f"Weights: {args.size}x{args.size}, float32, N(0,1) and Student-t with 4 degrees of "
        f"freedom (seed 0). SQNR = 10 log10(sum w^2 / sum (w - Q^-1(Q(w)))^2). Bits per weight "
        "are the real stored bytes (codes, scales, zero-points, codebooks) x 8 / weights. "
        f"Quantize time: median of {args.repeats} runs of `QuantizedTensor.from_float` "
        "(choose qparams, quantize, pack).",
        "",
        f"Machine: {machine_line()}. Date: {date.today()}.",
        "",
        "| preset | spec | bits/weight | SQNR gaussian (dB) | SQNR student-t (dB) "
        "| quantize time gaussian (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in PRESETS:
        spec = preset(name)
        row = [name, f"`{spec}`"]
        sqnrs = []
        for w in data.values():
            qt = QuantizedTensor.from_float(w, spec)
            sqnrs.append(sqnr_db(w, qt.dequantize()))
        row.append(f"{qt.bits_per_weight:.3f}")
        row += [f"{s:.2f}" for s in sqnrs]
        t = median_time(lambda s=spec: QuantizedTensor.from_float(data["gaussian"], s),
                        args.repeats)
        row.append(f"{t:.3f}")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
