"""`mmserve.generator.v1.Generator` over grpc.aio: validate, convert, resolve images, stream engine outputs.

    Generate ─▶ draining? admission (in-flight cap)? duplicate id?        UNAVAILABLE / RESOURCE_EXHAUSTED /
             ─▶ SamplingParams, prompt or chat messages, placeholders     ALREADY_EXISTS / INVALID_ARGUMENT
             ─▶ length check (before any image work)                      INVALID_ARGUMENT
             ─▶ EmbeddingProvider (local -> Redis -> Encode)              FAILED_PRECONDITION / UNAVAILABLE / ...
             ─▶ tokenize ─▶ AsyncEngine.generate ─▶ one GenerateResponse per engine output

Admission is counted here, before any image is hashed or encoded: a call is admitted while fewer than
`max_num_seqs + max_queue_len` calls are in flight. Leaving the stream for any reason (client cancel, deadline,
server stop) closes the engine stream, which aborts the request and frees its KV blocks at the next step.
Domain errors (bad images, missing keys, a dependency down, bad prompts) become status codes through
`common.serving.rpc_error`, the table both services share. A dead engine thread is UNAVAILABLE (retry on another
replica); a failed engine step is INTERNAL for the requests computed in that step only. Messages to clients never
carry a stack trace or a memory address; unexpected errors are logged with the request id and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from common.errors import InvalidPrompt
from common.images.errors import ImageError
from common.images.provider import EmbeddingProvider, ImageSource
from common.serving import RpcError, rpc_error
from generator_service.engine.async_engine import (
    AsyncEngine,
    DuplicateRequestError,
    EngineDeadError,
    RequestFailedError,
)
from generator_service.engine.llm_engine import EngineRequest, RequestOutput
from generator_service.engine.sampling_params import SamplingParams
from generator_service.engine.scheduler import RequestRejected
from generator_service.inputs import InputProcessor
from generator_service.metrics import GeneratorMetrics
from protos import encoder_pb2, generator_pb2, generator_pb2_grpc

logger = logging.getLogger(__name__)
MAX_REQUEST_ID_LEN = 256
DEADLINE_SLACK_S = 0.01  # a cancel this close to the deadline is the deadline
_FINISH_REASONS = {
    "stop": generator_pb2.FINISH_REASON_STOP,
    "length": generator_pb2.FINISH_REASON_LENGTH,
    "abort": generator_pb2.FINISH_REASON_ABORT,
}
# Proto field -> SamplingParams field, for the proto3 `optional` scalars (unset = the dataclass default).
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "ignore_eos", "logprobs",
)  # fmt: skip
_PLACEHOLDER_KEY = "0" * 64  # stands in for image keys in the pre-encode length check


def sampling_from_proto(message: generator_pb2.SamplingParams) -> SamplingParams:
    """Proto -> SamplingParams: unset optional fields take the dataclass defaults. Raises ValueError."""
    kwargs: dict[str, Any] = {
        name: getattr(message, name) for name in _OPTIONAL_SAMPLING_FIELDS if message.HasField(name)
    }
    return SamplingParams(stop=tuple(message.stop), stop_token_ids=tuple(message.stop_token_ids), **kwargs)


def _ended_by_client(context: grpc.aio.ServicerContext) -> str | None:
    """"DEADLINE_EXCEEDED" or "CANCELLED" when the client's deadline or cancel has ended the call, else None.

    A deadline ends the call when the server's clock says it passed; allow a little slack for the rounding between
    the client's and the server's deadline clocks.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED" if context.cancelled() else None


def image_source(image: encoder_pb2.ImageInput, condition: str | None) -> ImageSource:
    """An ImageInput of a request -> the image path's ImageSource (neither data nor key: refused there)."""
    source = image.WhichOneof("source")
    if source == "embedding_key":
        return ImageSource(embedding_key=image.embedding_key)
    return ImageSource(data=image.data if source == "data" else None, condition=condition)


def chat_from_proto(
    messages: list[generator_pb2.ChatMessage],
) -> tuple[list[dict[str, Any]], list[encoder_pb2.ImageInput]]:
    """ChatMessages -> HF chat dicts ({"type": "text"/"image"} parts) and the parts' images, in order."""
    conversation: list[dict[str, Any]] = []
    images: list[encoder_pb2.ImageInput] = []
    for index, message in enumerate(messages):
        if not message.role:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"messages[{index}].role is empty")
        parts: list[dict[str, Any]] = []
        for part_index, part in enumerate(message.content):
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
            elif kind == "image":
                parts.append({"type": "image"})
                images.append(part.image)
            else:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"messages[{index}].content[{part_index}] has neither text nor image",
                )
        conversation.append({"role": message.role, "content": parts})
    return conversation, images


