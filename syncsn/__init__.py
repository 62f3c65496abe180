"""Synchronized Switchable, Sparse Switchable and Batch Normalization for PyTorch."""

from . import _torch_compat
from .batchnorm import SyncBatchNorm
from .comm import create_sync_groups, name_sync_layers
from .convert import (
    convert_switchnorm,
    convert_sync_batchnorm,
    convert_sync_switchnorm,
    revert_sync,
)
from .inspect import format_switch_weights, switch_weights
from .norm_act import (
    BatchNormAct2d,
    SparseSwitchNormAct2d,
    SwitchNormAct2d,
    SyncBatchNormAct,
    SyncSparseSwitchNormAct2d,
    SyncSwitchNormAct2d,
)
from .optim import param_groups
from .recalibration import recalibrate
from .registry import build_named_norm_layer, build_norm_layer, register_norm
from .sparse_switchnorm import (
    RadiusSchedule,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    SyncSparseSwitchNorm1d,
    SyncSparseSwitchNorm2d,
    SyncSparseSwitchNorm3d,
    set_radius,
)
from .sparsemax import is_one_hot, sparsemax, sparsestmax
from .switchnorm import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SyncSwitchNorm1d,
    SyncSwitchNorm2d,
    SyncSwitchNorm3d,
)

# torch's SyncBatchNorm converter keeps syncsn's layers, and DistributedDataParallel accepts
# syncsn's SyncBatchNorm on CPU (see syncsn/_torch_compat.py).
_torch_compat.install()

__version__ = "0.1.0"

__all__ = [
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncSwitchNorm1d",
    "SyncSwitchNorm2d",
    "SyncSwitchNorm3d",
    "SyncBatchNorm",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "SyncSparseSwitchNorm1d",
    "SyncSparseSwitchNorm2d",
    "SyncSparseSwitchNorm3d",
    "BatchNormAct2d",
    "SyncBatchNormAct",
    "SwitchNormAct2d",
    "SyncSwitchNormAct2d",
    "SparseSwitchNormAct2d",
    "SyncSparseSwitchNormAct2d",
    "set_radius",
    "RadiusSchedule",
    "create_sync_groups",
    "name_sync_layers",
    "sparsemax",
    "sparsestmax",
    "is_one_hot",
    "param_groups",
    "convert_sync_switchnorm",
    "convert_switchnorm",
    "convert_sync_batchnorm",
    "revert_sync",
    "build_norm_layer",
    "build_named_norm_layer",
    "register_norm",
    "recalibrate",
    "switch_weights",
    "format_switch_weights",
]
