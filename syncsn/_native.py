"""Compiled CPU kernels of the layers: built on first use, optional.

Each layer's CPU work between its collectives is a handful of fused C++ calls
(``syncsn/csrc``) instead of hundreds of small tensor operations. They are compiled with
``torch.utils.cpp_extension.load`` the first time a layer runs on CPU (about a minute, once;
the result is cached) into torch's extension directory (``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``), or into ``$SYNCSN_EXTENSION_DIR`` when that is set. If the
build fails (no compiler, no ninja), a warning says so once and the layers use their
pure-torch implementation, which computes the same thing. ``SYNCSN_NATIVE=0`` forces the
pure-torch implementation; CUDA tensors always use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["enabled", "kernels", "Loader"]

SOURCE_DIR = Path(__file__).parent / "csrc"

BASE_FLAGS = ["-O3", "-fopenmp"]

# A build interrupted by a killed process leaves torch's lock file behind, and every later
# build would wait on it forever; no build takes this long.
STALE_LOCK_SECONDS = 15 * 60


def enabled() -> bool:
    """False when ``SYNCSN_NATIVE=0`` asks for the pure-torch implementation."""
    return os.environ.get("SYNCSN_NATIVE", "1").strip() != "0"


def _target() -> tuple[str, list[str]]:
    """Extension name and instruction-set flags for this CPU and this torch.

    The name carries the instruction set and a digest of the torch and Python versions and
    the flags, so that machines or environments sharing a cache directory never load a build
    that their CPU cannot run or that was made against another torch.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        arch, flags = "avx2", ["-mavx2", "-mfma", "-mf16c"]
    else:
        # -Wno-psabi: the vector types are internal, their ABI note does not apply.
        arch, flags = "generic", ["-Wno-psabi"]
    flags = [*BASE_FLAGS, *flags]
    digest = hashlib.sha1(f"{torch.__version__} {sys.version} {flags}".encode()).hexdigest()
    return f"syncsn_native_{arch}_{digest[:8]}", flags


def _import_library(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Loader:
    """Builds and loads the extension once per process; remembers a failure."""

    def __init__(self, sources: list[Path] | None = None, name: str | None = None) -> None:
        self.sources = sources if sources is not None else sorted(SOURCE_DIR.glob("*.cpp"))
        target_name, self.cflags = _target()
        self.name = name or target_name
        self.module: ModuleType | None = None
        self.failed = False
        self._lock = threading.Lock()

    def get(self) -> ModuleType | None:
        """The loaded module, building it if needed; None if it cannot be built."""
        if self.module is not None or self.failed:
            return self.module
        with self._lock:
            if self.module is None and not self.failed:
                self._load()
        return self.module

    def build_directory(self) -> str:
        root = os.environ.get("SYNCSN_EXTENSION_DIR")
        if root:
            path = os.path.join(os.path.expanduser(root), self.name)
            os.makedirs(path, exist_ok=True)
            return path
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(self.name, verbose=False)

    def _up_to_date(self, library: Path) -> bool:
        if not library.exists():
            return False
        built = library.stat().st_mtime
        inputs = [*self.sources, *SOURCE_DIR.glob("*.h")]
        return all(p.stat().st_mtime <= built for p in inputs if p.exists())

    def _load(self) -> None:
        try:
            directory = Path(self.build_directory())
            library = directory / f"{self.name}.so"
            if self._up_to_date(library):
                # Import the cached build directly: no compiler check, no lock, so a process
                # starts fast and never waits on another one.
                try:
                    self.module = _import_library(self.name, library)
                    return
                except ImportError:
                    pass  # rebuild below
            print(
                f"syncsn: compiling the native CPU kernels into {directory} (about a minute, "
                "once; SYNCSN_NATIVE=0 skips them)",
                file=sys.stderr,
                flush=True,
            )
            lock = directory / "lock"
            if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                lock.unlink(missing_ok=True)
            from torch.utils.cpp_extension import load

            self.module = load(
                name=self.name,
                sources=[str(p) for p in self.sources],
                extra_cflags=self.cflags,
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(SOURCE_DIR)],
                build_directory=str(directory),
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - any build failure means: use pure torch
            self.failed = True
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # The compiler's first error says more than ninja's closing line.
            reason = next((line for line in lines if "error:" in line), None)
            reason = reason or (lines[-1] if lines else "")
            warnings.warn(
                "syncsn: could not build the native CPU kernels, using the pure-torch "
                f"implementation instead ({type(error).__name__}: {reason}). Set "
                "SYNCSN_NATIVE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=4,
            )


_loader = Loader()


def kernels() -> ModuleType | None:
    """The compiled kernels, or None when disabled (``SYNCSN_NATIVE=0``) or not buildable."""
    if not enabled():
        return None
    return _loader.get()
