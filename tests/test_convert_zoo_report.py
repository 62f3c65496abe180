"""The report of examples/convert_zoo.py: what its summary marks mean."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_zoo():
    spec = importlib.util.spec_from_file_location(
        "convert_zoo", ROOT / "examples" / "convert_zoo.py"
    )
    zoo = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("convert_zoo", zoo)  # dataclasses look their module up
    spec.loader.exec_module(zoo)
    return zoo


CHECKS = ("finite", "ranks", "reference", "state_dict", "revert")


def test_a_skipped_compile_check_is_not_shown_as_passed() -> None:
    zoo = load_zoo()
    passed = zoo.Result(
        "timm", "resnet50", "SN", checks={**dict.fromkeys(CHECKS, "ok"), "compile": "ok"}
    )
    no_compile = zoo.Result(
        "timm", "resnet50", "SyncSN", checks={**dict.fromkeys(CHECKS, "ok"), "compile": "skipped"}
    )
    failed = zoo.Result(
        "timm", "resnet50", "SSN", checks={**dict.fromkeys(CHECKS, "ok"), "compile": "graph break"}
    )
    results = [passed, no_compile, failed]
    lines = zoo.summary(results)
    assert "| timm | resnet50 | ✓ | compile skipped | ✗ |" in lines
    assert any('"compile skipped": every other check passed' in line for line in lines)
    meta = {"date": "today", "command": "zoo", "ranks": 2, "device": "cpu", "dtype": "float64",
            "versions": {"torch": "x"}, "shim": {}}  # fmt: skip
    report = zoo.markdown(results, meta)
    assert report.endswith(
        "1 of 3 cases passed every check; 1 passed every check that ran, with some skipped."
    )