def response_from_output(output: RequestOutput) -> generator_pb2.GenerateResponse:
    response = generator_pb2.GenerateResponse(
        request_id=output.request_id, token_ids=output.new_token_ids, text=output.new_text
    )
    for item in output.logprobs:
        response.logprobs.add(
            token_id=item.token_id,
            logprob=item.logprob,
            top=[generator_pb2.TopLogprob(token_id=token, logprob=value) for token, value in item.top],
        )
    if output.finished:
        response.finish_reason = _FINISH_REASONS.get(output.finish_reason or "abort", generator_pb2.FINISH_REASON_ABORT)
        if output.stop_reason is not None:
            response.stop_reason = str(output.stop_reason)
        if output.usage is not None:
            usage = output.usage
            response.usage.CopyFrom(
                generator_pb2.Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_prompt_tokens=usage.cached_prompt_tokens,
                    image_tokens=usage.image_tokens,
                )
            )
    return response


@dataclass
class _CallLog:
    """What one call's log line reports (never the prompt)."""

    request_id: str
    arrival: float = field(default_factory=time.perf_counter)
    status: str = "OK"
    num_images: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None

    def fields(self) -> Mapping[str, object]:
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.arrival) * 1000, 1)
        return {
            "request_id": self.request_id,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "images": self.num_images,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "ttft_ms": ttft,
            "duration_ms": round((now - self.arrival) * 1000, 1),
        }


