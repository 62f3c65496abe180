"""Process-group set-up for torchrun, SLURM and single-process runs.

`init_distributed()` reads the launcher's environment, joins the process group and picks the
device; every training script calls it once at start-up and `cleanup()` at the end::

    info = init_distributed()
    model = convert_sync_switchnorm(model).to(info.device)
    ...
    cleanup()

Detection order (the first that applies wins):

1. torchrun (or any launcher that sets the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
2. SLURM, one task per process (`srun python train.py`): SLURM_PROCID, SLURM_NTASKS,
   SLURM_LOCALID, the tasks per node and the node list. MASTER_ADDR defaults to the first
   host of the step's node list (expanded here, as `scontrol` needs a cluster configuration)
   and MASTER_PORT to a port derived from SLURM_JOB_ID, so every task agrees without talking.
3. Otherwise a single process: world size 1, no process group, and the synchronized layers
   make no collective call.

`python -m syncsn.distributed` runs a probe: it initializes, all-reduces one number and prints
one line per rank, a quick check that a launcher or a cluster is set up correctly.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "LaunchEnv",
    "LaunchEnvironmentError",
    "cleanup",
    "detect_launch_env",
    "expand_hostlist",
    "expand_tasks_per_node",
    "init_distributed",
    "slurm_master_port",
]

#: A MASTER_PORT derived from a SLURM job id is SLURM_PORT_BASE + job id % SLURM_PORT_SPAN,
#: below Linux's ephemeral range (32768+), so an outgoing connection rarely holds it.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

T = TypeVar("T")


class LaunchEnvironmentError(RuntimeError):
    """The launcher's environment variables are incomplete or contradict each other."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process's place in the world (no side effects).

    launcher is "torchrun", "slurm" or "single". master_addr/master_port are None for a
    single process.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the initialized world, as returned by `init_distributed`.

    backend is None for a single process (no process group exists).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None
    launcher: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------------------
