"""Optional CPU kernels built from source at first use; each falls back to plain PyTorch."""

from meshlm.kernels.fused import apply_rope, rms_norm
from meshlm.kernels.gemv import Embedding, Linear, embed, enabled, kernel, linear, linear_many, pack_linears

__all__ = ["Embedding", "Linear", "apply_rope", "embed", "enabled", "kernel", "linear", "linear_many", "pack_linears",
           "rms_norm"]
