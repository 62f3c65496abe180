"""Building the CPU kernels: one short warning without a compiler, a failure remembered across
processes, one process compiling while the others wait, builds keyed by their sources.

torch's builder is replaced by fakes here (compiling the kernels takes a minute), except for
checkouts of a one-file module that compiles in a second; test_native.py builds and tests the
real kernels.
"""

from __future__ import annotations

import os
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from syncsn import _native

pytestmark = pytest.mark.timeout(60)

# What torch's load() raises when the compiler fails: the cause sits among the output lines.
TORCH_BUILD_ERROR = (
    "Error building extension 'syncsn_fake': [1/2] c++ -MMD -MF layers.o.d ... -c layers.cpp\n"
    "FAILED: layers.o\n"
    "layers.cpp:3:10: fatal error: planes.h: No such file or directory\n"
    "compilation terminated.\n"
    "ninja: build stopped: subcommand failed.\n"
)


@pytest.fixture
def build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SYNCSN_EXTENSION_DIR", str(tmp_path / "build"))
    source = tmp_path / "kernels.cpp"
    source.write_text("// a source\n")
    return tmp_path


def _loader(build_dir: Path) -> _native.Loader:
    """A loader as a fresh process would have it (the state lives in the instance)."""
    return _native.Loader(sources=[build_dir / "kernels.cpp"], name="syncsn_fake")


def _get(loader: _native.Loader) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = loader.get()
        assert loader.get() is module  # remembered: no second attempt, no second warning
    return module, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


class FakeBuild:
    """Stands in for torch.utils.cpp_extension.load: counts calls, fails or 'builds'."""

    def __init__(self, fail: bool, seconds: float = 0.0) -> None:
        self.fail, self.seconds, self.calls = fail, seconds, 0

    def __call__(self, name: str, build_directory: str, **kwargs: object) -> object:
        self.calls += 1
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError(TORCH_BUILD_ERROR)
        (Path(build_directory) / f"{name}.so").write_text("built")
        return types.ModuleType(name)


