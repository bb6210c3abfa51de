"""The real `lowbit` command and a wide CliRunner (tables unwrapped) for the CLI tests."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from lowbit.cli import app as lowbit_app


@pytest.fixture(scope="session")
def app() -> typer.Typer:
    return lowbit_app


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})
