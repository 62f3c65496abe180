import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton backend's kernels run in Triton's interpreter
# (tests/test_triton.py). The variable must be set before anything imports Triton, and is
# inherited by the worker processes the distributed tests start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from dist_world import DistWorld  # noqa: E402


def pytest_sessionstart(session):
    """Build (or load) the CPU extension once, before any test spawns worker processes that
    would otherwise each wait for the build inside a timed case."""
    from syncsn import _native

    _native.kernels()


@pytest.fixture(scope="module")
def world():
    """Four gloo ranks for the whole module; ``subgroup(k)`` gives worlds of 1 to 4."""
    w = DistWorld(4)
    yield w
    w.close()
