"""NativeLibrary: builds once into the cache, loads with signatures, degrades to None with one
warning when the source does not compile; the bound kernels' output allocator."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from lowbit.kernels import native
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


def test_output_allocator_follows_the_leading_shape_on_the_cpu():
    allocate = native.output_allocator(5)
    shapes = [(), (3,), (3,), (2, 4), (), (3,)]
    with torch.device("meta"):  # a default device does not move the outputs
        outs = [allocate(torch.Size(lead)) for lead in shapes]
    for lead, out in zip(shapes, outs, strict=True):
        assert out.shape == (*lead, 5) and out.dtype == torch.float32 and out.is_cpu
    assert outs[1].data_ptr() != outs[2].data_ptr()  # fresh tensors, not a shared buffer
