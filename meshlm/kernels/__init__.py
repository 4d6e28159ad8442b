"""Optional CPU kernels built from source at first use; each falls back to plain PyTorch."""

from meshlm.kernels.embedding import Embedding, embedding
from meshlm.kernels.fused import apply_rope, rms_norm
from meshlm.kernels.gemv import MAX_M, Linear, enabled, kernel, linear, linear_many

__all__ = ["MAX_M", "Embedding", "Linear", "apply_rope", "embedding", "enabled", "kernel", "linear", "linear_many",
           "rms_norm"]
