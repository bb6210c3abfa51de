"""NativeLibrary: builds once into the cache, loads with signatures, degrades to None with one
warning when the source does not compile."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from lowbit.kernels.native import NativeLibrary

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)
SOURCE = 'extern "C" int add_one(int x) { return x + 1; }\n'


def test_builds_once_and_loads_with_signatures(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    sig = {"add_one": ([ctypes.c_int], ctypes.c_int)}
    lib = NativeLibrary("t_add", SOURCE, ["-O1", "-shared", "-fPIC"], sig, needs_avx2=False)
    assert lib.get().add_one(41) == 42
    assert lib.get() is lib.get()
    built = list((tmp_path / "kernels").glob("t_add_*.so"))
    assert len(built) == 1
    again = NativeLibrary("t_add", SOURCE, ["-O1", "-shared", "-fPIC"], sig, needs_avx2=False)
    assert again.get().add_one(1) == 2
    assert list((tmp_path / "kernels").glob("t_add_*.so")) == built  # reused, not rebuilt


def test_a_source_that_does_not_compile_gives_none_and_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    lib = NativeLibrary("t_bad", "this is not C++", ["-shared", "-fPIC"], {}, needs_avx2=False)
    with pytest.warns(RuntimeWarning, match="lowbit t_bad kernels unavailable"):
        assert lib.get() is None
    assert lib.get() is None and "failed" in lib.error
    assert not list((tmp_path / "kernels").glob("t_bad_*"))  # nothing half-written left
