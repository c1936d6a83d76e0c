"""The engine core: requests in, tokens out, many sequences batched per step."""

from .async_engine import AsyncEngine
from .engine import EngineConfig, LLMEngine, RequestRejected, default_kv_cache_bytes
from .request import FinishReason, GenerationRequest, SamplingParams, TokenEvent

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "FinishReason",
    "GenerationRequest",
    "LLMEngine",
    "RequestRejected",
    "default_kv_cache_bytes",
    "SamplingParams",
    "TokenEvent",
]
