"""mmserve generator: the paged-KV engine, the offline `LLM` API and the gRPC service around them."""

from generator_service.engine.sampling_params import SamplingParams
from generator_service.llm import LLM, CompletionOutput

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]
