"""What the family test files share: aborting requests in chosen phases and checking the others stayed exact."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from generator_service.engine.llm_engine import EngineRequest, LLMEngine, RequestOutput
from generator_service.engine.request import Request
from tests.engine.test_engine_exactness import drive, tokens

InsideImage = Callable[[Request, int], bool]  # (request, computed tokens) -> the prefill stopped inside an image
StepHook = Callable[[int, LLMEngine], None]


def inside_a_span(request: Request, computed: int) -> bool:
    return any(span.offset < computed < span.end for span in request.image_spans)


def phase_of(request: Request | None, inside_image: InsideImage | None) -> str | None:
    """"prefill", "inside-image" (when `inside_image` says so) or "decode" (two tokens out); None otherwise."""
    if request is None or request.num_computed_tokens == 0:
        return None
    if request.num_output_tokens >= 2:
        return "decode"
    computed = request.num_computed_tokens
    if inside_image is not None and inside_image(request, computed):
        return "inside-image"
    return "prefill" if computed < request.num_prompt_tokens else None


def abort_in_phases(
    engine: LLMEngine,
    arrivals: dict[int, list[EngineRequest]],
    phases: Mapping[str, str],
    references: Sequence[list[int]],
    *,
    inside_image: InsideImage | None = inside_a_span,
    on_step: StepHook | None = None,
) -> dict[str, list[RequestOutput]]:
    """Drive the engine, aborting request `r<i>` the first time it is in `phases[r<i>]`; every abort must really
    happen in its phase, the aborted requests' tokens must be a prefix of their reference and the others exact."""
    aborted_in: dict[str, str] = {}

    def abort(step: int, engine: LLMEngine) -> None:
        if on_step is not None:
            on_step(step, engine)
        for request_id, wanted in phases.items():
            if request_id in aborted_in:
                continue
            if phase_of(engine.scheduler.get_request(request_id), inside_image) == wanted:
                engine.abort_request(request_id)
                aborted_in[request_id] = wanted

    outputs = drive(engine, arrivals, abort)
    assert aborted_in == dict(phases)  # each abort really happened in its phase
    for i, reference in enumerate(references):
        generated = tokens(outputs[f"r{i}"])
        if f"r{i}" in phases:
            assert outputs[f"r{i}"][-1].finish_reason == "abort"
            assert generated == reference[: len(generated)]
        else:
            assert generated == reference
    return outputs
