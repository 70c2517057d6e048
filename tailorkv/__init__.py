"""tailorkv: long-context LLM serving with the TailorKV hybrid KV cache."""

from .engine.engine import Engine
from .engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams"]
__version__ = "0.1.0"
