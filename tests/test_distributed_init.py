"""init_distributed without launching processes: hostlists, environment detection, errors.

Every test starts from an environment stripped of launcher variables (the suite itself may run
inside a SLURM job or under torchrun) and sets exactly the variables of the case.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from syncsn import distributed as sd
from syncsn.distributed import (
    LaunchEnvironmentError,
    cleanup,
    detect_launch_env,
    expand_hostlist,
    expand_tasks_per_node,
    init_distributed,
    slurm_master_port,
)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
LAUNCHER_VARS += ("MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name in LAUNCHER_VARS or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    cleanup()
    yield monkeypatch
    cleanup()


# ----------------------------------------------------------------------------------------
# hostlist and tasks-per-node syntax
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostlist, expected",
    [
        ("node1", ["node1"]),
        (
            "gpu-a[01-03,07],gpu-b12",
            ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a07", "gpu-b12"],
        ),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("host[007]", ["host007"]),
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
        ("cn-[3,1]", ["cn-3", "cn-1"]),  # order as written, as Slurm keeps it
        ("login.cluster[1-2].org", ["login.cluster1.org", "login.cluster2.org"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


def test_expand_hostlist_long_range_keeps_width():
    hosts = expand_hostlist("gpu[0001-1000],login")
    assert hosts == [f"gpu{i:04d}" for i in range(1, 1001)] + ["login"]


@pytest.mark.parametrize(
    "hostlist, message",
    [
        ("", "empty"),
        ("n[1-", "never closed"),
        ("n1]", "without '\\['"),
        ("n[[1]]", "nested"),
        ("n[3-1]", "backwards"),
        ("n[a-b]", "inside brackets"),
        ("n[]", "inside brackets"),
        ("n[1-2-3]", "inside brackets"),
        ("a,,b", "empty name"),
    ],
)
def test_expand_hostlist_errors(hostlist, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(hostlist)


@pytest.mark.parametrize(
    "spec, expected",
    [("8", [8]), ("2(x3),1", [2, 2, 2, 1]), ("4,4(x1)", [4, 4]), ("1(x2)", [1, 1])],
)
def test_expand_tasks_per_node(spec, expected):
    assert expand_tasks_per_node(spec) == expected


@pytest.mark.parametrize("spec", ["", "2(x)", "x", "2(3)", "2,"])
def test_expand_tasks_per_node_errors(spec):
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node(spec)


def test_slurm_master_port_range_and_spread():
    ports = [slurm_master_port(job) for job in range(123456, 123456 + 50)]
    assert all(sd.SLURM_PORT_BASE <= p < sd.SLURM_PORT_BASE + sd.SLURM_PORT_SPAN for p in ports)
    assert len(set(ports)) == len(ports)  # consecutive jobs get different ports
    assert slurm_master_port(7) == slurm_master_port(7)


# ----------------------------------------------------------------------------------------
# detection: torchrun, SLURM, single process
# ----------------------------------------------------------------------------------------


def torchrun_env(**overrides):
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node-a",
        "MASTER_PORT": "29400",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def slurm_env(**overrides):
    """What srun gives task 5 of an 8-task step on two nodes (4 tasks each)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu-a[07-08]",
        "SLURM_STEP_NODELIST": "gpu-a[07-08]",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_detect_single_process():
    assert detect_launch_env({}) == sd.LaunchEnv("single", 0, 1, 0, 1)


def test_detect_torchrun():
    got = detect_launch_env(torchrun_env())
    assert got == sd.LaunchEnv("torchrun", 5, 8, 1, 4, "node-a", 29400)


def test_detect_torchrun_without_local_world_size_is_one_node():
    got = detect_launch_env(torchrun_env(RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE=None))
    assert (got.local_rank, got.local_world_size) == (1, 2)


def test_detect_torchrun_world_of_one_needs_no_master():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert detect_launch_env(env) == sd.LaunchEnv("torchrun", 0, 1, 0, 1, None, None)


def test_detect_slurm():
    got = detect_launch_env(slurm_env())
    assert got == sd.LaunchEnv("slurm", 5, 8, 1, 4, "gpu-a07", slurm_master_port(4242))


