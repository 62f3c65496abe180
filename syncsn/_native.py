"""Compiled CPU kernels of the layers: built once per machine, optional.

Each layer's CPU work between its collectives is a handful of fused C++ calls
(``syncsn/csrc``) instead of hundreds of small tensor operations. They are compiled with
``torch.utils.cpp_extension.load`` the first time a layer runs on CPU, or ahead of time by
:func:`main` (``scripts/setup_env.sh`` calls it after installing), into
torch's extension directory (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), or
into ``$SYNCSN_EXTENSION_DIR`` when that is set. The layers compute the same thing without
them, in pure torch: that is what runs when ``SYNCSN_NATIVE=0``, on CUDA, and when the
kernels cannot be built.

A build is keyed by what it is made of: the extension's name ends with a digest of the
sources' and headers' contents, the compiler flags, the CPU kind and the torch and Python
versions, and its directory records the full digest once the build has succeeded. A process
loads only a build whose digest is its own: two checkouts of different sources keep two
builds side by side, and a fresh clone of the same sources (any file times) loads the
existing build without compiling. Builds of sources no checkout uses any more stay in the
cache directory until deleted.

Building is shared by the processes of a machine: the first one to get the build lock
compiles (printing a line when it starts and every 20 s), the others print that they wait
and load its result. Without a C++ compiler every process warns once, in one line, and uses
pure torch. A failed build leaves a marker in the build directory, keyed by the sources, the
compiler and the flags, so that the other ranks and later runs do not try again until one
of those changes (or the marker is deleted); the warning names the compiler's first error
and the full log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from . import _env

__all__ = ["enabled", "kernels", "Loader", "build", "compiler", "main"]

SOURCE_DIR = Path(__file__).parent / "csrc"

BASE_FLAGS = ["-O3", "-fopenmp"]

# Seconds between the "still compiling" lines of the building process.
PROGRESS_SECONDS = 20.0

FAILURE_MARKER = "build-failed.json"
BUILD_LOG = "build.log"
# Written into the build directory, last: the full digest of what the build is made of.
BUILT_FROM = "built-from.sha256"
# Hex digits of that digest in the extension's name.
NAME_DIGEST_CHARS = 16


#: The spellings of ``SYNCSN_NATIVE`` (case-insensitive; unset or empty means on).
OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")


def enabled() -> bool:
    """False when ``SYNCSN_NATIVE`` (0, false, no, off) asks for the pure-torch
    implementation; ValueError when it is set to anything else than those or 1, true, yes,
    on."""
    return parse_native(_env.get("SYNCSN_NATIVE"))


@functools.lru_cache(maxsize=16)
def parse_native(value: str | None) -> bool:
    """The meaning of a ``SYNCSN_NATIVE`` value: True (the default) or False.

    Raises:
        ValueError: a value that is not one of the spellings; naming it and them.
    """
    word = (value or "").strip().lower()
    if not word or word in ON:
        return True
    if word in OFF:
        return False
    raise ValueError(
        f"SYNCSN_NATIVE={value!r} is not understood: set it to one of {', '.join(OFF)} to "
        f"turn the C++ CPU kernels off, or {', '.join(ON)} (the default) to use them "
        "(case-insensitive)"
    )


def _target() -> tuple[str, list[str]]:
    """The instruction-set kind of this CPU and the compiler flags for it."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        return "avx2", [*BASE_FLAGS, "-mavx2", "-mfma", "-mf16c"]
    # -Wno-psabi: the vector types are internal, their ABI note does not apply.
    return "generic", [*BASE_FLAGS, "-Wno-psabi"]


def compiler() -> str | None:
    """Full path of the C++ compiler torch's builder uses (``$CXX``, else ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _import_library(name: str, path: Path) -> ModuleType:
    """Load the built library as the Python module ``name`` (the kernels the CPU backend
    calls); loading it also registers them as the operators ``torch.ops.syncsn_cpp``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}: not a Python extension module")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except OSError as error:
        raise ImportError(f"cannot load {path}: {error}") from error
    return module


