"""Real launches on this machine (gloo on 127.0.0.1), each forming a world of two.

- launch/dist_train.sh on one node: torchrun --standalone --nproc_per_node=2;
- launch/dist_train.sh twice, as two nodes meeting at a c10d rendezvous;
- two plain processes given only the variables srun sets (SLURM_*), then one of them killed;
- two plain processes given torchrun's variables by hand, then one of them frozen: the other
  must fail after the short timeout instead of hanging.

Run as a script (`python tests/test_launch.py worker TIMEOUT FAULT`), this file is the worker
of the plain-process worlds.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)  # every test here starts processes
BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
PROBE_LINE = re.compile(
    r"^rank (\d+)/(\d+) local (\d+)/(\d+) backend (\S+) sum=(\S+) host \S+ device \S+ "
    r"launcher (\S+)$",
    re.M,
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, plus `extra`."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHRUN=str(TORCHRUN))
    env.update(extra)
    return env


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_lines(text: str) -> list[tuple]:
    """Probe lines sorted by rank: (rank, world, local, local_world, backend, sum, launcher)."""
    rows = [
        (int(r), int(w), int(lr), int(lw), b, float(s), la)
        for r, w, lr, lw, b, s, la in PROBE_LINE.findall(text)
    ]
    return sorted(rows)


def run(cmd, env, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ----------------------------------------------------------------------------------------
# torchrun through launch/dist_train.sh
# ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_probe_single_process():
    proc = run([sys.executable, "-m", "syncsn.distributed"], clean_env())
    assert proc.returncode == 0, proc.stderr
    assert probe_lines(proc.stdout) == [(0, 1, 0, 1, "none", 1.0, "single")]


@pytest.mark.timeout(120)
def test_dist_train_standalone_two_processes():
    env = clean_env(GPUS="2")
    cmd = ["bash", "launch/dist_train.sh", "-m", "syncsn.distributed", "--timeout", "60"]
    proc = run(cmd, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--standalone" in proc.stderr and "--nproc_per_node=2" in proc.stderr
    assert probe_lines(proc.stdout) == [
        (0, 2, 0, 2, "gloo", 3.0, "torchrun"),
        (1, 2, 1, 2, "gloo", 3.0, "torchrun"),
    ], proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_dist_train_two_nodes_c10d_rendezvous():
    # Two torchrun agents, one process each, meet at 127.0.0.1:PORT as "nodes" of one job.
    endpoint = f"127.0.0.1:{free_port()}"
    env = clean_env(GPUS="1", NNODES="2", RDZV_ENDPOINT=endpoint, RDZV_ID=f"t{os.getpid()}")
    cmd = ["bash", "launch/dist_train.sh", "-m", "syncsn.distributed", "--timeout", "60"]
    nodes = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outs = [node.communicate(timeout=90) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (out, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, out + err
        assert f"--rdzv_endpoint={endpoint}" in err and "--nnodes=2" in err
    # Each agent is a node with one local process: ranks 0 and 1, both local rank 0 of 1.
    assert probe_lines(outs[0][0] + outs[1][0]) == [
        (0, 2, 0, 1, "gloo", 3.0, "torchrun"),
        (1, 2, 0, 1, "gloo", 3.0, "torchrun"),
    ]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "--nproc_per_node=3 --standalone -m m --x 1"),
        ({"CUDA_VISIBLE_DEVICES": ""}, "--nproc_per_node=1 --standalone -m m --x 1"),
        (
            {"GPUS": "8", "NNODES": "4", "RDZV_ENDPOINT": "n1:29400"},
            "--nproc_per_node=8 --nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=n1:29400 "
            "--rdzv_id=syncsn -m m --x 1",
        ),
        (
            {"GPUS": "2", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "n1"},
            "--nproc_per_node=2 --nnodes=2 --node_rank=1 --master_addr=n1 --master_port=29500 "
            "-m m --x 1",
        ),
        ({"GPUS": "1", "TORCHRUN_ARGS": "--max-restarts=3"}, "--max-restarts=3 -m m --x 1"),
    ],
)
def test_dist_train_command_line(env, expected):
    # TORCHRUN=echo shows the arguments torchrun would get.
    proc = run(
        ["bash", "launch/dist_train.sh", "-m", "m", "--x", "1"],
        clean_env(TORCHRUN="echo", **env),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(expected)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2"}, "needs RDZV_ENDPOINT=host:port .* or NODE_RANK and MASTER_ADDR"),
        ({"GPUS": "two"}, "GPUS must be a positive integer, got 'two'"),
        ({"NNODES": "0"}, "NNODES must be a positive integer, got '0'"),
    ],
)
def test_dist_train_errors(env, message):
    proc = run(["bash", "launch/dist_train.sh", "x.py"], clean_env(**env), timeout=30)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr


@pytest.fixture()
def fake_slurm_bin(tmp_path):
    """srun that prints what it was asked to run; scontrol that fails (no cluster), so the
    script expands the node list with syncsn's own expand_hostlist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/sh\necho "PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-}"\necho "srun $*"\n'
    )
    (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


SLURM_JOB = {  # the batch script's view of a 2-node job, 8 tasks and 32 CPUs per node
    "SLURM_JOB_ID": "4321",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_CPUS_PER_TASK": "4",
    "SLURM_CPUS_ON_NODE": "32",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
}


@pytest.mark.timeout(60)
def test_slurm_train_command_lines(fake_slurm_bin):
    path = f"{fake_slurm_bin}{os.pathsep}{os.environ['PATH']}"
    cmd = ["bash", "launch/slurm_train.sh", "train.py", "--resume", "auto"]
    env = clean_env(PATH=path, PYTHON=sys.executable, **SLURM_JOB)

    tasks = run(cmd, env, timeout=30)
    assert tasks.returncode == 0, tasks.stderr
    expected = f"srun --kill-on-bad-exit=1 --cpus-per-task=4 {sys.executable} train.py"
    assert f"{expected} --resume auto" in tasks.stdout
    tasks = run(cmd, {**env, "SRUN_ARGS": "--exclusive --gpu-bind=closest"}, timeout=30)
    expected = "srun --kill-on-bad-exit=1 --cpus-per-task=4 --exclusive --gpu-bind=closest "
    assert f"{expected}{sys.executable} train.py --resume auto" in tasks.stdout

    port = 20000 + 4321 % 10000
    launched = run(cmd, {**env, "LAUNCH_MODE": "torchrun"}, timeout=30)
    assert launched.returncode == 0, launched.stderr
    assert (
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=32 "
        f"{TORCHRUN} --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
        f"--rdzv_endpoint=gpu-a07:{port} --rdzv_id=4321 train.py --resume auto"
    ) in launched.stdout
    assert "SIGUSR1" in launched.stdout.split("PET_SIGNALS_TO_HANDLE=")[1].split()[0]


def test_slurm_train_errors(fake_slurm_bin):
    path = f"{fake_slurm_bin}{os.pathsep}{os.environ['PATH']}"
    outside = run(["bash", "launch/slurm_train.sh", "x.py"], clean_env(PATH=path), timeout=30)
    assert outside.returncode == 2 and "SLURM_JOB_ID is not set" in outside.stderr
    bad_mode = run(
        ["bash", "launch/slurm_train.sh", "x.py"],
        clean_env(PATH=path, LAUNCH_MODE="mpi", **SLURM_JOB),
        timeout=30,
    )
    assert bad_mode.returncode == 2
    assert "LAUNCH_MODE must be 'tasks' or 'torchrun', got 'mpi'" in bad_mode.stderr


# ----------------------------------------------------------------------------------------
# plain processes: SLURM variables, faults
# ----------------------------------------------------------------------------------------


def start_world(envs: list[dict[str, str]], timeout: float, fault: str) -> list[subprocess.Popen]:
    """Start one worker per environment; returns once all have joined the process group.

    The workers import torch first and wait for a go, so that on a busy machine a slow
    import cannot exceed the (deliberately short) rendezvous timeout.
    """
    worker = [sys.executable, str(Path(__file__).resolve()), "worker", str(timeout), fault]
    procs = [
        subprocess.Popen(
            worker,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    deadline = time.monotonic() + 90
    for p in procs:
        read_until(p, "imported", deadline)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


def read_until(proc: subprocess.Popen, marker: str, deadline: float) -> str:
    """Lines of proc's stdout up to and including the one containing `marker`."""
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited before {marker!r}: {seen}{proc.stderr.read()}")
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} in time: {seen}")


def free_slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT is free right now."""
    from syncsn.distributed import slurm_master_port

    for _ in range(200):
        job_id = random.randrange(10**5, 10**7)
        if port_is_free(slurm_master_port(job_id)):
            return job_id
    raise RuntimeError("no free port in the SLURM master port range")


@pytest.mark.timeout(120)
def test_slurm_variables_world_and_a_killed_rank():
    job_id = free_slurm_job_id()
    envs = [
        clean_env(
            SLURM_JOB_ID=str(job_id),
            SLURM_STEP_ID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_NNODES="1",
            SLURM_NODEID="0",
            SLURM_STEP_TASKS_PER_NODE="2",
            SLURM_JOB_NODELIST="localhost",
        )
        for rank in range(2)
    ]
    # A killed peer is noticed at once (its sockets close), not by the timeout, so the timeout
    # can leave a busy machine ample time for the rendezvous.
    procs = start_world(envs, timeout=60, fault="kill")
    try:
        deadline = time.monotonic() + 90
        head = [read_until(p, "waiting", deadline) for p in procs]
        assert probe_lines("".join(head)) == [
            (0, 2, 0, 2, "gloo", 3.0, "slurm"),
            (1, 2, 1, 2, "gloo", 3.0, "slurm"),
        ]
        # Rank 1 dies while rank 0 is inside an all-reduce with it.
        time.sleep(0.5)
        procs[1].kill()
        start = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0, out
    assert "collective failed" in out and "rank 0" in out, out + err
    assert elapsed < 30, f"the surviving rank took {elapsed:.1f}s to notice"


@pytest.mark.timeout(120)
def test_env_variables_world_and_a_frozen_rank_times_out():
    port = free_port()
    envs = [
        clean_env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        for rank in range(2)
    ]
    timeout = 4.0
    procs = start_world(envs, timeout=timeout, fault="freeze")
    try:
        deadline = time.monotonic() + 90
        head = [read_until(p, "waiting", deadline) for p in procs]
        assert probe_lines("".join(head)) == [
            (0, 2, 0, 2, "gloo", 3.0, "torchrun"),
            (1, 2, 1, 2, "gloo", 3.0, "torchrun"),
        ]
        # Rank 1 stays alive but stops answering: only the timeout can end rank 0's wait.
        start = time.monotonic()
        os.kill(procs[1].pid, signal.SIGSTOP)
        out, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0, out
    assert "collective failed" in out, out + err
    assert timeout - 1 <= elapsed < timeout + 20, f"failed after {elapsed:.1f}s"


# ----------------------------------------------------------------------------------------
# worker (run as a script)
# ----------------------------------------------------------------------------------------


def worker(timeout: float, fault: str) -> int:
    import torch
    import torch.distributed as dist

    from syncsn.distributed import cleanup, init_distributed

    print("imported", flush=True)
    sys.stdin.readline()
    info = init_distributed(timeout=timeout)
    assert init_distributed() is info  # idempotent
    # Re-forming the group after cleanup() must work too (a script may call both twice).
    cleanup()
    assert not dist.is_initialized()
    info = init_distributed(timeout=timeout)

    value = torch.tensor([float(info.rank + 1)], dtype=torch.float64)
    dist.all_reduce(value)
    print(
        f"rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
        f"backend {info.backend} sum={value.item():g} host {socket.gethostname()} "
        f"device {info.device} launcher {info.launcher}",
        flush=True,
    )
    print(f"rank {info.rank} waiting", flush=True)
    if info.rank == 1:
        time.sleep(600)  # killed or frozen by the test
        return 0
    try:
        dist.all_reduce(value)
    except Exception as exc:  # the error a training script would see
        print(f"rank 0 collective failed ({fault}): {type(exc).__name__}: {exc}", flush=True)
        return 3
    print("rank 0 all-reduce returned although rank 1 is gone", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(worker(float(sys.argv[2]), sys.argv[3]))
    sys.exit("usage: python tests/test_launch.py worker TIMEOUT kill|freeze")
