"""Optional CPU kernels built from source at first use; each falls back to plain PyTorch."""

from meshlm.kernels.fused import add_rms_norm, apply_rope, rms_norm, rope_store, silu_mul
from meshlm.kernels.gemv import Embedding, Linear, embed, enabled, kernel, linear, linear_many, pack_linears

__all__ = ["Embedding", "Linear", "add_rms_norm", "apply_rope", "embed", "enabled", "kernel", "linear", "linear_many",
           "pack_linears", "rms_norm", "rope_store", "silu_mul"]