@dataclass(frozen=True)
class GeneratorBackend:
    """What the servicer calls once the model is loaded and warm."""

    engine: AsyncEngine
    inputs: InputProcessor
    images: EmbeddingProvider
    max_model_len: int
    model_info: Callable[[], encoder_pb2.ModelInfo]


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    """Answers UNAVAILABLE until `attach(backend)` (after warm-up) and again once `draining` is set."""

    def __init__(self, *, metrics: GeneratorMetrics, max_in_flight: int) -> None:
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._backend: GeneratorBackend | None = None
        self._active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def attach(self, backend: GeneratorBackend) -> None:
        self._backend = backend

    @property
    def num_in_flight(self) -> int:
        return len(self._active)

    async def wait_idle(self) -> None:
        """Return once no call is in flight."""
        await self._idle.wait()

    async def GetModelInfo(
        self, request: encoder_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.ModelInfo:
        backend = self._backend
        if backend is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its model: retry shortly")
        assert backend is not None
        return backend.model_info()

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as an async generator: a cancel or deadline then always raises
        # CancelledError inside this coroutine (while it waits on the engine or on a write), so the engine
        # stream is closed at once, never later by the garbage collector.
        call = _CallLog(request_id=request.request_id or f"gen-{uuid.uuid4().hex}")
        error: RpcError | None = None
        admitted = False
        try:
            backend = self._admit(call.request_id)  # no await before this: no two calls take the last slot
            admitted = True
            await self._generate(backend, call, request, context)
        except RpcError as exc:
            error = exc
        except asyncio.CancelledError:
            call.status = _ended_by_client(context) or "CANCELLED"
            raise
        except Exception:
            ended = _ended_by_client(context)
            if ended is not None:
                # The deadline or cancel landed during a write, which then fails instead of being cancelled:
                # the client has gone, there is nobody to answer.
                call.status = ended
                return
            logger.exception("request failed", extra={"request_id": call.request_id})
            error = RpcError(
                grpc.StatusCode.INTERNAL, f"internal error (request id {call.request_id}); see the server log"
            )
        finally:
            if admitted:
                self._release(call.request_id)
            if error is not None:
                call.status = error.code.name
            self._record(call)
        if error is not None:
            await context.abort(error.code, error.message)

    # ---- admission -----------------------------------------------------------------------------------------

    def _admit(self, request_id: str) -> GeneratorBackend:
        backend = self._backend
        if self.draining:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another replica")
        if backend is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is warming up: retry shortly")
        if len(request_id) > MAX_REQUEST_ID_LEN:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id is longer than {MAX_REQUEST_ID_LEN} characters"
            )
        if request_id in self._active:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"request id {request_id!r} is already in flight")
        if len(self._active) >= self._max_in_flight:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at capacity ({self._max_in_flight} requests in flight = --max-num-seqs + "
                "--max-queue-len): retry later or on another replica",
            )
        self._active.add(request_id)
        self._idle.clear()
        self._metrics.requests_in_flight.set(len(self._active))
        return backend

    def _release(self, request_id: str) -> None:
        self._active.discard(request_id)
        self._metrics.requests_in_flight.set(len(self._active))
        if not self._active:
            self._idle.set()

    def _record(self, call: _CallLog) -> None:
        self._metrics.requests_total.labels(status=call.status).inc()
        self._metrics.request_duration.observe(time.perf_counter() - call.arrival)
        level = logging.INFO if call.status in ("OK", "CANCELLED", "DEADLINE_EXCEEDED") else logging.WARNING
        logger.log(level, "request finished", extra=dict(call.fields()))

    # ---- one call ------------------------------------------------------------------------------------------

    async def _generate(
        self,
        backend: GeneratorBackend,
        call: _CallLog,
        request: generator_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            sampling = sampling_from_proto(request.sampling)
        except ValueError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        prompt, images = self._prompt_and_images(backend.inputs, request)
        call.num_images = len(images)
        try:
            backend.inputs.check_placeholders(prompt, len(images))
            if images:
                self._check_length(backend, prompt, len(images), sampling)  # before spending encoder time
            condition = backend.inputs.embedding_condition(prompt)
            sources = [image_source(image, condition) for image in images]
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            resolved = await backend.images.resolve(sources, deadline)
            tokenized = backend.inputs.tokenize_images(prompt, resolved)
        except (InvalidPrompt, ImageError) as exc:
            raise rpc_error(exc) from None
        engine_request = tokenized.engine_request(
            call.request_id, sampling, {image.key: image.embedding for image in resolved}
        )
        call.prompt_tokens = len(tokenized.token_ids)
        await self._stream(backend.engine, call, engine_request, context)

    @staticmethod
    def _prompt_and_images(
        inputs: InputProcessor, request: generator_pb2.GenerateRequest
    ) -> tuple[str, list[encoder_pb2.ImageInput]]:
        if request.prompt and request.messages:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "set either prompt or messages, not both")
        if request.messages:
            if request.images:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "with messages, put each image in its message's content parts, not in images",
                )
            conversation, images = chat_from_proto(list(request.messages))
            try:
                return inputs.render_chat(conversation), images
            except InvalidPrompt as exc:
                raise rpc_error(exc) from None
        if not request.prompt:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the request has neither a prompt nor messages")
        return request.prompt, list(request.images)

    @staticmethod
    def _check_length(backend: GeneratorBackend, prompt: str, num_images: int, sampling: SamplingParams) -> None:
        """Reject a prompt over --max-model-len before its images are encoded (rows known per checkpoint)."""
        rows = backend.inputs.tokens_per_image
        if rows is None:
            return  # the engine checks it once the embeddings are known
        num_tokens = len(
            backend.inputs.tokenize(prompt, [_PLACEHOLDER_KEY] * num_images, [rows] * num_images).token_ids
        )
        max_model_len = backend.max_model_len
        if num_tokens + sampling.max_tokens > max_model_len:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({num_tokens} tokens, images included) + max_tokens ({sampling.max_tokens}) exceeds "
                f"max_model_len ({max_model_len}): shorten the prompt or lower max_tokens",
            )

    async def _stream(
        self, engine: AsyncEngine, call: _CallLog, engine_request: EngineRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # aclosing: however this call is left (cancel, deadline, error), the engine stream is closed now,
        # which sends the abort that frees the request's KV blocks at the next engine step.
        # (`generate` is an async generator, annotated as the AsyncIterator it is used as.)
        stream = cast(AsyncGenerator[RequestOutput, None], engine.generate(engine_request))
        async with contextlib.aclosing(stream) as outputs:
            try:
                async for output in outputs:
                    self._observe(call, output)
                    await context.write(response_from_output(output))
            except DuplicateRequestError as exc:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
            except RequestRejected as exc:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except EngineDeadError:
                status = "shutting down" if self.draining else "not running"
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE, f"the generation engine is {status}: retry on another replica"
                ) from None
            except RequestFailedError:
                # The engine logged the traceback with the request id; the client gets no internals.
                raise RpcError(
                    grpc.StatusCode.INTERNAL,
                    f"the engine failed on this request (request id {call.request_id}); see the server log",
                ) from None
            except ValueError as exc:  # other inputs the engine refused before running them
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _observe(self, call: _CallLog, output: RequestOutput) -> None:
        if output.new_token_ids:
            now = time.perf_counter()
            if call.first_token_at is None:
                call.first_token_at = now
                self._metrics.time_to_first_token.observe(now - call.arrival)
            elif call.last_token_at is not None:
                self._metrics.inter_token_latency.observe(now - call.last_token_at)
            call.last_token_at = now
            self._metrics.generated_tokens.inc(len(output.new_token_ids))
        if output.finished:
            call.finish_reason = output.finish_reason
            if output.usage is not None:
                call.completion_tokens = output.usage.completion_tokens
                call.cached_prompt_tokens = output.usage.cached_prompt_tokens
