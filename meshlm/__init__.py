"""meshlm: one large language model across many devices and machines."""

from meshlm.config import SamplingParams
from meshlm.engine.request import RequestOutput
from meshlm.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
