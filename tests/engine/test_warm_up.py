"""`LLMEngine.warm_up`: the short generation the services and `LLM` run before serving (it compiles the language
model unless eager); it leaves nothing behind, and a failing step fails it loudly instead of serving broken."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from common.compilation import CompiledForward
from common.config import EngineConfig, ModelConfig
from generator_service.engine.llm_engine import EngineRequest, LLMEngine
from generator_service.engine.sampling_params import SamplingParams


def _engine(checkpoint: Path, *, enforce_eager: bool = True) -> LLMEngine:
    model = ModelConfig(str(checkpoint), enforce_eager=enforce_eager)
    return LLMEngine.from_config(EngineConfig(model=model, block_size=4, num_kv_blocks=32, enable_prefix_caching=False))


def test_warm_up_leaves_the_engine_empty(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint)
    computed: list[Sequence[str]] = []
    engine.step_hook = computed.append
    assert engine.warm_up() > 0
    assert len(computed) == 2  # a prefill step, then a decode step
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == 0
    engine.add_request(EngineRequest("after", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0)))
    while engine.has_unfinished_requests():
        engine.step()


def test_a_failing_step_fails_the_warm_up(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint)

    def fail(request_ids: Sequence[str]) -> None:
        raise RuntimeError("injected")

    engine.step_hook = fail
    with pytest.raises(RuntimeError, match=r"warm-up generation ended \['error'\]"):
        engine.warm_up()
    assert engine.block_manager.num_used_blocks == 0


def test_warm_up_runs_before_any_request(tiny_checkpoint: Path) -> None:
    engine = _engine(tiny_checkpoint)
    engine.add_request(EngineRequest("early", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0)))
    with pytest.raises(RuntimeError, match="before any request"):
        engine.warm_up()


def test_a_failed_compiled_warm_up_falls_back_to_eager(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A compile failure cannot be produced on demand: the step hook fails the first (compiled) warm-up step."""
    engine = _engine(tiny_checkpoint, enforce_eager=False)
    layers = engine.runner.model.model.layers
    assert engine.runner.compiled_layers and all(isinstance(layer.forward, CompiledForward) for layer in layers)
    failures = [RuntimeError("inductor failed on purpose")]

    def fail_once(request_ids: Sequence[str]) -> None:
        if failures:
            raise failures.pop()

    engine.step_hook = fail_once
    engine.warm_up()
    assert "running the language model eagerly" in caplog.text
    assert engine.runner.compiled_layers == []
    assert not any(isinstance(layer.forward, CompiledForward) for layer in layers)
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
