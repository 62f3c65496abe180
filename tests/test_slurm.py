"""launch/slurm_train.sh on a real (local, one-node) Slurm: both launch modes, and a
time-limit stop that checkpoints, requeues and resumes.

The cluster comes from tests/slurm_cluster.py; without Slurm, munge or root these tests are
skipped with the reason.
"""

from __future__ import annotations

import json
import re

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from test_launch import probe_lines

pytestmark = pytest.mark.timeout(150)  # every test here runs Slurm jobs

# Stands in for a training script under preemption: it runs until USR1 (or TERM), then writes
# a checkpoint and exits; started again, it finds the checkpoint and resumes from it.
PREEMPTIBLE = """\
import os, signal, sys, time

rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))

def say(text):  # one write per line: the ranks may share one pipe
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()

checkpoint = os.path.join(sys.argv[1], f"rank{rank}.ckpt")
if os.path.exists(checkpoint):
    with open(checkpoint) as f:
        say(f"rank {rank} resumed from {f.read()}")
    sys.exit(0)

step = 0

def stop(signum, frame):
    with open(checkpoint, "w") as f:
        f.write(f"step {step}")
    say(f"rank {rank} got {signal.Signals(signum).name} at step {step}")
    sys.exit(0)

signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
say(f"rank {rank} ready")
while True:
    time.sleep(0.05)
    step += 1
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode, launcher", [("tasks", "slurm"), ("torchrun", "torchrun")])
def test_probe_job(slurm_cluster, mode, launcher):  # noqa: F811
    job = slurm_cluster.run_job(
        ["-m", "syncsn.distributed", "--timeout", "60"], ntasks=2, mode=mode, timeout=90
    )
    assert job.state == "COMPLETED", job.describe()
    assert probe_lines(job.output) == [
        (0, 2, 0, 2, "gloo", 3.0, launcher),
        (1, 2, 1, 2, "gloo", 3.0, launcher),
    ], job.describe()
    assert f"mode {mode}" in job.output


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["tasks", "torchrun"])
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, mode):  # noqa: F811
    script = tmp_path / "preemptible.py"
    script.write_text(PREEMPTIBLE)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()

    job_id = slurm_cluster.submit([str(script), str(checkpoints)], ntasks=2, mode=mode)
    assert slurm_cluster.job_info(job_id)["Requeue"] == "1"  # the script's #SBATCH --requeue
    slurm_cluster.wait_for_output(job_id, r"rank \d ready", count=2, timeout=60)
    slurm_cluster.signal_batch(job_id, "USR1")
    slurm_cluster.release_requeued(job_id, timeout=60)
    job = slurm_cluster.wait(job_id, timeout=60)

    assert job.state == "COMPLETED" and job.restarts == 1, job.describe()
    stopped = dict(re.findall(r"rank (\d) got SIGUSR1 at (step \d+)", job.output))
    resumed = dict(re.findall(r"rank (\d) resumed from (step \d+)", job.output))
    assert sorted(stopped) == ["0", "1"], job.describe()
    assert resumed == stopped, job.describe()  # each rank resumes from its own checkpoint
    assert f"job {job_id} requeued" in job.output
    assert "restart 1" in job.output


@pytest.mark.timeout(200)
def test_segmentation_example_as_a_two_task_slurm_job(slurm_cluster, tmp_path):  # noqa: F811
    """The example trains through launch/slurm_train.sh, one srun task per rank."""
    out = tmp_path / "run"
    job = slurm_cluster.run_job(
        [
            "examples/segmentation/train.py",
            "--image-size",
            "32",
            "-b",
            "2",
            "--workers",
            "0",
            "--num-train",
            "16",
            "--num-val",
            "5",
            "--epochs",
            "1",
            "--dist-timeout",
            "60",
            "--output-dir",
            str(out),
        ],
        ntasks=2,
        timeout=180,
    )
    assert job.state == "COMPLETED", job.describe()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert (out / "checkpoint.pth").exists()
    assert "syncsn segmentation: 2 process(es)" in job.output, job.output
    record = json.loads(lines[0])
    assert record["epoch"] == 0 and 0.0 <= record["miou"] <= 1.0, record