def _say(message: str) -> None:
    print(f"syncsn: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive(path: Path, on_wait: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (waiting for it, with ``on_wait`` printed).

    The operating system releases the lock when its holder exits, however it exits, so a
    killed build never leaves the others waiting.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no sharing, each process builds for itself
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(on_wait)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Ticker:
    """Prints the time spent every ``every`` seconds while a build runs."""

    def __init__(self, what: str, every: float | None = None) -> None:
        self.what, self.every = what, PROGRESS_SECONDS if every is None else every
        self.start = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            _say(f"still {self.what}: {time.monotonic() - self.start:.0f} s")

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


class BuildUnavailable(RuntimeError):
    """The kernels cannot be built here; the message is the one-line reason."""


class Loader:
    """Builds and loads the extension once per process; remembers a failure.

    Args:
        sources: the C++ files (default: ``syncsn/csrc/*.cpp``).
        name: the start of the extension's name (default ``syncsn_cpu``); the CPU kind and
            the build's digest (:attr:`digest`) follow it.
    """

    def __init__(self, sources: list[Path] | None = None, name: str = "syncsn_cpu") -> None:
        self.sources = sources if sources is not None else sorted(SOURCE_DIR.glob("*.cpp"))
        self.arch, self.cflags = _target()
        self.prefix = name
        self.module: ModuleType | None = None
        self.failed = False
        self._lock = threading.Lock()

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of what the build is made of: the contents of the sources and headers,
        the flags, the CPU kind, and the torch and Python versions (not file times or
        paths, so that a copy of the same sources finds the same build)."""
        digest = hashlib.sha256(
            f"{torch.__version__}\0{sys.version}\0{self.arch}\0{self.cflags}".encode()
        )
        for path in self._inputs():
            content = path.read_bytes() if path.exists() else b"<missing>"
            digest.update(f"\0{path.name}\0{len(content)}\0".encode() + content)
        return digest.hexdigest()

    @property
    def name(self) -> str:
        """The extension's name: ``{name}_{CPU kind}_{digest[:16]}``."""
        return f"{self.prefix}_{self.arch}_{self.digest[:NAME_DIGEST_CHARS]}"

    def get(self) -> ModuleType | None:
        """The loaded module, building it if needed; None if it cannot be built."""
        if self.module is not None or self.failed:
            return self.module
        with self._lock:
            if self.module is None and not self.failed:
                try:
                    self.module = self._load()
                except Exception as error:  # noqa: BLE001 - any failure means: use pure torch
                    self.failed = True
                    reason = str(error) if isinstance(error, BuildUnavailable) else repr(error)
                    warnings.warn(
                        f"syncsn: {reason}: using the pure-torch implementation on CPU (same "
                        "results, slower; SYNCSN_NATIVE=0 skips the kernels)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        return self.module

    def build_directory(self) -> Path:
        root = os.environ.get("SYNCSN_EXTENSION_DIR")
        if root:
            path = Path(root).expanduser() / self.name
            path.mkdir(parents=True, exist_ok=True)
            return path
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(self.name, verbose=False))

    def _inputs(self) -> list[Path]:
        """The sources, and the headers they can include: next to them and in csrc."""
        folders = sorted({SOURCE_DIR, *(p.parent for p in self.sources)})
        headers = sorted({h for folder in folders for h in folder.glob("*.h")})
        return [*self.sources, *headers]

    def _built(self, directory: Path, library: Path) -> bool:
        """The library there was built, completely, from these inputs."""
        with contextlib.suppress(OSError):
            return library.exists() and (directory / BUILT_FROM).read_text() == self.digest
        return False

    def build_key(self, cxx: str) -> str:
        """Digest of what decides the build's outcome: the build's digest and the compiler."""
        stat = os.stat(cxx)
        compiler_id = f"{os.path.realpath(cxx)} {stat.st_size} {stat.st_mtime_ns}"
        return hashlib.sha256(f"{self.digest} {compiler_id}".encode()).hexdigest()

    def _load(self) -> ModuleType:
        directory = self.build_directory()
        library = directory / f"{self.name}.so"
        if self._built(directory, library):
            # Import the cached build directly: no compiler check, no lock, so a process
            # starts fast and never waits on another one.
            with contextlib.suppress(ImportError):
                return _import_library(self.name, library)
        cxx = compiler()
        if cxx is None:
            raise BuildUnavailable(
                f"no C++ compiler for the native CPU kernels ('{os.environ.get('CXX', 'c++')}' "
                "is not on PATH; set CXX to use another)"
            )
        if _ninja() is None:
            raise BuildUnavailable(
                "no ninja for the native CPU kernels (pip install ninja, or put it on PATH)"
            )
        key = self.build_key(cxx)
        marker = directory / FAILURE_MARKER
        with _exclusive(
            directory / "syncsn.lock",
            f"waiting for another process to finish compiling the native CPU kernels in "
            f"{directory}",
        ):
            # Another process may have built, or failed to build, while this one waited.
            previous = _read_marker(marker)
            if previous is not None and previous.get("key") == key:
                raise BuildUnavailable(
                    f"the native CPU kernels failed to build ({previous.get('reason')}; log: "
                    f"{directory / BUILD_LOG}; delete {marker} to try again)"
                )
            if self._built(directory, library):
                with contextlib.suppress(ImportError):
                    return _import_library(self.name, library)
            return self._compile(directory, key, marker)

    def _compile(self, directory: Path, key: str, marker: Path) -> ModuleType:
        from torch.utils.cpp_extension import load

        # Nobody else builds while this process holds the lock, so torch's own lock file,
        # if present, was left by a killed build and would make torch wait forever.
        (directory / "lock").unlink(missing_ok=True)
        _say(
            f"compiling the native CPU kernels into {directory} (once per machine, about a "
            "minute on 2 idle cores; SYNCSN_NATIVE=0 skips them)"
        )
        try:
            with _Ticker("compiling the native CPU kernels") as ticker, _ninja_on_path():
                load(
                    name=self.name,
                    sources=[str(p) for p in self.sources],
                    extra_cflags=self.cflags,
                    extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(SOURCE_DIR)],
                    build_directory=str(directory),
                    verbose=False,
                    is_python_module=False,
                )
        except Exception as error:
            log = str(error)
            (directory / BUILD_LOG).write_text(log)
            reason = _first_error(log) or f"{type(error).__name__}"
            marker.write_text(json.dumps({"key": key, "reason": reason}))
            raise BuildUnavailable(
                f"the native CPU kernels failed to build ({reason}; log: {directory / BUILD_LOG})"
            ) from error
        marker.unlink(missing_ok=True)
        module = _import_library(self.name, directory / f"{self.name}.so")
        # Written last, and whole (a rename): a build cut short is never taken for done.
        partial = directory / f"{BUILT_FROM}.{os.getpid()}"
        partial.write_text(self.digest)
        partial.replace(directory / BUILT_FROM)
        _say(f"native CPU kernels built in {ticker.elapsed:.0f} s")
        return module


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_error(log: str) -> str | None:
    """The compiler's first error line (ninja's closing line says nothing about the cause)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "Error:" in line:
            return line
    useful = [line for line in lines if not line.startswith("ninja: build stopped")]
    return useful[-1][:300] if useful else None


def _ninja() -> str | None:
    """The ninja torch's builder will run: from PATH, or next to this interpreter (a
    virtualenv used without activation), else None."""
    found = shutil.which("ninja")
    if found is None:
        found = shutil.which("ninja", path=str(Path(sys.executable).parent))
    return found


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH: add the interpreter's directory for the build when
    only that one has it."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is not None or shutil.which("ninja", path=here) is None:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = here + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


_loader = Loader()


def kernels() -> ModuleType | None:
    """The compiled kernels, or None when disabled (``SYNCSN_NATIVE=0``) or not buildable."""
    if not enabled():
        return None
    return _loader.get()


def build() -> ModuleType | None:
    """Build (or find) the kernels now, e.g. while setting a machine up; None if impossible."""
    return _loader.get()


def main() -> None:
    """Build the kernels ahead of the first training step, reporting in one line; never fails.

    ``python -c "from syncsn._native import main; main()"`` (``scripts/setup_env.sh`` runs it
    after installing).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build()
    for warning in caught:
        _say(str(warning.message).removeprefix("syncsn: "))
    if built is not None:
        _say(f"native CPU kernels ready in {_loader.build_directory()}")
