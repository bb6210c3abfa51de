"""The Triton weight-only kernels (int4, int8) under the interpreter (TRITON_INTERPRET=1) against a
float64 oracle built from the reference's dequantized weights.

The interpreter runs the kernels on CPU tensors with numpy. It must be switched on before the
kernels are JIT-decorated, so the checks run in one fresh subprocess. bf16 is not checked here:
the interpreter's bf16 conversions and dots are not faithful (a bf16 ``tl.dot`` returns garbage
under triton 3.9's interpreter); benchmarks/gpu.py checks bf16 on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch

from lowbit.kernels import triton_int4, triton_int8, triton_lut
from lowbit.kernels.dispatch import select_kernel
from lowbit.spec import preset
from lowbit.tensor import QuantizedTensor

pytestmark = pytest.mark.skipif(
    not triton_int4.triton_available(),
    reason="triton is not installed/importable here (pip install 'lowbit[test]')",
)

_SCRIPT = textwrap.dedent(
    """
    import torch
    from lowbit.kernels import triton_int4, triton_int8, triton_lut
    from lowbit.kernels.triton_int4 import Config, execution_layout, wo_matmul
    from lowbit.spec import preset
    from lowbit.tensor import QuantizedTensor

    torch.manual_seed(0)
    w8 = preset("w8")
    GEMV = Config("gemv", block_n=8, block_k=64)  # several K steps, several groups
    GEMM = Config("gemm", 16, 32, 64)
    DEQUANT = Config("dequant", block_n=16, block_k=64)
    SPLIT = Config("gemm", 16, 32, 64, split_k=4)
    # gemv2: block_k codes per step in runs of run_words int32 words (4 bits: 8 codes a word)
    GEMV2 = Config("gemv2", block_n=8, block_k=128)  # 4 runs of 4 words (4 bits)
    GEMV2_8 = Config("gemv2", block_n=8, block_k=256, run_words=8)  # 4 runs of 8 words
    GEMV2_16 = Config("gemv2", block_n=4, block_k=512, run_words=16)
    cases = [  # (spec, M, K, N, activation dtype, forced config)
        ("w4g128", 1, 256, 80, torch.float32, None),
        ("w4g64", 5, 192, 72, torch.float32, None),
        ("w4g128-sym", 17, 256, 48, torch.float32, None),
        ("int4-g128-sym-full", 3, 256, 40, torch.float32, None),  # negative scales
        ("int4-g128-sym-full", 1, 512, 12, torch.float16, GEMV2),
        ("int8-ch-sym-full", 2, 96, 24, torch.float32, None),
        (preset("w4g64").replace(group_size=32, zero_point="float"), 3, 96, 40, torch.float32,
         None),
        (preset("w4g64").replace(group_size=32, zero_point="float"), 1, 96, 40, torch.float32,
         GEMV),
        (preset("w4g128").replace(granularity="channel"), 1, 160, 24, torch.float16, GEMV),
        ("w4g128", 2, 256, 40, torch.float16, GEMM),
        ("w8", 1, 320, 40, torch.float32, None),
        ("w8", 5, 96, 72, torch.float32, None),
        ("w8", 17, 200, 24, torch.float16, None),
        (w8.replace(format="uint8", symmetric=False, granularity="group", group_size=32), 1, 128,
         40, torch.float32, GEMV),
        (w8.replace(format="uint8", symmetric=False, granularity="group", group_size=16,
                    zero_point="float"), 3, 96, 40, torch.float32, None),
        (w8.replace(granularity="tensor"), 1, 96, 24, torch.float16, None),
        (w8.replace(granularity="tensor", symmetric=False), 4, 64, 24, torch.float32, GEMM),
        ("w4g64", 3, 192, 40, torch.float32, DEQUANT),
        ("w4g64", 5, 320, 40, torch.float16, SPLIT),
        ("w8", 2, 512, 24, torch.float32, SPLIT),
        (w8.replace(format="uint8", symmetric=False, granularity="group", group_size=32), 2, 96,
         24, torch.float16, DEQUANT),
        # gemv2: several groups and K steps (the last one partial), N not a multiple of block_n
        (preset("w4g64").replace(group_size=32, zero_point="float"), 1, 352, 41, torch.float32,
         GEMV2),
        ("w4g128", 2, 1024, 37, torch.float16, GEMV2_8),
        ("w4g128-sym", 1, 1280, 20, torch.float32, GEMV2_16),
        ("w4g128-sym", 1, 512, 12, torch.float16, GEMV2),
        (preset("w4g128").replace(granularity="channel"), 1, 168, 24, torch.float16, GEMV2),
        ("w8", 1, 324, 40, torch.float32, GEMV2),  # 4 codes a word: 8 runs of 4 words a step
        (w8.replace(format="uint8", symmetric=False, granularity="group", group_size=32), 3, 288,
         40, torch.float16, GEMV2_8),
        (w8.replace(format="uint8", symmetric=False, granularity="group", group_size=16,
                    zero_point="float"), 1, 96, 20, torch.float32, GEMV2),
        (w8.replace(granularity="tensor", symmetric=False), 1, 200, 9, torch.float16, GEMV2),
        # 4-bit codes indexing a table (nf4, fp4): gemv, gemm (split too) and dequant
        ("nf4g64", 1, 256, 40, torch.float32, None),
        ("nf4g64", 3, 192, 41, torch.float16, GEMV),
        ("fp4g32", 1, 96, 24, torch.float32, GEMV),
        ("nf4g64", 5, 320, 40, torch.float16, GEMM),
        ("fp4g32", 17, 128, 24, torch.float32, None),
        ("nf4g64", 4, 256, 24, torch.float16, SPLIT),
        ("fp4g32", 3, 192, 40, torch.float16, DEQUANT),
        (preset("nf4g64").replace(granularity="channel"), 2, 128, 24, torch.float32, None),
        # fp8 weights: a table of the 256 codes' values
        ("fp8", 1, 160, 40, torch.float16, None),
        ("fp8", 3, 96, 41, torch.float32, GEMV),
        (preset("fp8").replace(format="fp8_e5m2", granularity="group", group_size=32), 5, 128,
         24, torch.float16, GEMM),
        ("fp8", 4, 128, 24, torch.float32, DEQUANT),
        ("fp8", 17, 64, 24, torch.float16, None),
    ]
    for spec, m, k, n, dtype, cfg in cases:
        qt = QuantizedTensor.from_float(torch.randn(n, k) * torch.rand(n, 1) * 2, spec)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n).to(dtype)
        w = qt.dequantize(torch.float32).double()  # (code - zc) * s, exact in float32
        ref = x.double() @ w.T + bias.double()
        mag = x.double().abs() @ w.abs().T + bias.double().abs()
        # float32 sums, the output rounded to x's dtype; the dequant kind also rounds each
        # weight to x's dtype (u * mag)
        eps = torch.finfo(dtype).eps
        tol = 16 * k ** 0.5 * 2.0 ** -24 * mag + eps * (ref.abs() + mag / 2) + 1e-6
        layout = execution_layout(qt)
        for b in (bias, None):
            y = wo_matmul(x, layout, b, cfg)
            expect = ref if b is not None else ref - bias.double()
            err = (y.double() - expect).abs()
            assert y.shape == (m, n) and y.dtype == dtype, (y.shape, y.dtype)
            assert bool((err <= tol).all()), (str(spec), m, dtype, float(err.max()),
                                              float(tol.max()))
        # codes read in the wrong order must be caught
        bad = layout.packed ^ 0x80 if qt.spec.bits == 8 else (qt.qdata >> 4) | (qt.qdata << 4)
        wrong = wo_matmul(x, triton_int4.WeightLayout(**{**layout.__dict__, "packed": bad}),
                          bias, cfg)
        assert bool(((wrong.double() - ref).abs() > tol).any()), str(spec)
    try:  # gemv2's bit trick has no table form
        wo_matmul(torch.randn(1, 256), execution_layout(QuantizedTensor.from_float(
            torch.randn(8, 256), "nf4g64")), None, GEMV2)
        raise AssertionError("gemv2 ran a table layout")
    except ValueError as e:
        assert "table layout" in str(e), e
    # the registered entry points (3-D input, cached layout) on CPU tensors
    entries = ((triton_int4.KERNEL, "w4g128"), (triton_lut.KERNEL, "nf4g64"),
               (triton_lut.FP8_KERNEL, "fp8"), (triton_int8.KERNEL, "w8"))
    for kernel, name in entries:
        qt = QuantizedTensor.from_float(torch.randn(48, 256), name)
        x = torch.randn(2, 3, 256)
        cache = {}
        y = kernel.fn(x, qt, None, cache)
        ref = x.double() @ qt.dequantize().double().T
        assert y.shape == (2, 3, 48) and kernel.name in cache
        assert float((y.double() - ref).abs().max()) < 1e-4
        assert torch.equal(kernel.fn(x, qt, None, cache), y)
    y = triton_int8.int8_matmul(x.reshape(-1, 256), qt)
    assert float((y.double() - ref.reshape(-1, 48)).abs().max()) < 1e-4
    print("OK", len(cases))
    """
)


def test_interpreter_matches_reference(run_interpreted) -> None:
    assert "OK 43" in run_interpreted(_SCRIPT)


@pytest.mark.parametrize(("module", "name"), [(triton_int4, "w4g128"), (triton_int8, "w8")])
def test_registered_for_cuda_only(module, name: str) -> None:
    qt = QuantizedTensor.from_float(torch.randn(16, 128), name)
    assert module.spec_supported(qt) if module is triton_int8 else module.spec_supported(qt, 4)
    assert not module.KERNEL.supports(qt, torch.randn(1, 128))
    assert select_kernel(qt, torch.randn(1, 128)).name != module.NAME


def test_table_codes_register_for_cuda_only() -> None:
    for name, bits in (("nf4g64", 4), ("fp4g32", 4), ("fp8", 8)):
        qt = QuantizedTensor.from_float(torch.randn(16, 128), name)
        assert triton_int4.table_spec_supported(qt, bits)
        assert not triton_int4.table_spec_supported(qt, 12 - bits)
        assert not triton_int4.spec_supported(qt, bits)
        for kernel in (triton_lut.KERNEL, triton_lut.FP8_KERNEL):
            assert not kernel.supports(qt, torch.randn(1, 128))
    for name in ("km4", "w4g128", "w8", "w3g128"):  # per-row tables, affine codes
        qt = QuantizedTensor.from_float(torch.randn(16, 128), name)
        assert not triton_int4.table_spec_supported(qt, 4)
        assert not triton_int4.table_spec_supported(qt, 8)


def test_spec_coverage() -> None:
    def ok(spec, k: int = 128) -> bool:
        return triton_int8.spec_supported(QuantizedTensor.from_float(torch.randn(8, k), spec))

    w8 = preset("w8")
    assert ok("w8") and ok(w8.replace(granularity="tensor"))
    assert ok(w8.replace(granularity="group", group_size=16, symmetric=False))
    assert not ok(w8.replace(granularity="group", group_size=8))  # BLOCK_K would be < 16
    assert not ok("w4g128") and not ok("w8a8") and not ok("nf4g64") and not ok("fp8")
    assert not triton_int4.spec_supported(
        QuantizedTensor.from_float(torch.randn(8, 64), preset("w4g64").replace(group_size=16))
    )


def test_bad_input_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="int4_matmul needs"):
        triton_int4.int4_matmul(
            torch.randn(4), torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 1),
            torch.zeros(2, 1), 4,
        )
    qt = QuantizedTensor.from_float(torch.randn(8, 64), "w8")
    with pytest.raises(ValueError, match="wo_matmul needs x"):
        triton_int4.wo_matmul(torch.randn(2, 32), triton_int4.execution_layout(qt))
    # gemv2 reads whole int32 words (K * bits % 32 == 0) and runs inside one group
    qt = QuantizedTensor.from_float(torch.randn(8, 34), "w8")
    with pytest.raises(ValueError, match="whole int32 words"):
        triton_int4.wo_matmul(torch.randn(1, 34), triton_int4.execution_layout(qt), None,
                              triton_int4.Config("gemv2", block_n=8, block_k=64))
    qt = QuantizedTensor.from_float(torch.randn(8, 64), preset("w4g64").replace(group_size=32))
    with pytest.raises(ValueError, match="gemv2 needs run_words"):
        triton_int4.wo_matmul(torch.randn(1, 64), triton_int4.execution_layout(qt), None,
                              triton_int4.Config("gemv2", block_n=8, block_k=256, run_words=8))
    with pytest.raises(ValueError, match="allowed: gemv, gemv2"):
        triton_int4.wo_matmul(torch.randn(1, 64), triton_int4.execution_layout(qt), None,
                              triton_int4.Config("gemv3"))
    with pytest.raises(ValueError, match="int8_matmul needs"):
        triton_int8.int8_matmul(torch.randn(2, 64), QuantizedTensor.from_float(
            torch.randn(8, 64), "w4g64"))


def _offline_compiler_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception:
        return False
    return True


def _stack_bytes(cubin: bytes, tmp_path) -> int | None:
    """Per-thread stack (register spills) ptxas gave the kernel, read with the cuobjdump
    Triton ships; None where it is missing."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True).stdout
    stacks = [int(w.split(":")[1]) for w in out.split() if w.startswith("STACK:")]
    return max(stacks) if stacks else None


