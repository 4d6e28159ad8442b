"""Optional CPU kernels built from source at first use; each falls back to plain PyTorch."""

from meshlm.kernels.gemv import MAX_M, enabled, kernel, linear

__all__ = ["MAX_M", "enabled", "kernel", "linear"]
