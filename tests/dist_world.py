"""A world of gloo processes, started once per test module, that runs many cases.

Starting a process with torch takes seconds, so a module starts one world (4 ranks by
default) and sends it test functions. Smaller worlds are subgroups of it: ``subgroup(k)`` is
the group of the first k ranks, so one world serves world sizes 1 to 4.

A case is a module-level function ``fn(rank, *args)`` (pickled by reference, so it must live
in an importable module such as the test file itself); every rank runs it and the parent
gets the list of per-rank return values. An exception on any rank fails the case with that
rank's traceback; a case that does not finish in time fails with TimeoutError, and the
world is restarted for the next case, so a hang fails a test instead of the whole run.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections import Counter
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_groups: dict[int, dist.ProcessGroup] = {}


def subgroup(k: int) -> dist.ProcessGroup:
    """The process group of ranks 0..k-1 (only meaningful on those ranks)."""
    return _groups[k]


def count_collectives(fn) -> Counter:
    """Run ``fn()`` and count the gloo collectives it made, by the profiler's ``gloo:`` events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("gloo:"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    for k in range(1, world_size + 1):
        _groups[k] = dist.new_group(list(range(k)))
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            value = fn(rank, *args)
            # Pickle here, not in the queue's feeder thread, so a failure reaches the parent.
            ForkingPickler.dumps(value)
            results.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - the traceback goes to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistWorld:
    def __init__(self, world_size: int = 4, startup_timeout: float = 180.0) -> None:
        self.world_size = world_size
        self.startup_timeout = startup_timeout
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, self.world_size, port, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        # Start-up (importing torch, forming the group) is slow on a busy machine and is not
        # part of any case's time limit.
        for _ in range(self.world_size):
            try:
                self._results.get(timeout=self.startup_timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(
                    f"the {self.world_size}-rank gloo world did not start within "
                    f"{self.startup_timeout}s"
                ) from None

    def run(self, fn, *args, timeout: float = 60.0) -> list:
        """Run ``fn(rank, *args)`` on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, object] = {}
        errors = []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self._results.get(timeout=timeout)
                if ok:
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            self.close()
            missing = sorted(set(range(self.world_size)) - set(out))
            raise TimeoutError(
                f"{fn.__name__} did not finish within {timeout}s on ranks {missing}"
                + ("".join("\n" + e for e in errors))
            ) from None
        if errors:
            # Ranks that failed may have left the others inside a collective: start afresh.
            self.close()
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