@pytest.mark.skipif(not _offline_compiler_available(), reason="this triton has no ASTSource API")
@pytest.mark.parametrize(("bits", "table"), [(4, False), (8, False), (4, True), (8, True)],
                         ids=["int4", "int8", "nf4-fp4-table", "fp8-table"])
def test_candidate_configs_compile_for_hopper(bits: int, table: bool, tmp_path) -> None:
    """Triton's frontend and ptxas on every launch config the autotuner may pick (no GPU
    needed): the interpreter runs the kernels as Python, so only a compile catches what it would
    not; and no config may spill registers (an IEEE fp32 dot on big tiles did, and so did a
    128x128 tile holding both the accumulator and a group's partial dot)."""
    seen = set()
    for m in (1, 16, 64, 256, 2048):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cands = triton_int4.candidate_configs(m, bits, dtype, table)
            if dtype == torch.bfloat16:
                cands = cands[:1]  # the same tiles as fp16
            for cfg in cands:
                if (cfg, dtype) in seen:
                    continue
                seen.add((cfg, dtype))
                kernel = triton_int4.compile_offline(cfg.kind, bits, dtype, cfg, table=table)
                stack = _stack_bytes(kernel.asm["cubin"], tmp_path)
                assert stack in (0, None), f"{cfg} with {dtype} spills: {stack} bytes of stack"
    assert triton_int4.pick_config(1, 4096, 4096, bits, 128, table=table).kind == "gemv"
    # the gemv2 kind was compiled too, except for tables (its bit trick has no table form)
    assert any(cfg.kind == "gemv2" for cfg, _ in seen) != table