# Slurm's compact list syntaxes
# ----------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{what} {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what} {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"{what} {text!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_brackets(body: str, pattern: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; the width of a range's start is kept."""
    values = []
    for item in body.split(","):
        m = _RANGE.match(item)
        if m is None:
            raise ValueError(
                f"hostlist {pattern!r}: expected numbers or ranges like 01-03 inside "
                f"brackets, got {item!r}"
            )
        lo_text, hi_text = m.group(1), m.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"hostlist {pattern!r}: range {item!r} runs backwards")
        values.extend(str(i).zfill(len(lo_text)) for i in range(lo, hi + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's hostlist syntax into host names, in order.

    'gpu-a[01-03,07],gpu-b12' -> ['gpu-a01', 'gpu-a02', 'gpu-a03', 'gpu-a07', 'gpu-b12'].
    Zero padding is kept (the width of a range's first number), and a name may hold several
    bracket groups, expanded left group outermost ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2).
    """
    text = hostlist.strip()
    if not text:
        raise ValueError("hostlist is empty: expected names like 'node[01-04],login1'")
    hosts: list[str] = []
    for pattern in _split_top_level(text, "hostlist"):
        if not pattern:
            raise ValueError(f"hostlist {hostlist!r}: empty name between commas")
        # re.split with a group keeps the bracket bodies at the odd positions.
        pieces = re.split(r"\[([^\]]*)\]", pattern)
        expanded = [""]
        for i, piece in enumerate(pieces):
            choices = _expand_brackets(piece, pattern) if i % 2 else [piece]
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        hosts.extend(expanded)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE syntax: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise ValueError(
                f"tasks per node {spec!r}: expected items like 4 or 4(x2), got {item!r}"
            )
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int) -> int:
    """The MASTER_PORT every task of SLURM job `job_id` derives when none is given."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# ----------------------------------------------------------------------------------------
# Environment detection (pure: reads a mapping, changes nothing)
# ----------------------------------------------------------------------------------------

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_NODE_COUNT_VARS = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES")
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise LaunchEnvironmentError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise LaunchEnvironmentError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_ranks(launcher: str, names: tuple[str, str, str, str], values: tuple[int, ...]):
    """rank < world_size, local_rank < local_world_size <= world_size."""
    rank_n, world_n, local_n, local_world_n = names
    rank, world, local, local_world = values
    if rank >= world:
        raise LaunchEnvironmentError(
            f"{launcher}: {rank_n}={rank} must be smaller than {world_n}={world}"
        )
    if local >= local_world:
        raise LaunchEnvironmentError(
            f"{launcher}: {local_n}={local} must be smaller than {local_world_n}={local_world}"
        )
    if local_world > world:
        raise LaunchEnvironmentError(
            f"{launcher}: {local_world_n}={local_world} exceeds {world_n}={world}"
        )


def _master_port(env: Mapping[str, str]) -> int:
    port = _int(env, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise LaunchEnvironmentError(f"MASTER_PORT must be a TCP port (1-65535), got {port}")
    return port


def _detect_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [name for name in _TORCHRUN_VARS if name not in env]
    if missing:
        present = [name for name in _TORCHRUN_VARS if name in env]
        raise LaunchEnvironmentError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: torchrun sets all of "
            f"{', '.join(_TORCHRUN_VARS)}; set them together (or none of them)"
        )
    rank = _int(env, "RANK")
    world = _int(env, "WORLD_SIZE", minimum=1)
    local = _int(env, "LOCAL_RANK")
    # LOCAL_WORLD_SIZE is informational; a hand-made environment without it is one node.
    local_world = _int(env, "LOCAL_WORLD_SIZE", minimum=1) if "LOCAL_WORLD_SIZE" in env else world
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    _check_ranks("torchrun", names, (rank, world, local, local_world))
    addr, port = env.get("MASTER_ADDR"), None
    if world > 1:
        absent = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if absent:
            raise LaunchEnvironmentError(
                f"torchrun: WORLD_SIZE={world} but {' and '.join(absent)} not set: every rank "
                "needs the address and port of rank 0"
            )
        port = _master_port(env)
    return LaunchEnv("torchrun", rank, world, local, local_world, addr, port)


def _parsed(env: Mapping[str, str], name: str, parse: Callable[[str], list[T]]) -> list[T]:
    """``parse(env[name])``, its ValueError reworded to name the variable."""
    try:
        return parse(env[name])
    except ValueError as e:
        raise LaunchEnvironmentError(f"{name}={env[name]!r} is malformed: {e}") from None


def _check_layout(env: Mapping[str, str], spec_name: str, counts: list[int], world: int) -> None:
    """The tasks-per-node list against the task count and the node lists and counts.

    srun sets the step's values (SLURM_STEP_*, and SLURM_TASKS_PER_NODE, SLURM_NTASKS,
    SLURM_NNODES for the step); SLURM_JOB_NODELIST is the job's, which a step may use part of.
    """
    listed = f"{spec_name}={env[spec_name]!r}"
    if sum(counts) != world:
        raise LaunchEnvironmentError(
            f"{listed} lists {sum(counts)} tasks but SLURM_NTASKS={world}: the variables "
            "come from different jobs or steps, or were set by hand"
        )
    step_level = spec_name == "SLURM_STEP_TASKS_PER_NODE"
    same_nodes = ("SLURM_STEP_NUM_NODES",) if step_level else ("SLURM_NNODES",)
    for name in same_nodes:
        if name in env and _int(env, name, minimum=1) != len(counts):
            raise LaunchEnvironmentError(
                f"{listed} lists {len(counts)} nodes but {name}={env[name]}"
            )
    if step_level and env.get("SLURM_STEP_NODELIST"):
        hosts = _parsed(env, "SLURM_STEP_NODELIST", expand_hostlist)
        if len(hosts) != len(counts):
            raise LaunchEnvironmentError(
                f"{listed} lists {len(counts)} nodes but SLURM_STEP_NODELIST="
                f"{env['SLURM_STEP_NODELIST']!r} names {len(hosts)}"
            )
    if env.get("SLURM_JOB_NODELIST"):
        hosts = _parsed(env, "SLURM_JOB_NODELIST", expand_hostlist)
        if len(hosts) < len(counts):
            raise LaunchEnvironmentError(
                f"{listed} lists {len(counts)} nodes but the job's SLURM_JOB_NODELIST="
                f"{env['SLURM_JOB_NODELIST']!r} names only {len(hosts)}"
            )


def _detect_slurm(env: Mapping[str, str]) -> LaunchEnv:
    required = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [name for name in required if name not in env]
    if missing:
        raise LaunchEnvironmentError(
            f"SLURM_PROCID set but {', '.join(missing)} missing: expected the variables "
            "srun sets for each task"
        )
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_NTASKS", minimum=1)
    local = _int(env, "SLURM_LOCALID")
    if world > 1 and "SLURM_STEP_ID" not in env:
        # The batch script itself carries SLURM_PROCID=0 and the job's SLURM_NTASKS; a
        # process started there without srun would wait forever for its peers.
        raise LaunchEnvironmentError(
            f"SLURM_NTASKS={world} but SLURM_STEP_ID is not set: this process runs in the "
            "batch script, not in an srun step. Start it with srun (launch/slurm_train.sh "
            "does), or set RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 to run a single process"
        )

    spec_name = next(
        (n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None
    )
    if spec_name is not None:
        counts = _parsed(env, spec_name, expand_tasks_per_node)
        _check_layout(env, spec_name, counts, world)
        node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        if node >= len(counts):
            raise LaunchEnvironmentError(
                f"SLURM_NODEID={node} but {spec_name}={env[spec_name]!r} lists {len(counts)} nodes"
            )
        local_world = counts[node]
    elif all(_int(env, n, minimum=1) == 1 for n in _NODE_COUNT_VARS if n in env):
        local_world = world
    else:
        raise LaunchEnvironmentError(
            "SLURM job on several nodes but neither SLURM_STEP_TASKS_PER_NODE nor "
            "SLURM_TASKS_PER_NODE is set: cannot tell how many tasks share this node"
        )
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", spec_name or "SLURM_NTASKS")
    _check_ranks("slurm", names, (rank, world, local, local_world))

    addr, port = env.get("MASTER_ADDR") or None, None
    if world > 1:
        if addr is None:
            list_name = next((n for n in _NODELIST_VARS if env.get(n)), None)
            if list_name is None:
                raise LaunchEnvironmentError(
                    "slurm: MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST, so the "
                    "address of rank 0 is unknown"
                )
            # srun places rank 0 on the first node of the step.
            addr = _parsed(env, list_name, expand_hostlist)[0]
        if env.get("MASTER_PORT"):
            port = _master_port(env)
        elif "SLURM_JOB_ID" in env:
            port = slurm_master_port(_int(env, "SLURM_JOB_ID"))
        else:
            raise LaunchEnvironmentError(
                "slurm: neither MASTER_PORT nor SLURM_JOB_ID is set, so the port of rank 0 "
                "is unknown"
            )
    return LaunchEnv("slurm", rank, world, local, local_world, addr, port)


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read this process's rank, world size and rendezvous address from the environment.

    Raises LaunchEnvironmentError, naming the variables, when the environment is partial or
    contradictory. `environ` defaults to os.environ.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in _TORCHRUN_VARS):
        return _detect_torchrun(env)
    if "SLURM_PROCID" in env:
        return _detect_slurm(env)
    return LaunchEnv("single", 0, 1, 0, 1)


# ----------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------

_INFO: DistInfo | None = None


def _pick_device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        # One visible GPU per task (--gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank).
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise LaunchEnvironmentError(
            f"local rank {local_rank} but only {count} GPUs are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
            "start at most one process per GPU"
        )
    return torch.device("cuda", local_rank)


def _tcp_url(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr  # IPv6 literal
    return f"tcp://{host}:{port}"


#: Seconds a rendezvous may run past its timeout before this process stops waiting for it:
#: torch's connection attempts end a little after the timeout (their last back-off delay).
_CONNECT_GRACE_SECONDS = 2.0


def _connect_store(
    addr: str, port: int, timeout: timedelta, rank: int, world_size: int | None = None
) -> dist.TCPStore:
    """A client of the store at ``addr:port``, connected within ``timeout``.

    torch's TCPStore client retries until the timeout while nothing listens on the port,
    but a service that accepts the connection and never answers its handshake (another
    program holding MASTER_PORT) blocks it forever. So the client is made in a daemon
    thread, which this process stops waiting for after the timeout (plus torch's last
    back-off); the thread stays blocked until that service closes the connection.
    ``world_size=None`` makes a probe that does not count as one of the world's ranks.

    Raises:
        torch.distributed.DistNetworkError: no store answered; the message names the
            address, the port and the likely cause.
    """
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["store"] = dist.TCPStore(
                addr,
                port,
                world_size,
                is_master=False,
                timeout=timeout,
                wait_for_workers=world_size is not None,
            )
        except Exception as error:  # noqa: BLE001 - raised again by the waiting thread
            result["error"] = error

    thread = threading.Thread(target=connect, name="syncsn-store-client", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds() + _CONNECT_GRACE_SECONDS)
    if "store" in result:
        return result["store"]
    what = (
        f"rank {rank} found no process group store at {addr}:{port} (MASTER_ADDR:MASTER_PORT) "
        f"within the timeout of {timeout.total_seconds():g} s"
    )
    if _accepts_connections(addr, port):
        why = (
            "something accepts connections on that port but does not answer as a "
            "torch.distributed store: another service holds it? Give all ranks a free "
            "MASTER_PORT"
        )
    else:
        why = "nothing accepts connections there: is rank 0 running, at that address?"
    cause = result.get("error")
    detail = f" (torch: {cause})" if cause is not None else ""
    raise dist.DistNetworkError(f"{what}: {why}{detail}") from cause


def _accepts_connections(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1.0):
            return True
    except OSError:
        return False


def init_distributed(
    backend: str | None = None, timeout: timedelta | float = timedelta(minutes=30)
) -> DistInfo:
    """Join the process group described by the environment and select this rank's device.

    backend: None picks "nccl" when CUDA is available, else "gloo".
    timeout: for rendezvous and for every collective (a timedelta or seconds); a rank whose
        peer died or hangs raises after it instead of waiting forever, and so does a rank
        whose MASTER_PORT is held by a service that is not rank 0's store.

    Idempotent: a second call returns the same DistInfo. A single process gets world size 1
    and no process group.
    """
    global _INFO
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if _INFO is not None and _INFO.backend is not None and not dist.is_initialized():
        _INFO = None  # the group was destroyed behind our back: form it again
    if _INFO is not None:
        if backend is not None and _INFO.backend is not None and backend != _INFO.backend:
            raise RuntimeError(
                f"init_distributed(backend={backend!r}) but the process group already uses "
                f"{_INFO.backend!r}; call cleanup() first"
            )
        return _INFO
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available; use 'gloo'")

    launch = detect_launch_env()
    device = _pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    chosen: str | None = backend or ("nccl" if device.type == "cuda" else "gloo")

    if dist.is_available() and dist.is_initialized():
        # Someone else formed the group: adopt it if it agrees with the environment.
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise LaunchEnvironmentError(
                f"a process group exists with rank {dist.get_rank()}/{dist.get_world_size()} "
                f"but the environment ({launch.launcher}) says {launch.rank}/{launch.world_size}"
            )
        chosen = str(dist.get_backend())
    elif launch.world_size > 1:
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed support")
        addr, port = launch.master_addr, launch.master_port
        if addr is None or port is None:
            raise LaunchEnvironmentError(
                f"{launch.launcher}: {launch.world_size} processes but no address of rank 0 "
                "(set MASTER_ADDR and MASTER_PORT)"
            )
        group_args: dict[str, Any] = dict(
            backend=chosen, rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
        if (
            launch.launcher == "torchrun"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        ):
            # torchrun keeps its store across worker restarts (--max-restarts), and torch's
            # env:// rendezvous does not separate the attempts, so a restarted worker can
            # read a dead peer's address and hang. Prefix the keys with the restart count.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent_store = _connect_store(
                addr, port, timeout, launch.rank, world_size=launch.world_size
            )
            store = dist.PrefixStore(f"syncsn/attempt_{attempt}/", agent_store)
            dist.init_process_group(store=store, **group_args)
        else:
            if launch.rank > 0:
                # Fails within the timeout where torch's rendezvous would wait forever.
                _connect_store(addr, port, timeout, launch.rank)
            url = "env://" if launch.launcher == "torchrun" else _tcp_url(addr, port)
            dist.init_process_group(init_method=url, **group_args)
    else:
        chosen = None

    _INFO = DistInfo(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        local_world_size=launch.local_world_size,
        device=device,
        backend=chosen,
        launcher=launch.launcher,
    )
    return _INFO


def cleanup() -> None:
    """Leave the process group (if any) so that `init_distributed` can run again."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


# ----------------------------------------------------------------------------------------
# Probe: python -m syncsn.distributed
# ----------------------------------------------------------------------------------------


def _probe(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m syncsn.distributed",
        description="Initialize the process group from the launcher's environment, "
        "all-reduce one number and print one line per rank.",
    )
    parser.add_argument("--backend", default=None, help="nccl or gloo (default: by device)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before a missing rank is an error"
    )
    args = parser.parse_args(argv)

    info = init_distributed(backend=args.backend, timeout=args.timeout)
    value = torch.tensor([float(info.rank + 1)], dtype=torch.float64, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(value)
    total = value.item()
    expected = info.world_size * (info.world_size + 1) / 2
    line = (
        f"rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
        f"backend {info.backend or 'none'} sum={total:g} host {socket.gethostname()} "
        f"device {info.device} launcher {info.launcher}\n"
    )
    # One write per line: ranks sharing a pipe (torchrun, srun) must not interleave within
    # it, and print() writes the newline separately when stdout is unbuffered.
    sys.stdout.write(line)
    sys.stdout.flush()
    cleanup()
    if total != expected:
        print(f"rank {info.rank}: sum={total:g}, expected {expected:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_probe())
