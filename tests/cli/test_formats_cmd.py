"""`lowbit formats` and `lowbit inspect` through the shared `app` and `runner` fixtures."""

from __future__ import annotations

import pytest
import typer


def test_formats_table(app: typer.Typer, runner) -> None:
    r = runner.invoke(app, ["formats"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    for text in ("fp32", "3.402823e+38", "fp8_e4m3fn", "448", "57344", "65504", "nan only",
                 "none (saturate)", "float8_e4m3fn", "nf4", "pow2_8", "uint8", "1/5/10"):
        assert text in out, text
    e4m3_line = next(line for line in out.splitlines() if "fp8_e4m3fn" in line)
    assert "448" in e4m3_line and "0.001953125" in e4m3_line


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "-1.5", "--format", "fp16"],
        ["inspect", "--format", "fp16", "--", "-1.5"],
        ["inspect", "--format", "fp16", "-1.5"],
    ],
)
def test_inspect_negative_value(app: typer.Typer, runner, args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "0xBE00" in r.stdout and "1 01111 1000000000" in r.stdout and "exact" in r.stdout


def test_inspect_point_one(app: typer.Typer, runner) -> None:
    r = runner.invoke(app, ["inspect", "0.1", "--format", "fp16"])
    assert r.exit_code == 0, r.output
    assert "0x2E66" in r.stdout and "0.0999755859375" in r.stdout
    assert "rounded to nearest even" in r.stdout


@pytest.mark.parametrize("value", ["-inf", "-1e-3", "-0", "-nan"])
def test_inspect_dash_values_are_not_options(app: typer.Typer, runner, value: str) -> None:
    r = runner.invoke(app, ["inspect", value, "--format", "e5m2"])
    assert r.exit_code == 0, r.output
    assert "fp8_e5m2" in r.stdout


def test_inspect_saturate(app: typer.Typer, runner) -> None:
    r = runner.invoke(app, ["inspect", "1e6", "--format", "e5m2", "--saturate"])
    assert r.exit_code == 0, r.output
    assert "57344" in r.stdout and "overflow: saturated to max 57344" in r.stdout
    r = runner.invoke(app, ["inspect", "1e6", "--format", "e5m2"])
    assert "overflow to inf" in r.stdout


@pytest.mark.parametrize(
    "args,start",
    [
        (["inspect", "1", "--format", "fp7"], "--format: unknown format 'fp7'; allowed: fp32"),
        (["inspect", "abc", "--format", "fp16"], "VALUE: value 'abc' is not a number"),
        (["inspect", "nan", "--format", "fp4"], "VALUE: fp4_e2m1 has no NaN encoding"),
    ],
)
def test_inspect_errors_are_one_line(app: typer.Typer, runner, args: list[str], start: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    assert "Traceback" not in r.output
