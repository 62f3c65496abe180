"""Kernel backends of the normalization layers and how one is chosen.

``SYNCSN_BACKEND`` selects the backend that runs the full-size passes:

* ``auto`` (default): the fastest available for the tensor's device: ``cpp`` on CPU,
  ``triton`` on CUDA, else ``torch``;
* ``torch``: the reference backend (plain torch operations, any device);
* ``cpp``: the fused C++ CPU kernels;
* ``triton``: the Triton kernels, on CUDA tensors, or on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1``).

``SYNCSN_NATIVE=0`` (also ``false``, ``no``, ``off``; the older name) means ``torch`` where
``SYNCSN_BACKEND`` is not set. The values of both are case-insensitive; any other value is an
error at the first layer call. A backend that does not cover a call (a layout it has no
kernel for, an empty batch) hands that call to the reference backend.

The merge of the gathered statistics and the running-statistics update decide what every
rank must agree on bitwise, so they are not chosen per call but per device type
(:func:`shared_backend`): ranks on the same device type compute them alike whatever backend
runs their passes. On CPU that is the C++ merge when the kernels are built (it follows the
reference's order of operations and gives the same bits), on CUDA the Triton one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .. import _env, _native
from .interface import Backend
from .reference import ReferenceBackend

__all__ = ["Backend", "NAMES", "get", "requested", "passes_backend", "shared_backend"]


def _cpp() -> Backend:
    from .cpp import CppBackend

    return CppBackend()


def _triton() -> Backend:
    from .triton import TritonBackend

    return TritonBackend()


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "torch": ReferenceBackend,
    "cpp": _cpp,
    "triton": _triton,
}
NAMES = ("auto", *_FACTORIES)
# The fused backend of each device type: the default of its passes and its shared steps.
_BY_DEVICE = {"cpu": "cpp", "cuda": "triton"}
_instances: dict[str, Backend] = {}

REFERENCE = ReferenceBackend()
_instances["torch"] = REFERENCE


def get(name: str) -> Backend:
    """The backend called ``name`` (created on first use)."""
    backend = _instances.get(name)
    if backend is None:
        backend = _instances[name] = _FACTORIES[name]()
    return backend


def requested() -> str:
    """The backend asked for by the environment: ``SYNCSN_BACKEND``, else ``SYNCSN_NATIVE``."""
    return _parse_request(_env.get("SYNCSN_BACKEND"), _env.get("SYNCSN_NATIVE"))


@functools.lru_cache(maxsize=16)
def _parse_request(backend: str | None, native: str | None) -> str:
    native_on = _native.parse_native(native)  # checked even where SYNCSN_BACKEND decides
    name = (backend or "").strip().lower()
    if not name:
        return "auto" if native_on else "torch"
    if name not in NAMES:
        raise ValueError(
            f"SYNCSN_BACKEND={backend!r} is not a backend: set it to one of "
            f"{', '.join(NAMES)} (case-insensitive)"
        )
    return name


def passes_backend(x: Tensor, *params: Tensor | None) -> Backend:
    """The backend that runs the full-size passes over ``x`` with these parameters."""
    backend = _chosen(requested(), "cpu" if x.is_cpu else x.device.type)
    return backend if backend.covers(x, *params) else REFERENCE


def _chosen(name: str, device_type: str) -> Backend:
    """The backend ``name`` asks for on this device type (auto: the device's fused backend
    where it is available, else the reference); RuntimeError when a backend that was named
    is not available."""
    if name == "auto":
        candidate = _BY_DEVICE.get(device_type)
        if candidate is None:
            return REFERENCE
        backend = get(candidate)
        return backend if backend.available() else REFERENCE
    backend = get(name)
    if not backend.available():
        raise RuntimeError(
            f"SYNCSN_BACKEND={name}: the {name} backend is not available in this process "
            f"({backend.unavailable_reason()}); use SYNCSN_BACKEND=auto or torch"
        )
    return backend


def shared_backend(device_type: str) -> Backend:
    """The backend of the steps every rank must compute alike, for this device type."""
    shared = _BY_DEVICE.get(device_type)
    if shared is not None:
        backend = get(shared)
        if backend.available():
            return backend
    return REFERENCE
