"""Synchronized Switchable, Sparse Switchable and Batch Normalization for PyTorch."""

__version__ = "0.1.0"
