"""The offline API: the encoder and the engine in one process, no network (like vLLM's `LLM.generate`).

    from generator_service import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")
    outputs = llm.generate(
        [{"prompt": "USER: <image>\\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": pil_image}}],
        SamplingParams(max_tokens=32, temperature=0),
    )
    print(outputs[0].text, outputs[0].token_ids)

Images may be PIL images, encoded file bytes or file paths. Their embeddings are computed in-process by the
encoder service's `VisionEncoder` and kept in an LRU keyed like the services' cache (file bytes hash to the
same key as over gRPC), so a repeated image is encoded once and hits the KV prefix cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from common.config import EngineConfig, ModelConfig
from common.hashing import image_key
from generator_service.engine.llm_engine import EngineRequest, LLMEngine, Usage
from generator_service.engine.sampler import TokenLogprobs
from generator_service.engine.sampling_params import SamplingParams
from generator_service.inputs import InputProcessor

if TYPE_CHECKING:
    from encoder_service.vision_encoder import VisionEncoder

ImageLike = Image.Image | bytes | str | Path
PromptLike = str | Mapping[str, Any]


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
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gib: float | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        max_cached_images: int = 256,
        encode_batch_size: int = 16,
    ) -> None:
        self.model_config = ModelConfig(model=model, device=device, dtype=dtype, revision=revision)
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
        self.inputs = InputProcessor(self.engine.processor, self.engine.family)
        self._encoder: VisionEncoder | None = None
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._max_cached_images = max_cached_images
        self._encode_batch_size = encode_batch_size
        self._ids = itertools.count()

    @property
    def encoder(self) -> VisionEncoder:
        """The in-process vision encoder, loaded on first use (text-only workloads never load it)."""
        if self._encoder is None:
            from encoder_service.vision_encoder import VisionEncoder

            self._encoder = VisionEncoder(self.model_config)
        return self._encoder

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
        """Validate every prompt first, then encode all uncached images in batches, then tokenize."""
        parsed = [self._parse(prompt) for prompt in prompts]
        keyed = {id(image): self._key_and_image(image) for _, images in parsed for image in images}
        embeddings = self._embeddings_for(list(keyed.values()))
        requests = []
        for (text, images), sampling in zip(parsed, params, strict=True):
            request_id = f"llm-{next(self._ids)}"
            if isinstance(text, list):
                requests.append(EngineRequest(request_id, text, sampling))
                continue
            keys = [keyed[id(image)][0] for image in images]
            rows = [embeddings[key].shape[0] for key in keys]
            tokenized = self.inputs.tokenize(text, keys, rows)
            requests.append(
                EngineRequest(
                    request_id=request_id,
                    prompt_token_ids=tokenized.token_ids,
                    sampling=sampling,
                    image_spans=tokenized.image_spans,
                    image_embeddings=tuple(embeddings[key] for key in keys),
                )
            )
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
        text = str(prompt["prompt"])
        self.inputs.check_placeholders(text, len(images))  # before encoding: a mismatch wastes no forward pass
        return text, images

    def _embeddings_for(self, keyed: list[tuple[str, Callable[[], Image.Image]]]) -> dict[str, torch.Tensor]:
        """Embeddings of every key: cached ones from the LRU, the rest encoded in batches (each image once)."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Callable[[], Image.Image]] = {}
        for key, decode in keyed:
            cached = self._embeddings.get(key)
            if cached is not None:
                self._embeddings.move_to_end(key)
                found[key] = cached
            elif key not in found:
                missing[key] = decode
        pending = list(missing.items())
        for start in range(0, len(pending), self._encode_batch_size):
            batch = pending[start : start + self._encode_batch_size]
            for (key, _), embedding in zip(batch, self.encoder.encode([decode() for _, decode in batch]), strict=True):
                found[key] = self._embeddings[key] = embedding
        while len(self._embeddings) > self._max_cached_images:
            self._embeddings.popitem(last=False)
        return found

    def _key_and_image(self, image: ImageLike) -> tuple[str, Callable[[], Image.Image]]:
        """The image's cache key (without decoding file bytes) and a thunk that decodes it."""
        fingerprint = self.encoder.fingerprint
        if isinstance(image, Image.Image):
            rgb = image.convert("RGB")
            # PIL images have no file bytes: key the exact pixels with their size (never pixels alone).
            raw = b"pil-rgb:%dx%d:" % rgb.size + rgb.tobytes()
            return image_key(fingerprint, raw), lambda: rgb
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        from encoder_service.image_io import decode_image

        return image_key(fingerprint, data), lambda: decode_image(data)

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