def test_detect_slurm_prefers_step_nodelist_and_explicit_master():
    env = slurm_env(SLURM_STEP_NODELIST="gpu-b[3-4]")
    assert detect_launch_env(env).master_addr == "gpu-b3"
    env = slurm_env(MASTER_ADDR="10.1.2.3", MASTER_PORT="12345")
    assert (detect_launch_env(env).master_addr, detect_launch_env(env).master_port) == (
        "10.1.2.3",
        12345,
    )


def test_detect_slurm_uneven_tasks_per_node():
    # 5 tasks: nodes 0 and 1 hold 2, node 2 holds 1; task 4 is alone on node 2.
    env = slurm_env(
        SLURM_PROCID="4",
        SLURM_NTASKS="5",
        SLURM_LOCALID="0",
        SLURM_NODEID="2",
        SLURM_NNODES="3",
        SLURM_STEP_TASKS_PER_NODE="2(x2),1",
        SLURM_TASKS_PER_NODE="2(x2),1",
        SLURM_JOB_NODELIST="gpu-a[07-09]",
        SLURM_STEP_NODELIST="gpu-a[07-09]",
    )
    got = detect_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (4, 5, 0, 1)


def test_detect_slurm_step_on_part_of_the_job_nodes():
    # `srun -N2` inside a 3-node job: the step's variables describe 2 of the job's nodes.
    env = slurm_env(SLURM_JOB_NODELIST="gpu-a[07-09]", SLURM_STEP_NUM_NODES="2")
    assert detect_launch_env(env).master_addr == "gpu-a07"


def test_detect_slurm_single_node_without_tasks_per_node():
    env = slurm_env(
        SLURM_PROCID="1",
        SLURM_NTASKS="2",
        SLURM_NODEID="0",
        SLURM_NNODES="1",
        SLURM_STEP_TASKS_PER_NODE=None,
        SLURM_TASKS_PER_NODE=None,
        SLURM_STEP_NODELIST=None,
        SLURM_JOB_NODELIST="localhost",
    )
    got = detect_launch_env(env)
    assert (got.rank, got.world_size, got.local_world_size, got.master_addr) == (
        1,
        2,
        2,
        "localhost",
    )


def test_detect_batch_step_with_one_task_is_a_single_process():
    # `python train.py` in the batch script of a one-task job: SLURM_PROCID but no step.
    env = {
        "SLURM_JOB_ID": "17",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_TASKS_PER_NODE": "1",
        "SLURM_JOB_NODELIST": "node7",
    }
    got = detect_launch_env(env)
    assert (got.world_size, got.master_addr) == (1, None)


def test_torchrun_variables_win_over_slurm():
    # `srun torchrun ...`: the workers see both; torchrun's describe the real world.
    env = {**slurm_env(), **torchrun_env(RANK="0", LOCAL_RANK="0")}
    got = detect_launch_env(env)
    assert (got.launcher, got.rank, got.master_addr) == ("torchrun", 0, "node-a")


