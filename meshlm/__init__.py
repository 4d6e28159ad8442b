"""meshlm: one large language model across many devices and machines."""

from typing import Any

from meshlm.config import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """LLM and RequestOutput load on first use, so torch-free parts (meshlm.plan) import without torch."""
    if name == "LLM":
        from meshlm.llm import LLM

        return LLM
    if name == "RequestOutput":
        from meshlm.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'meshlm' has no attribute {name!r}")
