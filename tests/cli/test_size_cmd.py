from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()
MODEL_3M = Path(__file__).resolve().parents[3] / "shared" / "models" / "llama-3m-shakespeare-mix"


def test_size_params_prints_28_gb_for_fp32():
    result = runner.invoke(app, ["size", "--params", "7e9"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "28.00 GB" in result.output and "w4g128" in result.output and "4.250" in result.output


def test_size_needs_exactly_one_source():
    result = runner.invoke(app, ["size"])
    assert result.exit_code == 2
    assert "give either MODEL_DIR or --params" in result.output


def test_size_of_a_folder_that_is_not_a_model(tmp_path):
    result = runner.invoke(app, ["size", str(tmp_path)])
    assert result.exit_code == 2
    assert "no *.safetensors" in result.output


@pytest.mark.skipif(not MODEL_3M.exists(), reason="fixture model ../shared/models absent")
def test_size_of_the_fixture_model():
    result = runner.invoke(app, ["size", str(MODEL_3M)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "nf4g64" in result.output


def test_size_refuses_less_than_one_parameter():
    result = runner.invoke(app, ["size", "--params", "0.1"])
    assert result.exit_code == 2 and "--params must be a finite number of parameters >= 1" in (
        result.output)