# ----------------------------------------------------------------------------------------
# detection errors: each names the variables involved
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, pattern",
    [
        ({"RANK": "0"}, r"RANK set but WORLD_SIZE, LOCAL_RANK missing"),
        ({"RANK": "0", "LOCAL_RANK": "0"}, r"WORLD_SIZE missing"),
        ({"LOCAL_RANK": "0"}, r"LOCAL_RANK set but RANK, WORLD_SIZE missing"),
        (torchrun_env(RANK="8"), r"RANK=8 must be smaller than WORLD_SIZE=8"),
        (torchrun_env(RANK="two"), r"RANK must be an integer, got 'two'"),
        (torchrun_env(RANK="-1"), r"RANK must be >= 0, got -1"),
        (torchrun_env(WORLD_SIZE="0"), r"WORLD_SIZE must be >= 1, got 0"),
        (torchrun_env(LOCAL_RANK="4"), r"LOCAL_RANK=4 must be smaller than LOCAL_WORLD_SIZE=4"),
        (torchrun_env(LOCAL_WORLD_SIZE="16"), r"LOCAL_WORLD_SIZE=16 exceeds WORLD_SIZE=8"),
        (torchrun_env(MASTER_ADDR=None), r"WORLD_SIZE=8 but MASTER_ADDR not set"),
        (
            torchrun_env(MASTER_ADDR=None, MASTER_PORT=None),
            r"MASTER_ADDR and MASTER_PORT not set",
        ),
        (torchrun_env(MASTER_PORT="70000"), r"MASTER_PORT must be a TCP port .* got 70000"),
        (slurm_env(SLURM_NTASKS=None), r"SLURM_PROCID set but SLURM_NTASKS missing"),
        (slurm_env(SLURM_PROCID="8"), r"SLURM_PROCID=8 must be smaller than SLURM_NTASKS=8"),
        (
            slurm_env(SLURM_LOCALID="4"),
            r"SLURM_LOCALID=4 must be smaller than SLURM_STEP_TASKS_PER_NODE=4",
        ),
        (slurm_env(SLURM_STEP_ID=None), r"SLURM_NTASKS=8 but SLURM_STEP_ID is not set.*srun"),
        (
            slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None),
            r"neither SLURM_STEP_TASKS_PER_NODE nor SLURM_TASKS_PER_NODE",
        ),
        (slurm_env(SLURM_NODEID="2"), r"SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE"),
        (
            slurm_env(SLURM_JOB_NODELIST=None, SLURM_STEP_NODELIST=None),
            r"MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST",
        ),
        (slurm_env(SLURM_JOB_ID=None), r"neither MASTER_PORT nor SLURM_JOB_ID"),
        (
            slurm_env(SLURM_JOB_NODELIST="gpu[2-1]", SLURM_STEP_NODELIST=None),
            r"SLURM_JOB_NODELIST='gpu\[2-1\]' is malformed: .*backwards",
        ),
    ],
)
def test_detect_errors(env, pattern):
    with pytest.raises((LaunchEnvironmentError, ValueError), match=pattern):
        detect_launch_env(env)


@pytest.mark.parametrize(
    "env, pattern",
    [
        # A malformed value: the error names the variable, then what is wrong with it.
        (
            slurm_env(SLURM_STEP_TASKS_PER_NODE="4(x2"),
            r"SLURM_STEP_TASKS_PER_NODE='4\(x2' is malformed: .*expected items like 4 or 4\(x2\)",
        ),
        (
            slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="four"),
            r"SLURM_TASKS_PER_NODE='four' is malformed",
        ),
        (
            slurm_env(SLURM_JOB_NODELIST="gpu-a[07-08", MASTER_ADDR="10.0.0.1"),
            r"SLURM_JOB_NODELIST='gpu-a\[07-08' is malformed: .*never closed",
        ),
        (
            slurm_env(SLURM_STEP_NODELIST="gpu-a[07,,08]"),
            r"SLURM_STEP_NODELIST='gpu-a\[07,,08\]' is malformed",
        ),
        # Variables that contradict each other.
        (
            slurm_env(
                SLURM_PROCID="1",
                SLURM_NTASKS="2",
                SLURM_NODEID="0",
                SLURM_STEP_TASKS_PER_NODE=None,
                SLURM_TASKS_PER_NODE="2(x2)",
            ),
            r"SLURM_TASKS_PER_NODE='2\(x2\)' lists 4 tasks but SLURM_NTASKS=2",
        ),
        (slurm_env(SLURM_NTASKS="16"), r"lists 8 tasks but SLURM_NTASKS=16"),
        (
            slurm_env(SLURM_STEP_NUM_NODES="3"),
            r"SLURM_STEP_TASKS_PER_NODE='4\(x2\)' lists 2 nodes but SLURM_STEP_NUM_NODES=3",
        ),
        (
            slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_NNODES="3"),
            r"SLURM_TASKS_PER_NODE='4\(x2\)' lists 2 nodes but SLURM_NNODES=3",
        ),
        (
            slurm_env(SLURM_STEP_NODELIST="gpu-a07"),
            r"lists 2 nodes but SLURM_STEP_NODELIST='gpu-a07' names 1",
        ),
        (
            slurm_env(SLURM_JOB_NODELIST="gpu-a07", SLURM_STEP_NODELIST=None),
            r"lists 2 nodes but the job's SLURM_JOB_NODELIST='gpu-a07' names only 1",
        ),
    ],
)
def test_detect_slurm_names_the_variable_and_checks_them_together(env, pattern):
    with pytest.raises(LaunchEnvironmentError, match=pattern):
        detect_launch_env(env)