@pytest.fixture
def fake_import(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(name: str, path: Path) -> types.ModuleType:
        if path.read_text() != "built":
            raise ImportError(path)
        return types.ModuleType(name)

    monkeypatch.setattr(_native, "_import_library", load)


def test_without_a_compiler_one_short_warning(build_dir, monkeypatch, capfd) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    build = FakeBuild(fail=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    module, messages = _get(_loader(build_dir))
    assert module is None and build.calls == 0
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "no C++ compiler" in messages[0] and "'no-such-compiler-here'" in messages[0]
    assert "pure-torch implementation" in messages[0]
    assert capfd.readouterr().err == ""  # nothing printed besides the warning


def test_a_failed_build_is_remembered_until_its_inputs_change(
    build_dir, monkeypatch, capfd
) -> None:
    build = FakeBuild(fail=True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    module, messages = _get(_loader(build_dir))
    assert module is None and build.calls == 1 and len(messages) == 1
    # The compiler's error is the reason given, not ninja's closing line.
    assert "fatal error: planes.h: No such file or directory" in messages[0]
    assert "ninja: build stopped" not in messages[0]
    log = _loader(build_dir).build_directory() / _native.BUILD_LOG
    assert "planes.h" in log.read_text() and str(log) in messages[0]
    assert "compiling the native CPU kernels" in capfd.readouterr().err

    # Another process (another rank, a later run): no second attempt, nothing compiled.
    module, messages = _get(_loader(build_dir))
    assert module is None and build.calls == 1
    assert "failed to build" in messages[0] and "to try again" in messages[0]
    assert "compiling" not in capfd.readouterr().err

    # A changed source is tried again.
    (build_dir / "kernels.cpp").write_text("// a fixed source\n")
    _get(_loader(build_dir))
    assert build.calls == 2

    # So is another compiler.
    compiler = build_dir / "c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    _get(_loader(build_dir))
    assert build.calls == 3


def test_one_process_builds_and_the_others_wait(build_dir, monkeypatch, capfd, fake_import) -> None:
    build = FakeBuild(fail=False, seconds=1.0)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    results: list[object] = []

    def rank() -> None:  # separate lock handles conflict like separate processes
        results.append(_get(_loader(build_dir)))

    ranks = [threading.Thread(target=rank) for _ in range(3)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join()
    assert build.calls == 1
    assert all(module is not None and messages == [] for module, messages in results)
    err = capfd.readouterr().err
    assert err.count("compiling the native CPU kernels into") == 1
    assert "native CPU kernels built in" in err
    assert err.count("waiting for another process to finish compiling") >= 1

    # Up to date: a later process imports the build without the lock or a compiler.
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    module, messages = _get(_loader(build_dir))
    assert module is not None and messages == [] and build.calls == 1


def test_a_long_build_shows_progress(build_dir, monkeypatch, capfd, fake_import) -> None:
    monkeypatch.setattr(_native, "PROGRESS_SECONDS", 0.2)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", FakeBuild(fail=False, seconds=0.7))
    module, _ = _get(_loader(build_dir))
    assert module is not None
    lines = [line for line in capfd.readouterr().err.splitlines() if line.endswith(" s")]
    assert len(lines) >= 2, lines


def test_disabled_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("SYNCSN_NATIVE", "0")
    assert _native.kernels() is None


def test_a_build_loads_only_with_the_record_of_its_sources(build_dir, monkeypatch, fake_import):
    build = FakeBuild(fail=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    loader = _loader(build_dir)
    directory = loader.build_directory()
    # A library without the record (a build cut short, another program's file): rebuilt.
    (directory / f"{loader.name}.so").write_text("built")
    module, messages = _get(loader)
    assert module is not None and messages == [] and build.calls == 1
    assert (directory / _native.BUILT_FROM).read_text() == loader.digest
    # A record of other sources: rebuilt.
    (directory / _native.BUILT_FROM).write_text("0" * 64)
    _get(_loader(build_dir))
    assert build.calls == 2
    # Its own record: loaded as it is.
    module, _ = _get(_loader(build_dir))
    assert module is not None and build.calls == 2


# A module that only says which copy of the sources it was built from (MARKER).
MARKER_SOURCE = """
#include <Python.h>

#define SYNCSN_CONCAT_(a, b) a##b
#define SYNCSN_CONCAT(a, b) SYNCSN_CONCAT_(a, b)

static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, "marker", nullptr, -1, nullptr};

PyMODINIT_FUNC SYNCSN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&definition);
  if (module != nullptr) PyModule_AddStringConstant(module, "marker", "MARKER");
  return module;
}
"""


def _checkout(root: Path, marker: str) -> Path:
    source = root / "csrc" / "marker.cpp"
    source.parent.mkdir(parents=True)
    source.write_text(MARKER_SOURCE.replace("MARKER", marker))
    return source


@pytest.mark.timeout(240)
def test_each_checkout_loads_the_build_of_its_own_sources(tmp_path, monkeypatch, capfd) -> None:
    """Real builds (torch's builder and the import of the library), one per set of sources:
    never a build of other sources, whatever the file times; a copy of the same sources
    reuses the build."""
    if _native.compiler() is None or _native._ninja() is None:
        pytest.skip("no C++ compiler or ninja: nothing can be built here")
    monkeypatch.setenv("SYNCSN_EXTENSION_DIR", str(tmp_path / "cache"))
    builds: list[str] = []
    real_load = torch.utils.cpp_extension.load

    def counted_load(**kwargs: object) -> object:
        builds.append(str(kwargs["name"]))
        return real_load(**kwargs)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", counted_load)

    def marker(source: Path) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed build must not pass for a fallback
            module = _native.Loader(sources=[source]).get()
        assert module is not None
        return module.marker

    first = _checkout(tmp_path / "first", "first")
    assert marker(first) == "first"
    # Another checkout, its source changed but older than the first checkout's build.
    other = _checkout(tmp_path / "other", "other")
    long_ago = time.time() - 86400
    os.utime(other, (long_ago, long_ago))
    assert marker(other) == "other"
    assert len(builds) == 2 and builds[0] != builds[1]
    # A fresh clone of the first sources (files newer than any build): no compiling.
    clone = _checkout(tmp_path / "clone", "first")
    assert marker(clone) == "first"
    # Both builds stay side by side: each checkout still loads its own.
    assert marker(other) == "other" and marker(first) == "first"
    assert len(builds) == 2
    assert capfd.readouterr().err.count("compiling the native CPU kernels into") == 2
