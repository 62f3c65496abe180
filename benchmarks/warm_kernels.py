"""Compile the Triton kernels a benchmark run will need, in parallel, before it starts.

Triton compiles a kernel the first time it meets a new combination of tile sizes, dtypes and
argument properties, about a second each, one after the other in one process: a
benchmark over many shapes would spend minutes compiling. This runs one training
forward+backward of every layer on every configuration, a process per configuration, so
that the kernels land in Triton's on-disk cache and the benchmark only loads them.

    python benchmarks/warm_kernels.py --shapes 8,64,56,56 2,256,200,304 \\
        --dtypes float32 bfloat16 --layouts contiguous channels_last
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DTYPES, LAYOUTS, parse_shape  # noqa: E402


def warm(shape: tuple[int, ...], dtype: str, layout: str) -> str:
    import torch

    import syncsn
    from syncsn.sparse_switchnorm import SparseSwitchNorm2d

    t0 = time.perf_counter()
    c = shape[1]
    x = torch.randn(shape, device="cuda", dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    dy = torch.randn_like(x)
    for layer in (
        syncsn.SwitchNorm2d(c),
        syncsn.SyncBatchNorm(c),
        SparseSwitchNorm2d(c),
    ):
        layer.cuda().train()(x).backward(dy)
    torch.cuda.synchronize()
    return f"{shape} {dtype} {layout}: {time.perf_counter() - t0:.1f}s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", required=True)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    opts = p.parse_args(argv)
    configs = list(itertools.product(map(parse_shape, opts.shapes), opts.dtypes, opts.layouts))
    t0 = time.perf_counter()
    failures = 0
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=opts.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(warm, *cfg) for cfg in configs]
        for done, future in enumerate(as_completed(futures), 1):
            try:
                line = future.result()
            except Exception as error:  # noqa: BLE001 - report each configuration
                failures += 1
                line = f"FAILED: {type(error).__name__}: {error}"
            print(f"[{done}/{len(configs)} {time.perf_counter() - t0:.0f}s] {line}", flush=True)
    print(f"{len(configs) - failures}/{len(configs)} configurations warmed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
