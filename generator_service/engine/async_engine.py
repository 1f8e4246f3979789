"""The engine loop in its own thread, with asyncio streams for callers (the gRPC servicer).

    caller task ──add/abort──▶ command queue ──▶ engine thread: drain commands, step(), publish
    caller task ◀──────────── per-request asyncio.Queue ◀── loop.call_soon_threadsafe(put_nowait)

The engine (scheduler, block manager, runner) is touched only by the engine thread, so it needs no locks.
A slow stream reader never stalls the loop: outputs go into an unbounded per-request queue. A caller that
stops listening (client cancel, deadline) aborts its request in `finally`; the abort is applied at the next
step boundary, which frees the request's KV blocks.

Failures, from least to most severe:
  - a request the engine refuses (RequestRejected, bad inputs): that caller gets the exception, nobody else notices;
  - a step that fails while computing (`LLMEngine.step` ends its requests with finish_reason "error"): those
    callers get `RequestFailedError`, the others go on;
  - `max_consecutive_failed_steps` failed steps in a row (a broken device fails every step), or anything else
    raised by the engine (a fatal BaseException, a bookkeeping error): the thread stops and every caller, present
    or future, gets `EngineDeadError`. The server's watchdog then reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from generator_service.engine.llm_engine import EngineRequest, EngineStats, LLMEngine, RequestOutput

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a fatal error); no request can be served."""


class DuplicateRequestError(ValueError):
    """A request with this id is already in flight (gRPC ALREADY_EXISTS)."""


class RequestFailedError(RuntimeError):
    """The engine step computing this request failed (logged with the traceback); the request was aborted."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the engine failed on request {request_id!r}")
        self.request_id = request_id


class _TooManyFailedSteps(RuntimeError):
    """Raised on the engine thread to stop it: every step fails, so the device or the model is broken."""


@dataclass(frozen=True)
class _Add:
    request: EngineRequest
    stream: _Stream


@dataclass(frozen=True)
class _Abort:
    request_id: str


class _Stream:
    """Delivers one request's outputs (or its error) from the engine thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        # RuntimeError: the caller's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        on_step: Callable[[EngineStats], None] | None = None,
        max_consecutive_failed_steps: int = 3,
    ) -> None:
        if max_consecutive_failed_steps < 1:
            raise ValueError(f"max_consecutive_failed_steps must be >= 1, got {max_consecutive_failed_steps}")
        self.engine = engine
        self._on_step = on_step
        self._max_consecutive_failed_steps = max_consecutive_failed_steps
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="mmserve-engine", daemon=True)
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._stats = engine.stats()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still in flight end with EngineDeadError."""
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def stats(self) -> EngineStats:
        """A snapshot taken after the last step (safe to read from any thread)."""
        return self._stats

    async def generate(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs until its final one. Raises the engine's rejection (e.g.
        `RequestRejected`) before any output. Leaving early (cancel, break, error) aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop())
        self._commands.put(_Add(request, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(_Abort(request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=block):
                    break
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                if self._on_step is not None:
                    self._on_step(self._stats)
                self._publish(outputs)
                self._check_failed_steps()
        except BaseException as exc:  # a bug or device failure: fail every request loudly, never hang them
            logger.exception("engine loop failed; failing %d in-flight request(s)", len(self._streams))
            self._error = exc
        finally:
            self._stopped.set()
            error = EngineDeadError("the engine stopped" if self._error is None else "the engine failed")
            for stream in self._streams.values():
                stream.put(error)
            self._streams.clear()
            self._fail_pending_adds(error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finish_reason == "error":
                stream.put(RequestFailedError(output.request_id))
            else:
                stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _check_failed_steps(self) -> None:
        failed = self.engine.num_consecutive_failed_steps
        if failed >= self._max_consecutive_failed_steps:
            raise _TooManyFailedSteps(f"{failed} engine steps in a row failed")

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply queued adds/aborts; wait for one when idle. False once shutdown was requested."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self.engine.abort_request(command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: _Add) -> None:
        request_id = command.request.request_id
        if request_id in self._streams:
            command.stream.put(DuplicateRequestError(f"request id {request_id!r} is already in flight"))
            return
        try:
            self.engine.add_request(command.request)
        except Exception as exc:  # RequestRejected, bad inputs, a bad tensor: only this request fails
            if not isinstance(exc, ValueError):
                logger.exception("request %s could not be added to the engine", request_id)
            command.stream.put(exc)
            return
        self._streams[request_id] = command.stream

    def _fail_pending_adds(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.stream.put(error)
