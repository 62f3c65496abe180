"""Smoke tests of the benchmark scripts: they run end to end on a tiny configuration and
their communication and memory accounting agrees with what the layers are specified to do.

Timings are never asserted (benchmarks are not unit tests); each script starts one process
world of two ranks, so the two tests together take about 20 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, tmp_path: Path) -> tuple[dict, str]:
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    cmd = [sys.executable, str(BENCH / script), "--quick", "--json", str(out_json)]
    cmd += ["--markdown", str(out_md), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out_json.read_text()), out_md.read_text()


@pytest.mark.timeout(180)
def test_bench_layers_quick(tmp_path):
    result, markdown = _run("bench_layers.py", tmp_path=tmp_path)
    records = [r for r in result["records"] if "skipped" not in r]
    shape = (2, 8, 6, 6)  # --quick
    c = shape[1]
    seen = {(r["world_size"], r["layer"], r["layout"]) for r in result["records"]}
    for ws in (1, 2):
        for layer in ("bn", "gn", "naive_sn", "sn", "sync_sn", "sync_bn", "sync_ssn"):
            for layout in ("contiguous", "channels_last"):
                assert (ws, layer, layout) in seen, (ws, layer, layout)

    # Expected collective traffic per rank, from the buffer sizes the layers exchange:
    # forward all_gather of world * (1 + 2C) float64 (SN and BN alike), backward
    # all_reduce of 2C float64.
    fwd_values = {"sync_sn": 1 + 2 * c, "sync_bn": 1 + 2 * c}
    for r in records:
        assert tuple(r["shape"]) == shape
        assert r["total_s"] > 0 and r["fwd_s"] > 0 and r["bwd_s"] > 0
        if r["layer"] != "comm_only":  # an identity with collectives saves nothing
            # Every layer keeps x (or a view of it) for backward; the storage counts once.
            assert r["saved_bytes"] >= r["input_bytes"], r
        if r["synchronized"] and r["world_size"] == 2:
            assert (r["collectives_fwd"], r["collectives_bwd"]) == (1, 1), r
            if r["layer"] in fwd_values:
                assert r["comm_bytes_fwd"] == 2 * fwd_values[r["layer"]] * 8, r
                assert r["comm_bytes_bwd"] == 2 * c * 8, r
        else:
            assert (r["collectives_fwd"], r["collectives_bwd"]) == (0, 0), r
            assert r["comm_bytes_fwd"] == r["comm_bytes_bwd"] == 0
    bn = [r for r in records if r["layer"] == "bn"]
    assert all(r["ratio"] == pytest.approx(1.0) for r in bn)
    assert "| SyncSwitchNorm2d" in markdown
    assert "World size 2, float32, channels_last" in markdown


@pytest.mark.timeout(180)
def test_bench_train_quick(tmp_path):
    result, markdown = _run("bench_train.py", "--norms", "bn", "syncsn", tmp_path=tmp_path)
    records = result["records"]
    assert {(r["world_size"], r["norm"]) for r in records} == {
        (ws, n) for ws in (1, 2) for n in ("bn", "syncsn")
    }
    for r in records:
        assert r["step_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["world_size"] * 2 / r["step_s"])
    assert "| SyncSwitchNorm2d" in markdown
