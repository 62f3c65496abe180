"""Synchronized Switchable, Sparse Switchable and Batch Normalization for PyTorch."""

from .batchnorm import SyncBatchNorm
from .comm import create_sync_groups, name_sync_layers
from .optim import param_groups
from .sparsemax import is_one_hot, sparsemax, sparsestmax
from .switchnorm import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SyncSwitchNorm1d,
    SyncSwitchNorm2d,
    SyncSwitchNorm3d,
)

__version__ = "0.1.0"

__all__ = [
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncSwitchNorm1d",
    "SyncSwitchNorm2d",
    "SyncSwitchNorm3d",
    "SyncBatchNorm",
    "create_sync_groups",
    "name_sync_layers",
    "sparsemax",
    "sparsestmax",
    "is_one_hot",
    "param_groups",
]
