"""The README's presets table against the code: every preset listed, with the bits per weight
and the CPU kernel it states."""

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


def _preset_rows() -> dict[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| preset | spec |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for i, name in enumerate(re.findall(r"`([^`]+)`", cells[0])):
            rows[name] = [cells[2].split(",")[i].strip(), cells[3]]
    return rows


ROWS = _preset_rows()


def test_every_preset_is_in_the_table() -> None:
    assert set(ROWS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bits_and_cpu_kernel_are_what_the_code_does(name: str) -> None:
    bits, kernel_cell = ROWS[name]
    assert f"{stored_nbytes(name, (4096, 4096)) * 8 / 4096**2:.3f}" == bits
    qt = QuantizedTensor.from_float(torch.randn(64, 256), name)
    if preset(name).act is not None and not preset(name).act.dynamic:
        qt.act_scale = torch.tensor(0.03)  # a calibrated static scale
    if cpu_avx2.extension() is None:
        pytest.skip(f"CPU kernels unavailable here: {cpu_avx2._LIB.error}")
    stated = re.findall(r"`([^`]+)`", kernel_cell)[0]
    assert select_kernel(qt, torch.randn(1, 256)).name == stated
