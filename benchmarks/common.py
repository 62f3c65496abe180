"""Helpers shared by the benchmark scripts: the process world, timing, memory and
communication accounting, and table output.

The scripts start one world of processes (gloo on CPU, NCCL on CUDA) and run every
configuration inside it; smaller world sizes are subgroups of its first ranks, so one start
serves world sizes 1, 2 and 4. Ranks outside the current subgroup wait at a barrier.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: make `import syncsn` work
    sys.path.insert(0, str(REPO))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# Element sizes of the dtype names the profiler records for a collective's input.
_PROFILER_DTYPE_BYTES = {
    "double": 8,
    "float": 4,
    "c10::Half": 2,
    "c10::BFloat16": 2,
    "long int": 8,
    "int": 4,
}


# --------------------------------------------------------------------------------------
# The process world
# --------------------------------------------------------------------------------------


@dataclass
class Rank:
    """What a benchmark body gets on each rank."""

    rank: int
    world_size: int  # of the whole world; the benchmarks use subgroups of it
    device: torch.device
    groups: dict[int, dist.ProcessGroup] = field(default_factory=dict)

    def group(self, k: int) -> dist.ProcessGroup:
        """The process group of ranks 0..k-1 (only meaningful on those ranks)."""
        return self.groups[k]

    def barrier(self) -> None:
        """All ranks of the world; works on gloo and NCCL alike."""
        sync_group(None, self.device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, device: str, body, args) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # Ranks outside a subgroup wait at a barrier for as long as the others benchmark.
        timeout=timedelta(hours=4),
        **({"device_id": dev} if device == "cuda" else {}),
    )
    ctx = Rank(rank, world_size, dev)
    for k in range(1, world_size + 1):
        ctx.groups[k] = dist.new_group(list(range(k)))
    try:
        body(ctx, *args)
    finally:
        dist.destroy_process_group()


def run_world(world_size: int, device: str, body: Callable, *args) -> None:
    """Run ``body(Rank, *args)`` on ``world_size`` fresh processes, one thread each.

    ``body`` must be a module-level function (it is pickled by reference). Results travel
    back through files the body writes (see :func:`save_result`).
    """
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available to this torch build")
        if world_size > torch.cuda.device_count():
            raise SystemExit(
                f"--device cuda runs one rank per GPU: world size {world_size} needs "
                f"{world_size} GPUs, this machine has {torch.cuda.device_count()}"
            )
    port = _free_port()
    mp.start_processes(
        _rank_main,
        args=(world_size, port, device, body, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


def sync_group(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """A barrier for ``group`` that also drains the GPU, so a timed region starts together."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_group(values: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Elementwise maximum over the ranks of ``group``: a step lasts as long as its slowest rank."""
    values = values.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class PhaseClock:
    """Timestamps inside one step: host clock on CPU, CUDA events on a GPU.

    ``mark()`` at the start and after each phase; ``durations()`` gives seconds per phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def interleaved_rounds(
    names: Sequence[str],
    warmup: int,
    repeat: int,
    step: Callable[[str], list[float]],
    before: Callable[[], None] = lambda: None,
) -> dict[str, list[list[float]]]:
    """Time ``step(name)`` for every candidate, candidates interleaved in rounds.

    Each round runs every candidate once, in an order rotated by one per round, so slow
    phases of a noisy machine hit all candidates alike instead of one of them. ``step``
    returns its phase durations; ``before()`` runs untimed before each step (a barrier).
    The first ``warmup`` rounds are discarded. Returns name -> list of per-step durations.
    """
    out: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(warmup + repeat):
        k = r % len(names)
        for name in list(names[k:]) + list(names[:k]):
            before()
            phases = step(name)
            if r >= warmup:
                out[name].append(phases)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------
# Memory and communication accounting
# --------------------------------------------------------------------------------------


@contextmanager
def saved_bytes_counter():
    """Count the bytes autograd saves for backward inside the block, each storage once.

    Yields a dict whose ``"bytes"`` entry holds the total after the block. A view saved
    several times (x, x reshaped) and a tensor saved by several ops count once.
    """
    seen: dict[tuple, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


@contextmanager
def quiet_profiler():
    """Silence the lines the profiler's C++ backend prints to stderr at every start and stop
    (hundreds in a long run). Python exceptions still propagate as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class Collectives:
    """Collectives seen by the profiler in one phase, with the bytes of their results."""

    count: int = 0
    bytes: int = 0
    names: list[str] = field(default_factory=list)


def profile_collectives(fn: Callable[[], object], group_size: int) -> tuple[object, Collectives]:
    """Run ``fn()`` under the profiler and account for its ``gloo:``/``nccl:`` collectives.

    Bytes are those of each collective's result buffer on one rank, from the recorded input
    shapes: an all_gather of K elements gives ``group_size * K``, an all_reduce gives K.
    """
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        value = fn()
    found = Collectives()
    for event in prof.events():
        if not event.name.startswith(("gloo:", "nccl:")):
            continue
        found.count += 1
        found.names.append(event.name)
        shapes = event.input_shapes or []
        dtypes = getattr(event, "input_dtypes", None) or []
        for shape, dtype in zip(shapes, dtypes, strict=False):
            if not shape:
                continue
            numel = 1
            for d in shape:
                numel *= d
            size = _PROFILER_DTYPE_BYTES.get(dtype, 0)
            factor = group_size if "gather" in event.name else 1
            found.bytes += numel * size * factor
    return value, found


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{os.cpu_count()}-core CPU ({cpu})"
    if device == "cuda" and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return desc


def run_metadata(device: str) -> dict:
    return {
        "date": _dt.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "threads_per_rank": 1,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub pipe table, padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}", flush=True)


def write_text(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", flush=True)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def progress(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def parse_shape(text: str) -> tuple[int, ...]:
    """'8,64,56,56' or '8x64x56x56' -> (8, 64, 56, 56)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise SystemExit(f"--shapes: expected N,C,H,W (e.g. 8,64,56,56), got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--shapes: expected four positive sizes N,C,H,W, got {text!r}")
    return shape
