"""Reading small device values on the host without stalling the device.

A training step on a GPU must not wait for the GPU: ``.item()``, ``bool(tensor)`` or
``.cpu()`` on a CUDA tensor block the host until every queued kernel has run. The checks that
need a device value (a global batch of one sample, non-finite statistics, which SSN scopes
have frozen) read it through :class:`DeferredRead` instead: the value is copied to pinned host
memory asynchronously, and the host looks at it one call later, after waiting on the event
recorded with the copy, which by then has normally long passed. Every rank of a group makes
the same calls, so every rank takes the decision at the same step.

On CPU the copy is synchronous, so the value is available at once and decisions are not
delayed. Either way no ``aten._local_scalar_dense`` (the op behind ``.item()``) runs on the
device tensor: the host reads its own staging buffer (``Tensor.tolist`` reads a CPU tensor's
memory without dispatching an op, a fraction of a microsecond). On the meta device (shape
inference, deferred initialization) there is no value: nothing is read, nothing is ever due.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeferredRead"]


class DeferredRead:
    """The host's view of a small device tensor, one call late on CUDA, at once on CPU.

    Example::

        reader = DeferredRead()
        due = reader.publish(flags)  # CPU: flags' value now; CUDA: the previous call's value
        if due:
            ...
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event] | None = None

    def publish(self, value: Tensor) -> Any | None:
        """Start reading ``value``; return the value that is due now as Python numbers (as
        ``Tensor.tolist`` gives them), None when nothing is due yet."""
        if value.is_cpu:
            return value.tolist()
        if value.is_meta:
            return None
        if value.device.type != "cuda":
            return value.cpu().tolist()
        if torch.cuda.is_current_stream_capturing():
            # A CUDA graph replays the copy but not this Python code: nothing to read later.
            return None
        due = self.collect()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        return due

    def collect(self) -> Any | None:
        """The value of the last :meth:`publish` on CUDA, waiting for its copy; None if none
        (and while a CUDA graph is being captured, when waiting is not allowed: it stays due).

        A caller may collect before it publishes again, to act on the previous value before
        the work of this call (a layer raises its previous step's error before it folds
        anything)."""
        if self._pending is None or torch.cuda.is_current_stream_capturing():
            return None
        host, event = self._pending
        self._pending = None
        event.synchronize()
        return host.tolist()
