"""mmserve generator: the paged-KV engine, the offline `LLM` API and the gRPC service around them."""

from generator_service.engine.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
