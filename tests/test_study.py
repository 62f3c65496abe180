"""examples/segmentation/study.py in its quick mode at tiny sizes: the runs it launches, the
table and plot it writes, and the resume that skips finished runs without touching them."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "segmentation"
# The example's own modules import each other by bare name (train, utils, compare, ...).
_EXAMPLE_MODULES = ("train", "compare", "utils", "data", "metrics", "model")


def _load_study():
    """Imports study.py under a private name; the bare-named modules it pulls in are
    removed from sys.modules again so they cannot shadow anything else."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        spec = importlib.util.spec_from_file_location("_seg_example_study", EXAMPLE / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in _EXAMPLE_MODULES:
            sys.modules.pop(name, None)
    return module


study = _load_study()

# test_example.py's tiny runs: 32-pixel images (quick mode's size), no data workers; 8
# images make 4 steps per epoch on 2 processes of 1 image.
TINY = ["--num-train", "8", "--num-val", "4", "--workers", "0", "--dist-timeout", "60"]


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _table(out: Path) -> dict[str, list[str]]:
    """results.md's rows by norm label: the cells after the label."""
    rows = {}
    for line in (out / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] == "2 x 1":
            rows[cells[1]] = cells[2:]
    return rows


def _cell(values: list[float], fmt: str) -> str:
    """Mean (min–max) of two or more seeds, computed here from the runs' own metrics."""
    assert len(values) > 1
    return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Quick mode for BN in two invocations, as an interrupted study would go: seed 0,
    then the quick seeds (0, 1), which must skip seed 0 and add seed 1. Each launch costs
    seconds of start-up, so two runs are all the tests below share."""
    out = tmp_path_factory.mktemp("study") / "out"
    result = {"out": out}
    base = ["--quick", "--norms", "bn", "--output-dir", str(out)]
    for key, extra in (("1", ["--seeds", "0"]), ("2", [])):
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            result["rc" + key] = study.main([*base, *extra, "--", *TINY])
        result["out" + key] = printed.getvalue()
        if key == "1":
            result["before"] = _snapshot(out / "p2_b1")
    result["after"] = _snapshot(out)
    return result


# A loaded machine stretches the start-up of the launches (seconds each when quiet).
@pytest.mark.timeout(300)
def test_quick_mode_launches_its_runs_and_shows_progress(quick):
    out = quick["out"]
    assert quick["rc1"] == 0, quick["out1"]
    assert quick["rc2"] == 0, quick["out2"]
    printed = quick["out1"]
    assert "1 runs (2 processes" in printed and "0 finished (skipped)" in printed
    assert "[1/1] start 2x1 bn seed 0" in printed and "[1/1] 2x1 bn seed 0: done in" in printed
    assert printed.count("    epoch 1: train loss") == 1  # rank 0's epoch lines, echoed
    for seed in (0, 1):
        run = out / "p2_b1" / "bn" / f"seed{seed}"
        assert [r["epoch"] for r in _rows(run)] == [0, 1]  # quick mode: 2 epochs
        args = torch.load(run / "checkpoint.pth", weights_only=True)["args"]
        assert (args["norm"], args["seed"], args["batch_size"]) == ("bn", seed, 1)
        assert (args["image_size"], args["base_width"], args["num_train"]) == (32, 8, 8)
        assert "2 process(es)" in (run / "train.log").read_text()
    assert sorted(p.name for p in (out / "p2_b1").iterdir()) == ["bn"]


@pytest.mark.timeout(300)
def test_resume_skips_finished_runs_and_leaves_their_files_alone(quick):
    printed = quick["out2"]
    assert "1 finished (skipped), 0 to continue, 1 to start" in printed
    assert "skip 2x1 bn seed 0: finished" in printed and "[1/1] start 2x1 bn seed 1" in printed
    before, after = quick["before"], quick["after"]
    for name, content in before.items():
        assert after["p2_b1/" + name] == content, name
    assert any(name.startswith("p2_b1/bn/seed1/") for name in after)


@pytest.mark.timeout(300)
def test_table_gives_mean_and_range_over_seeds(quick):
    out = quick["out"]
    runs = [_rows(out / "p2_b1" / "bn" / f"seed{s}") for s in (0, 1)]
    assert _table(out) == {
        "BN": [
            "0,1",
            _cell([r[-1]["miou"] for r in runs], ".3f"),
            _cell([r[-1]["pixel_acc"] for r in runs], ".3f"),
            _cell([sum(e["epoch_time"] for e in r) for r in runs], ".0f"),
        ]
    }
    with Image.open(out / "miou.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200


@pytest.mark.timeout(60)
def test_other_train_arguments_are_refused_before_anything_changes(quick):
    out = quick["out"]
    with pytest.raises(SystemExit, match=r"--epochs 2 \(now 3\)"):
        study.main(["--quick", "--output-dir", str(out), "--", *TINY, "--epochs", "3"])
    with pytest.raises(SystemExit, match="--norm after -- is given to each run by the study"):
        study.main(["--quick", "--output-dir", str(out), "--", *TINY, "--norm", "gn"])
    assert _snapshot(out) == quick["after"]


def test_a_folder_the_study_did_not_make_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="study.py did not make"):
        study.main(["--quick", "--output-dir", str(tmp_path), "--", *TINY])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
