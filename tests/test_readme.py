"""The README's presets table against the code: every preset listed once, with the spec, the
bits per weight and the CPU kernel it states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lowbit import PRESETS, QuantizedTensor
from lowbit.kernels import cpu_avx2, select_kernel
from lowbit.spec import preset
from lowbit.tensor import stored_nbytes

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| preset | spec | bits/weight (4096×4096) | CPU kernel | meaning |"


def preset_rows() -> dict[str, tuple[str, str, str]]:
    """preset -> (spec, bits, kernel cell) from the README's table (a row may list several
    presets, with their specs and bits in the same order, comma separated)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    if HEADER not in lines:
        raise AssertionError(f"README has no presets table headed {HEADER!r}")
    rows: dict[str, tuple[str, str, str]] = {}
    for line in lines[lines.index(HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        specs = re.findall(r"`([^`]+)`", cells[1])
        bits = [b.strip() for b in cells[2].split(",")]
        assert len(specs) == len(bits) == len(names), f"row {line!r}: one spec and bits per preset"
        for name, spec, bit in zip(names, specs, bits, strict=True):
            assert name not in rows, f"preset {name} listed twice"
            rows[name] = (spec, bit, cells[3])
    return rows


def test_every_preset_is_in_the_table_once() -> None:
    assert set(preset_rows()) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_spec_bits_and_cpu_kernel_are_what_the_code_does(name: str) -> None:
    spec, bits, kernel_cell = preset_rows()[name]
    assert spec == str(preset(name))
    assert f"{stored_nbytes(name, (4096, 4096)) * 8 / 4096**2:.3f}" == bits
    qt = QuantizedTensor.from_float(torch.randn(64, 256), name)
    if preset(name).act is not None and not preset(name).act.dynamic:
        qt.act_scale = torch.tensor(0.03)  # a calibrated static scale
    if cpu_avx2.extension() is None:
        pytest.skip(f"CPU kernels unavailable here: {cpu_avx2._LIB.error}")
    stated = re.findall(r"`([^`]+)`", kernel_cell)[0]
    assert select_kernel(qt, torch.randn(1, 256)).name == stated
