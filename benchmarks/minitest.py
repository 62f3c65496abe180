"""Run test files without pytest, for machines that have torch but not pytest.

``benchmarks/gpu_check.sh`` uses it when ``import pytest`` fails: it puts a small stand-in
``pytest`` module (the parts the CUDA and Triton tests use: marks, ``parametrize``,
``param``, ``fixture``, ``raises``, ``skip``, ``monkeypatch``) on the path, collects the
``test_*`` functions of each file, expands their parameters and runs them, with ``-k``
expressions as pytest reads them (words match test ids; ``and``, ``or``, ``not``,
parentheses).

    python benchmarks/minitest.py tests/test_cuda.py -k "graph or sync"
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

# --- the stand-in pytest module -------------------------------------------------------------


class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and inspect.isfunction(args[0]) and not kwargs:
            fn = args[0]
            fn.__dict__.setdefault("_marks", []).append(self)
            return fn
        return _Mark(self.name, args, kwargs)


class _MarkFactory:
    def __getattr__(self, name):
        return _Mark(name)


class _Param:
    def __init__(self, *values, marks=(), id=None):  # noqa: A002 - pytest's name
        self.values, self.id = values, id
        self.marks = list(marks) if isinstance(marks, (list, tuple)) else [marks]


def _fixture(fn=None, *, scope="function", **_):
    def wrap(f):
        f._fixture_scope = scope
        return f

    return wrap(fn) if fn is not None else wrap


@contextlib.contextmanager
def _raises(exc, match=None):
    try:
        yield
    except exc as error:
        if match is not None and not re.search(match, str(error)):
            raise AssertionError(f"{error!r} does not match {match!r}") from error
        return
    raise AssertionError(f"did not raise {exc}")


def _skip(reason=""):
    raise Skipped(reason)


class MonkeyPatch:
    def __init__(self):
        self._undo = []

    def setattr(self, target, name, value):
        old = getattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def setenv(self, name, value):
        old = os.environ.get(name)
        self._undo.append(lambda: self._restore(name, old))
        os.environ[name] = str(value)

    def delenv(self, name, raising=True):
        if name not in os.environ:
            if raising:
                raise KeyError(name)
            return
        old = os.environ.pop(name)
        self._undo.append(lambda: self._restore(name, old))

    @staticmethod
    def _restore(name, old):
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

    def undo(self):
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()


def install_stand_in() -> None:
    mod = types.ModuleType("pytest")
    mod.mark = _MarkFactory()
    mod.param = _Param
    mod.fixture = _fixture
    mod.raises = _raises
    mod.skip = _skip
    mod.MonkeyPatch = MonkeyPatch
    mod.warns = lambda *a, **k: warnings.catch_warnings(record=True)
    sys.modules["pytest"] = mod


# --- collection and running ------------------------------------------------------------------


def _keyword_match(expr: str | None, test_id: str) -> bool:
    if not expr:
        return True
    tokens = re.findall(r"\(|\)|[^\s()]+", expr)
    out = []
    for tok in tokens:
        if tok in ("and", "or", "not", "(", ")"):
            out.append(tok)
        else:
            out.append(repr(tok.lower() in test_id.lower()))
    return bool(eval(" ".join(out)))  # noqa: S307 - only True/False and operators


def _cases(fn):
    """(id, kwargs, marks) for every parameter combination of ``fn``."""
    marks = getattr(fn, "_marks", [])
    axes = []
    for mark in marks:
        if mark.name != "parametrize":
            continue
        names = (
            [n.strip() for n in mark.args[0].split(",")]
            if isinstance(mark.args[0], str)
            else list(mark.args[0])
        )
        values, ids = list(mark.args[1]), mark.kwargs.get("ids")
        axis = []
        for i, value in enumerate(values):
            pmarks = []
            if isinstance(value, _Param):
                pmarks, vid, value = value.marks, value.id, value.values
                value = value if len(names) > 1 else value[0]
            else:
                vid = None
            vals = value if len(names) > 1 else (value,)
            label = vid or (ids[i] if ids else "-".join(str(v) for v in vals))
            axis.append((label, dict(zip(names, vals, strict=True)), pmarks))
        axes.append(axis)
    axes.reverse()  # pytest's order: the decorator nearest the function varies slowest
    for combo in itertools.product(*axes) if axes else [()]:
        label = "-".join(c[0] for c in reversed(combo))
        kwargs = {k: v for c in combo for k, v in c[1].items()}
        yield label, kwargs, [m for c in combo for m in c[2]] + marks


def _skip_reason(marks) -> str | None:
    for mark in marks:
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return mark.kwargs.get("reason", "skipif")
    return None


def run_file(path: Path, keyword: str | None, fixtures_from: list) -> tuple[int, int, int]:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    sources = [module, *fixtures_from]
    live: dict[str, tuple] = {}
    passed = failed = skipped = 0

    def fixture(name):
        if name in live:
            return live[name][0]
        for src in sources:
            fn = getattr(src, name, None)
            if fn is not None and hasattr(fn, "_fixture_scope"):
                gen = fn()
                value = next(gen) if inspect.isgenerator(gen) else gen
                live[name] = (value, gen)
                return value
        raise LookupError(f"fixture {name!r} not found")

    try:
        for name, fn in list(vars(module).items()):
            if not (name.startswith("test_") and callable(fn)):
                continue
            for label, kwargs, marks in _cases(fn):
                test_id = f"{path.name}::{name}" + (f"[{label}]" if label else "")
                if not _keyword_match(keyword, test_id):
                    continue
                reason = _skip_reason(marks + module_marks)
                if reason is not None:
                    skipped += 1
                    print(f"SKIPPED {test_id}: {reason}", flush=True)
                    continue
                patch = MonkeyPatch()
                t0 = time.perf_counter()
                try:
                    for arg in inspect.signature(fn).parameters:
                        if arg == "monkeypatch":
                            kwargs[arg] = patch
                        elif arg not in kwargs:
                            kwargs[arg] = fixture(arg)
                    fn(**kwargs)
                    passed += 1
                    print(f"PASSED {test_id} ({time.perf_counter() - t0:.1f}s)", flush=True)
                except Skipped as s:
                    skipped += 1
                    print(f"SKIPPED {test_id}: {s}", flush=True)
                except BaseException:  # noqa: BLE001 - report and go on
                    failed += 1
                    print(f"FAILED {test_id} ({time.perf_counter() - t0:.1f}s)", flush=True)
                    traceback.print_exc()
                finally:
                    patch.undo()
    finally:
        for _, gen in live.values():
            if inspect.isgenerator(gen):
                with contextlib.suppress(StopIteration):
                    next(gen)
    return passed, failed, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("-k", dest="keyword", default=None)
    opts = p.parse_args(argv)
    install_stand_in()
    tests_dir = Path(opts.files[0]).resolve().parent
    sys.path.insert(0, str(tests_dir))
    conftest = importlib.import_module("conftest") if (tests_dir / "conftest.py").exists() else None
    totals = [0, 0, 0]
    for f in opts.files:
        for i, n in enumerate(run_file(Path(f), opts.keyword, [conftest] if conftest else [])):
            totals[i] += n
    print(f"{totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main())
