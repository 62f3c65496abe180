"""Import torchvision, timm, mmseg and mmdet model code where their compiled ops cannot load.

The tests and ``examples/convert_zoo.py`` convert real model code from these packages. Their
models are pure Python, but importing the packages also loads compiled operators that a
CPU-only install may not be able to load:

- torchvision's PyPI wheel is linked against CUDA torch. Next to a CPU torch its ``_C``
  extension fails to load, so its operators (``torch.ops.torchvision.*``: nms, roi_align,
  deform_conv2d, ...) do not exist, and ``import torchvision`` then raises in
  ``torchvision._meta_registrations`` ("operator torchvision::nms does not exist"), which
  registers fake kernels for those operators, as ``torchvision._autograd_registrations``
  registers autograd formulas. timm imports torchvision, so it fails the same way.
- mmsegmentation and mmdet import names from ``mmcv.ops``, whose package needs mmcv's
  compiled ``mmcv._ext``, which mmcv-lite does not have.

:func:`install` (idempotent) works around exactly this, and only where it is needed:

- torchvision, when its ``_C`` does not load: the two registration modules above are
  replaced by empty modules (there is nothing to register: the operators do not exist), and
  ``torchvision.ops.nms`` (also what ``batched_nms`` calls) by :func:`reference_nms`, a
  greedy NMS in plain torch with the same contract, since Mask R-CNN's region proposal
  network needs it while training. ``roi_align``, the other operator Mask R-CNN uses, already
  falls back to torchvision's own pure-torch implementation without ``_C``; that function is
  run eagerly instead of compiled on first use (inductor takes about 15 s in each process;
  eager samples every pixel of a box's bins, so keep images and box counts small).
  Any other torchvision operator still raises torchvision's "Couldn't load custom C++ ops"
  error.
- mmcv, when ``mmcv._ext`` is missing: ``mmcv.ops`` and its submodules become stub modules
  whose every attribute is a placeholder class (so that ``from mmcv.ops import X`` and
  ``class Y(X)`` at import time work); creating or calling one raises a RuntimeError naming
  the operator. None of them is used by the models converted here (ResNet backbones,
  FCN/ASPP/PSP heads), and any use fails loudly.

With packages whose compiled ops load (a matching CUDA torch, a full mmcv), :func:`install`
changes nothing. This module is test and example tooling only: syncsn never imports it, nor
any of these packages.

Example::

    import thirdparty

    torchvision = thirdparty.import_module("torchvision")   # or: thirdparty.install(); import ...
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import torch
from torch import Tensor, nn

__all__ = ["install", "import_module", "reference_nms", "STUBBED"]

# What install() replaced, for messages and reports: {"torchvision": "...", "mmcv.ops": "..."}.
STUBBED: dict[str, str] = {}

_TORCHVISION_REGISTRATIONS = (
    "torchvision._meta_registrations",
    "torchvision._autograd_registrations",
)


def install() -> dict[str, str]:
    """Make torchvision/timm and mmseg/mmdet importable here; returns :data:`STUBBED`.

    Must run before torchvision (or timm) and mmcv.ops are first imported. Idempotent.
    """
    _install_torchvision()
    _install_mmcv_ops()
    return STUBBED


def import_module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)`` after :func:`install`."""
    install()
    return importlib.import_module(name)


# --- torchvision ---------------------------------------------------------------------------


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled operators load next to this torch (loads them if so)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to work around, the import fails as usual
    package_dir = next(iter(spec.submodule_search_locations))
    finder = importlib.machinery.FileFinder(
        package_dir,
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    ext = finder.find_spec("_C")
    if ext is None or ext.origin is None:
        return False
    try:
        torch.ops.load_library(ext.origin)
    except (OSError, RuntimeError):
        return False
    return True


def _install_torchvision() -> None:
    if "torchvision" in STUBBED or "torchvision.ops" in sys.modules:
        return
    if _torchvision_ops_load():
        return
    if "torchvision" in sys.modules:
        raise RuntimeError(
            "thirdparty.install() must run before torchvision (or timm) is first imported; "
            "torchvision is already (partly) imported and its C++ ops do not load here"
        )
    for name in _TORCHVISION_REGISTRATIONS:
        sys.modules[name] = types.ModuleType(name, "empty: torchvision's C++ ops are not loaded")
    import torchvision.ops
    import torchvision.ops.boxes
    import torchvision.ops.roi_align

    torchvision.ops.boxes.nms = reference_nms
    torchvision.ops.nms = reference_nms
    # torchvision compiles its Python roi_align with inductor on the first call (about 15 s
    # in every process); eager is the same computation.
    roi_align = sys.modules["torchvision.ops.roi_align"]  # the attribute is the function
    roi_align._roi_align = getattr(roi_align._roi_align, "__wrapped__", roi_align._roi_align)
    STUBBED["torchvision"] = (
        "C++ ops not loaded (wheel built for another torch); fake/autograd registrations "
        "skipped, nms in plain torch, roi_align in torchvision's own Python fallback"
    )


def reference_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, the contract of ``torchvision.ops.nms``.

    Args:
        boxes: (N, 4) boxes as (x1, y1, x2, y2).
        scores: (N,) scores.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box exceeds it.

    Returns:
        int64 (K,) indices of the kept boxes, in decreasing order of score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu()
    keep = torch.ones(len(b), dtype=torch.bool)
    for i in range(len(b)):
        if keep[i]:
            keep[i + 1 :] &= ~overlaps[i, i + 1 :]
    return order[keep.to(order.device)]


# --- mmcv.ops ------------------------------------------------------------------------------


class _UnavailableOp(nn.Module):
    """Base of the placeholders for mmcv's compiled operators (see the module docstring)."""

    _op_name = "mmcv.ops"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{self._op_name} is one of mmcv's compiled operators, which mmcv-lite does not "
            "have; tests/thirdparty.py stubs it only so that mmseg and mmdet import"
        )


class _StubOps(types.ModuleType):
    """``mmcv.ops`` or one of its submodules: every public attribute is a placeholder."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "stub: mmcv's compiled ops are not installed (mmcv-lite)")
        self.__path__: list[str] = []  # a package, so that mmcv.ops.<submodule> imports
        self.__file__ = __file__

    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        placeholder = type(attr, (_UnavailableOp,), {"_op_name": f"{self.__name__}.{attr}"})
        setattr(self, attr, placeholder)
        return placeholder


class _StubOpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``mmcv.ops`` and ``mmcv.ops.*`` to :class:`_StubOps` modules."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return _StubOps(spec.name)

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        pass


def _install_mmcv_ops() -> None:
    if "mmcv.ops" in STUBBED:
        return
    if (
        importlib.util.find_spec("mmcv") is None
        or importlib.util.find_spec("mmcv._ext") is not None
    ):
        return  # not installed, or the full mmcv with its compiled ops
    if any(name == "mmcv.ops" or name.startswith("mmcv.ops.") for name in sys.modules):
        raise RuntimeError("thirdparty.install() must run before mmcv.ops is first imported")
    sys.meta_path.insert(0, _StubOpsFinder())
    STUBBED["mmcv.ops"] = "mmcv without its compiled ops (mmcv-lite): placeholders that raise"
