"""The offline API: the encoder and the engine in one process, no network (like vLLM's `LLM.generate`).

    from generator_service import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")
    outputs = llm.generate(
        [{"prompt": "USER: <image>\\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": pil_image}}],
        SamplingParams(max_tokens=32, temperature=0),
    )
    print(outputs[0].text, outputs[0].token_ids)

Images may be PIL images, encoded file bytes or file paths. They take the services' own image path
(`common.images.provider.EmbeddingProvider`: an LRU in front of an in-process `LocalEncoder`), run on a private
event-loop thread, so file bytes hash to the same key as over gRPC, a repeated image is encoded once and hits the
KV prefix cache, and the images of all prompts of one call share forward passes.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from common.config import EngineConfig, MiB, ModelConfig, default_of
from common.host_memory import tune_malloc_for_tensors
from common.images.cache import LocalEmbeddingCache
from common.images.local_encoder import LocalEncoder
from common.images.provider import CacheLayer, EmbeddingProvider, ImageSource, ResolvedImage
from common.images.vision_encoder import VisionEncoder
from generator_service.engine.llm_engine import EngineRequest, LLMEngine, Usage
from generator_service.engine.sampler import TokenLogprobs
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor

ImageLike = Image.Image | bytes | str | Path
PromptLike = str | Mapping[str, Any]
_T = TypeVar("_T")


@dataclass(frozen=True)
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None
    usage: Usage
    logprobs: list[TokenLogprobs]


class LLM:
    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        revision: str | None = None,
        block_size: int = default_of(EngineConfig, "block_size"),
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float | None = None,
        gpu_memory_utilization: float = default_of(EngineConfig, "gpu_memory_utilization"),
        max_num_seqs: int = default_of(EngineConfig, "max_num_seqs"),
        max_num_batched_tokens: int = default_of(EngineConfig, "max_num_batched_tokens"),
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        image_cache_bytes: int = 512 * MiB,
        enforce_eager: bool | None = None,
    ) -> None:
        """`enforce_eager`: None (the default) compiles the language model's layers on CUDA and runs eagerly on
        CPU; False compiles on any device; True never (common/compilation.py; results are bit-identical to eager).
        Compilation happens here, in a warm-up generation. On the CPU this tunes the process's malloc for tensor work
        (common/host_memory.py; MMSERVE_MALLOC_TUNING=0 turns it off)."""
        self.model_config = ModelConfig(
            model=model, device=device, dtype=dtype, revision=revision, enforce_eager=enforce_eager
        )
        if torch.device(self.model_config.device).type == "cpu":  # after the config has checked the device
            tune_malloc_for_tensors()
        self.config = EngineConfig(
            model=self.model_config,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_gib=kv_cache_memory_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.engine = LLMEngine.from_config(self.config)
        self.engine.warm_up()
        self.inputs = InputProcessor(self.engine.processor, self.engine.family)
        self._image_cache_bytes = image_cache_bytes
        self._images: _ImagePath | None = None
        self._ids = itertools.count()

    @property
    def encoder(self) -> VisionEncoder:
        """The in-process vision encoder, loaded on first use (text-only workloads never load it)."""
        return self._image_path().encoder.encoder

    def close(self) -> None:
        """Stop the image path's thread and release its caches (the engine needs no closing)."""
        if self._images is not None:
            self._images.close()
            self._images = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _image_path(self) -> _ImagePath:
        if self._images is None:
            self._images = _ImagePath(VisionEncoder(self.model_config), self._image_cache_bytes)
        return self._images

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion (continuously batched); one output per prompt, in order.

        A prompt is a string, or a dict with "prompt" (text with one image placeholder per image) or
        "prompt_token_ids", and optionally "multi_modal_data": {"image": image or list of images}.
        """
        prompt_list = [prompts] if isinstance(prompts, str | Mapping) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompt_list))
        return self._run(self._engine_requests(prompt_list, params))

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: SamplingParams | None = None,
        images: Sequence[ImageLike] = (),
    ) -> CompletionOutput:
        """One conversation (HF chat format, `{"type": "image"}` parts) rendered by the chat template."""
        prompt = self.inputs.render_chat(messages)
        return self.generate({"prompt": prompt, "multi_modal_data": {"image": list(images)}}, sampling_params)[0]

    # ---- internals -------------------------------------------------------------------------------------------

    @staticmethod
    def _params_per_prompt(
        sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"{len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _engine_requests(self, prompts: list[PromptLike], params: list[SamplingParams]) -> list[EngineRequest]:
        """Validate every prompt first, then resolve the images of all prompts together, then tokenize."""
        parsed = [self._parse(prompt) for prompt in prompts]
        sources = [
            _image_source(image, self.inputs.embedding_condition(text))
            for text, images in parsed
            if isinstance(text, str)
            for image in images
        ]
        resolved = iter(self._image_path().resolve(sources) if sources else [])
        requests = []
        for (text, images), sampling in zip(parsed, params, strict=True):
            request_id = f"llm-{next(self._ids)}"
            if isinstance(text, list):
                requests.append(EngineRequest(request_id, text, sampling))
                continue
            found = [next(resolved) for _ in images]
            tokenized = self.inputs.tokenize_images(text, found)
            requests.append(tokenized.engine_request(request_id, sampling, {i.key: i.embedding for i in found}))
        return requests

    def _parse(self, prompt: PromptLike) -> tuple[str | list[int], list[ImageLike]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        images = (prompt.get("multi_modal_data") or {}).get("image", [])
        images = [images] if not isinstance(images, list | tuple) else list(images)
        if "prompt_token_ids" in prompt:
            if images:
                raise ValueError("prompt_token_ids with images is not supported: pass the prompt text")
            return [int(t) for t in prompt["prompt_token_ids"]], []
        text = prompt["prompt"]  # a RenderedChat from chat() keeps its type: it is tokenized as HF tokenizes chats
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        self.inputs.check_placeholders(text, len(images))  # before encoding: a mismatch wastes no forward pass
        return text, images

    def _run(self, requests: list[EngineRequest]) -> list[CompletionOutput]:
        for request in requests:
            self.engine.add_request(request)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        logprobs: dict[str, list[TokenLogprobs]] = {r.request_id: [] for r in requests}
        prompts = {r.request_id: r.prompt_token_ids for r in requests}
        done: dict[str, CompletionOutput] = {}
        while len(done) < len(requests):
            for output in self.engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
                texts[output.request_id].append(output.new_text)
                logprobs[output.request_id].extend(output.logprobs)
                if output.finished and output.usage is not None and output.finish_reason is not None:
                    done[output.request_id] = CompletionOutput(
                        request_id=output.request_id,
                        prompt_token_ids=prompts[output.request_id],
                        token_ids=tokens[output.request_id],
                        text="".join(texts[output.request_id]),
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                        usage=output.usage,
                        logprobs=logprobs[output.request_id],
                    )
        return [done[r.request_id] for r in requests]


def _image_source(image: ImageLike, condition: str | None) -> ImageSource:
    """A PIL image is keyed by its pixels; a path or bytes by the file's bytes, exactly as over gRPC."""
    if isinstance(image, Image.Image):
        return ImageSource(image=image.convert("RGB"), condition=condition)
    data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
    return ImageSource(data=data, condition=condition)


class _ImagePath:
    """The services' image path for the synchronous `LLM`: a provider and its encoder on a private event loop
    thread (so `LLM.generate` also works where an event loop is already running, e.g. in a notebook)."""

    def __init__(self, vision: VisionEncoder, cache_bytes: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mmserve-llm-images", daemon=True)
        self._thread.start()
        self.encoder = LocalEncoder(vision)
        self._run(self._start())
        self.provider = EmbeddingProvider(
            self.encoder,
            [CacheLayer("local", LocalEmbeddingCache(cache_bytes))],
            hidden_size=vision.hidden_size,
            tokens_per_image=vision.tokens_per_image,
        )

    async def _start(self) -> None:
        self.encoder.start()

    def resolve(self, sources: list[ImageSource]) -> list[ResolvedImage]:
        """Keys and embeddings, in order; raises the first bad image's ImageError (a ValueError for bad bytes)."""
        return self._run(self.provider.resolve(sources))

    def close(self) -> None:
        self._run(self.provider.close())
        self._run(self.encoder.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
