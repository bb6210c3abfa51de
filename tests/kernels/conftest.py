"""Shared fixtures of the kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

_SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


@pytest.fixture
def run_interpreted() -> Callable[[str], str]:
    """Run a Python script in a fresh process under Triton's interpreter (TRITON_INTERPRET=1
    must be set before the kernels are JIT-decorated) with this checkout's ``src`` first on the
    path; returns its stdout, failing the test with its stderr tail on a non-zero exit."""

    def run(script: str) -> str:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join([_SRC, env.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run
