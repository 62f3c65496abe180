"""Communication for the synchronized layers: process groups and the one collective per pass.

Every collective a Sync layer makes goes through this module, so a reader can see at a glance
what crosses the wire: one ``all_gather`` of a fixed-size statistics buffer in the forward
pass and one ``all_reduce`` of ``2 * C`` values in the backward pass.
"""

from __future__ import annotations

import itertools
import os
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "group_size",
    "all_gather_stacked",
    "all_reduce_sum_",
    "create_sync_groups",
    "debug_enabled",
    "check_same_layer",
    "next_layer_id",
    "name_sync_layers",
]

# torch renamed all_gather_into_tensor to all_gather_single; keep working on both.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_layer_ids = itertools.count()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks a Sync layer synchronizes over; 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_gather_stacked(buffer: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Gather a 1-D ``buffer`` (K,) from every rank into a (world, K) tensor, rank order.

    With a group of one rank this is ``buffer[None]`` and nothing is communicated.
    """
    world = group_size(group)
    if world == 1:
        return buffer.unsqueeze(0)
    out = buffer.new_empty(world * buffer.numel())
    _all_gather_flat(out, buffer.contiguous(), group=group)
    return out.view(world, buffer.numel())


def all_reduce_sum_(buffer: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``buffer`` over the group in place (no-op for a group of one rank)."""
    if group_size(group) > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


def create_sync_groups(group_size: int) -> dist.ProcessGroup:
    """Split the world into groups of ``group_size`` consecutive ranks; return this rank's.

    Must be called by every rank (creating a group is itself a collective). Typical use:
    synchronize normalization within a node of 8 GPUs, ``create_sync_groups(8)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "create_sync_groups needs an initialized process group; call "
            "syncsn.distributed.init_distributed() (or torch.distributed.init_process_group) first"
        )
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"group_size must be a positive divisor of the world size {world}, got {group_size}"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    assert mine is not None
    return mine


def debug_enabled() -> bool:
    """True when ``SYNCSN_DEBUG=1``: Sync layers then cross-check their identity across ranks."""
    return os.environ.get("SYNCSN_DEBUG", "0") not in ("", "0")


def next_layer_id() -> int:
    """Creation number of a Sync layer in this process (its identity for SYNCSN_DEBUG)."""
    return next(_layer_ids)


def name_sync_layers(model: torch.nn.Module, prefix: str = "") -> torch.nn.Module:
    """Give every Sync layer in ``model`` its qualified name as identity for SYNCSN_DEBUG.

    Unnamed layers are identified by their creation number, which differs between ranks when
    one rank built extra Sync layers (an evaluation copy of the model, say). The converters
    name the layers of the model they return.
    """
    for name, module in model.named_modules(prefix=prefix):
        if hasattr(module, "_sync_id"):
            module.sync_name = name or type(module).__name__
    return model


def check_same_layer(
    description: str, identity: int | str, group: dist.ProcessGroup | None, device: torch.device
) -> None:
    """Raise on every rank when the ranks are not running the same layer.

    Costs one extra small collective, so it runs only with ``SYNCSN_DEBUG=1``. Without it, a
    layer with a different channel count on one rank hangs or fails inside the statistics
    collective, and layers called in a different order silently mix statistics. A layer is
    identified by its description and its name (see :func:`name_sync_layers`) or, unnamed,
    its creation number.
    """
    if group_size(group) == 1:
        return
    layer = (
        f"{description} '{identity}'" if isinstance(identity, str) else f"{description} #{identity}"
    )
    fingerprint = zlib.crc32(layer.encode())
    # Two halves so the 32-bit checksum is exact in float64 on every backend.
    mine = torch.tensor(
        [fingerprint >> 16, fingerprint & 0xFFFF], dtype=torch.float64, device=device
    )
    everyone = all_gather_stacked(mine, group)
    if not bool((everyone == mine).all()):
        prints = [int(a) << 16 | int(b) for a, b in everyone.tolist()]
        raise RuntimeError(
            f"SYNCSN_DEBUG: ranks disagree on the layer being synchronized. This rank "
            f"({dist.get_rank()}) runs {layer}; layer fingerprints per rank: {prints}. Every "
            "rank of the process group must call the same Sync layers in the same order with "
            "the same num_features. (Unnamed layers are told apart by creation number '#k'; "
            "if ranks build different numbers of Sync layers, name them with "
            "syncsn.name_sync_layers(model).)"
        )
