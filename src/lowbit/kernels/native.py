"""Small C++ libraries compiled on first use and called through ctypes (the CPU kernels).

Each is plain C++ (no torch headers), built with the system compiler into
``~/.cache/lowbit/kernels/<stem>_<hash>.so`` (``LOWBIT_CACHE`` overrides), keyed by a hash of
source and flags, so a changed kernel rebuilds and concurrent builders agree on one file.
ctypes releases the GIL during calls. A library that cannot be built (no compiler, no AVX2)
reports None once, with the reason in a RuntimeWarning; its kernels then say they are
unsupported and dispatch falls back to the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# argtypes / restype of each exported function: {"name": ([ctypes types], restype)}
Signatures = dict[str, tuple[list, object]]


def cpu_has_avx2() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except AttributeError:  # very old torch
        return False


def compile_library(stem: str, source: str, flags: list[str]) -> Path:
    """Compile C++ ``source`` with ``flags`` once per source/flags hash into the user cache;
    return the library's path."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    library = cache_dir / "kernels" / f"{stem}_{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            src = Path(tmp) / f"{stem}.cpp"
            src.write_text(source)
            out = Path(tmp) / library.name
            run = subprocess.run(
                [compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True
            )
            if run.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[:300]}")
            os.replace(out, library)  # atomic: concurrent builders agree on one file
    if "-fopenmp" in flags:
        # The library brings the system's OpenMP runtime beside torch's own: keep its idle
        # threads asleep rather than spinning, so the two runtimes don't fight over the cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return library


class NativeLibrary:
    """One C++ library, built and loaded at the first :meth:`get` (thread-safe), or None."""

    def __init__(self, stem: str, source: str, flags: list[str], signatures: Signatures,
                 *, needs_avx2: bool = True, fallback: str = "the reference kernel") -> None:
        self.stem, self.source, self.flags = stem, source, flags
        self.signatures, self.needs_avx2, self.fallback = signatures, needs_avx2, fallback
        self.error: str | None = None  # why it is unavailable, once tried
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                self._lib = self._load()
                self._tried = True
        return self._lib

    def _load(self) -> ctypes.CDLL | None:
        if self.needs_avx2 and not cpu_has_avx2():
            self.error = "CPU lacks AVX2/FMA"
            return None
        try:
            lib = ctypes.CDLL(str(compile_library(self.stem, self.source, self.flags)))
            for name, (argtypes, restype) in self.signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, restype
            return lib
        except Exception as exc:  # compiler or OpenMP missing, ...
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            warnings.warn(f"lowbit {self.stem} kernels unavailable ({self.error}); using "
                          f"{self.fallback}", RuntimeWarning, stacklevel=3)
            return None


def output_allocator(n_out: int) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """``lead -> an empty float32 CPU tensor [*lead, n_out]`` for a bound kernel's output,
    whatever the default device or dtype: ``empty_like`` of a template kept for the last
    leading shape when the output is small (``torch.empty`` with dtype / device keywords took
    4-6 us per call here, ``empty_like`` 2 us: a third of a small layer's call); larger outputs
    are allocated directly, so no template holds memory worth mentioning."""
    last: list = [((), torch.empty(n_out, dtype=torch.float32, device="cpu"))]

    def allocate(lead: tuple[int, ...]) -> torch.Tensor:
        entry = last[0]  # one (shape, template) pair, read once: consistent across threads
        if entry[0] != lead:
            out = torch.empty((*lead, n_out), dtype=torch.float32, device="cpu")
            if out.numel() > TEMPLATE_MAX_ELEMENTS:
                return out
            last[0] = (lead, out)
            return torch.empty_like(out)
        return torch.empty_like(entry[1])

    return allocate


TEMPLATE_MAX_ELEMENTS = 1 << 16  # 256 KiB of float32: decode-sized outputs


def step_rows(out: torch.Tensor, n_out: int) -> int:
    """The rows m of a caller's output buffer for a bound kernel's ``raw_step``: a contiguous
    float32 CPU tensor of m * n_out elements (m >= 1); 0 for anything else."""
    if (out.dtype != torch.float32 or not out.is_cpu or not out.is_contiguous()
            or out.dim() == 0 or out.shape[-1] != n_out):
        return 0
    return out.numel() // n_out