# ----------------------------------------------------------------------------------------
# init_distributed / cleanup in this process
# ----------------------------------------------------------------------------------------


def test_init_single_process_is_idempotent_and_makes_no_group():
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (0, 1, 0, 1)
    assert info.is_main and not info.is_distributed
    assert info.backend is None and info.launcher == "single"
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert info.device == expected
    assert not dist.is_initialized()
    assert init_distributed() is info
    cleanup()
    again = init_distributed()
    assert again == info and again is not info


def test_init_reads_the_environment(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(LaunchEnvironmentError, match="WORLD_SIZE"):
        init_distributed()
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    info = init_distributed()
    assert (info.launcher, info.world_size, info.backend) == ("torchrun", 1, None)


def test_init_nccl_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="nccl.*needs CUDA.*gloo"):
        init_distributed(backend="nccl")


def test_device_is_local_rank_or_the_single_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sd._pick_device(3) == torch.device("cuda", 3)
    with pytest.raises(LaunchEnvironmentError, match="local rank 4 but only 4 GPUs"):
        sd._pick_device(4)
    # --gpus-per-task=1: every task sees one GPU, index 0, whatever its local rank.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sd._pick_device(3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sd._pick_device(3) == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_init_adopts_an_existing_group_and_checks_it(clean_env):
    # A group formed by other code (world of one, so no peer is needed).
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        info = init_distributed()
        assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo")
        with pytest.raises(RuntimeError, match="already uses 'gloo'"):
            init_distributed(backend="nccl")
        sd._INFO = None  # forget it, then describe a world the group contradicts
        for name, value in torchrun_env(RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
            clean_env.setenv(name, value)
        with pytest.raises(LaunchEnvironmentError, match=r"rank 0/1 .* says 1/2"):
            init_distributed()
    finally:
        cleanup()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------------
# rendezvous: a port held by another service, a port nobody listens on
# ----------------------------------------------------------------------------------------

RENDEZVOUS_TIMEOUT = 1.0
# The timeout, torch's last connection back-off and the grace after it, a slow machine.
RENDEZVOUS_BOUND = 8.0


def _rank_one_env(launcher: str, port: int) -> dict[str, str]:
    if launcher == "torchrun":
        return torchrun_env(
            RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
    return slurm_env(
        SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NODEID="0",
        SLURM_NNODES="1", SLURM_STEP_TASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2",
        SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip


def _join_store_clients() -> None:
    """The connecting threads end once the service they wait on closes its socket."""
    for thread in threading.enumerate():
        if thread.name == "syncsn-store-client":
            thread.join(10)
            assert not thread.is_alive()


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_a_port_held_by_another_service_fails_within_the_timeout(clean_env, launcher):
    """torch's client waits forever for the handshake of a service that accepts the
    connection and never answers; rank > 0 must give up after the timeout, naming the port."""
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen(8)  # the kernel accepts connections; the service never answers
    port = service.getsockname()[1]
    for name, value in _rank_one_env(launcher, port).items():
        clean_env.setenv(name, value)
    start = time.monotonic()
    try:
        with pytest.raises(dist.DistNetworkError) as caught:
            init_distributed(timeout=RENDEZVOUS_TIMEOUT)
        elapsed = time.monotonic() - start
    finally:
        service.close()
    _join_store_clients()
    message = str(caught.value)
    assert f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)" in message
    assert "does not answer as a torch.distributed store" in message
    assert "free MASTER_PORT" in message
    assert RENDEZVOUS_TIMEOUT <= elapsed < RENDEZVOUS_BOUND, elapsed
    assert not dist.is_initialized()
    assert sd._INFO is None


@pytest.mark.timeout(30, method="thread")
def test_a_port_nobody_listens_on_fails_within_the_timeout_naming_it(clean_env):
    port = _free_port()
    for name, value in _rank_one_env("torchrun", port).items():
        clean_env.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(dist.DistNetworkError) as caught:
        init_distributed(timeout=RENDEZVOUS_TIMEOUT)
    elapsed = time.monotonic() - start
    _join_store_clients()
    message = str(caught.value)
    assert f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)" in message
    assert "nothing accepts connections there: is rank 0 running" in message
    assert elapsed < RENDEZVOUS_BOUND, elapsed
    assert not dist.is_initialized()
