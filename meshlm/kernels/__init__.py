"""Optional CPU kernels built from source at first use; each falls back to plain PyTorch."""

from meshlm.kernels.fused import add_rms_norm, apply_rope, rms_norm, rope_store, silu_mul
from meshlm.kernels.gemv import MAX_M, Linear, enabled, kernel, linear, linear_many

__all__ = ["MAX_M", "Linear", "add_rms_norm", "apply_rope", "enabled", "kernel", "linear", "linear_many", "rms_norm",
           "rope_store", "silu_mul"]
