"""benchmarks.gpu_check on the CPU: every phase of `make gpu-check` runs on the tiny preset in float32 (where the
engine is exact, so its greedy tokens must equal HF's), phases are time-boxed and isolated, a missing CUDA is a
clear exit 2, and the 7b preset has LLaVA-1.5-7B's shapes (config only: no 14 GB of weights here)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    PHASES,
    Runner,
    RunTiming,
    State,
    as_prompts,
    drive_engine,
    main,
    mmserve_load,
    parse_args,
    requests_for,
    sweep,
)
from common.demo_checkpoints.llava import LLAVA
from common.demo_checkpoints.parts import SIZE_PRESETS, instantiate
from generator_service import LLM, SamplingParams
from tests.engine_mode import ENFORCE_EAGER

BATCH_SIZES = (1, 2)
MAX_TOKENS = 4
COMPARE_TOKENS = 8
PROMPTS = 2


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """One whole check on the CPU (~10 s): its exit code and its JSON."""
    root = tmp_path_factory.mktemp("gpu-check")
    out = root / "gpu-check.json"
    code = main([
        "--device", "cpu", "--size", "tiny", "--dtype", "float32", "--workdir", str(root / "checkpoint"),
        "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--max-tokens", str(MAX_TOKENS),
        "--compare-tokens", str(COMPARE_TOKENS), "--prompts", str(PROMPTS), "--ttft-repeats", "1",
        "--time-budget", "120", "--out", str(out),
    ])  # fmt: skip
    return code, json.loads(out.read_text())


def test_every_phase_runs_on_cpu_and_reports_a_status(cpu_run: tuple[int, dict[str, Any]]) -> None:
    code, report = cpu_run
    phases = report["phases"]
    assert list(phases) == ["environment", *(name for name, _ in PHASES)]
    assert {name: phase["status"] for name, phase in phases.items()} == dict.fromkeys(phases, "ok")
    assert code == 0
    assert phases["checkpoint"]["built"] is True
    assert phases["mmserve_load"]["compiled"] is True and "compile_error" not in phases["mmserve_load"]
    assert phases["bandwidth"]["gb_per_s"] > 0
    kv = phases["kv_cache"]
    assert kv["tokens"] == kv["num_blocks"] * kv["block_size"] > 0
    ttft = phases["ttft"]
    assert ttft["new_image_ms"] > 0 and ttft["embedding_hit_ms"] > 0 and ttft["embedding_and_prefix_hit_ms"] > 0


def test_decode_runs_make_every_token_at_every_batch_size(cpu_run: tuple[int, dict[str, Any]]) -> None:
    phases = cpu_run[1]["phases"]
    for engine in ("mmserve_decode", "hf_decode"):
        for batch in BATCH_SIZES:
            row = phases[engine][str(batch)]
            assert row["complete"] is True, (engine, batch)
            assert row["tokens"] == batch * MAX_TOKENS, (engine, batch)
            assert row["e2e_tok_s"] > 0 and row["decode_tok_s"] > 0, (engine, batch)
            assert row["floor_tok_s"] > row["decode_tok_s"], (engine, batch)  # the floor is a ceiling on speed


def test_float32_greedy_tokens_and_logprobs_equal_hf(cpu_run: tuple[int, dict[str, Any]]) -> None:
    phases = cpu_run[1]["phases"]
    assert phases["mmserve_greedy"]["tokens"] == phases["hf_greedy"]["tokens"]
    assert [len(tokens) for tokens in phases["hf_greedy"]["tokens"]] == [COMPARE_TOKENS] * PROMPTS
    result = phases["correctness"]
    assert result["agreeing_prefix"] == [COMPARE_TOKENS] * PROMPTS
    assert result["all_tokens_agree"] is True and result["flags"] == []
    assert result["top5_overlap"] == [5] * PROMPTS
    assert result["max_abs_logprob_delta"] < 1e-4


def test_summary_is_a_markdown_table_of_the_figures(cpu_run: tuple[int, dict[str, Any]]) -> None:
    phases = cpu_run[1]["phases"]
    table = phases["summary"]["markdown"]
    assert "| device copy bandwidth |" in table
    for batch in BATCH_SIZES:
        mine, hf = phases["mmserve_decode"][str(batch)], phases["hf_decode"][str(batch)]
        assert f"| {batch} | {mine['e2e_tok_s']} | {mine['decode_tok_s']} | {hf['e2e_tok_s']} |" in table


def _state(tmp_path: Path) -> State:
    return State(parse_args(["--device", "cpu", "--out", str(tmp_path / "r.json")]))


def test_a_failed_compile_is_recorded_and_the_engine_loads_eagerly(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile failure cannot be produced on demand: a wrapper raises where the compiled LLM would be built."""
    built: list[bool] = []

    def llm(*args: Any, enforce_eager: bool, **kwargs: Any) -> LLM:
        built.append(enforce_eager)
        if not enforce_eager:
            raise RuntimeError("inductor failed on purpose")
        return LLM(*args, enforce_eager=True, **kwargs)

    monkeypatch.setattr(gpu_check, "LLM", llm)
    state = dataclasses.replace(_state(tmp_path), checkpoint=tiny_checkpoint)
    figures: dict[str, Any] = {}
    mmserve_load(state, figures, deadline=time.monotonic() + 60)
    assert built == [False, True]
    assert figures["compiled"] is False
    assert figures["compile_error"] == "RuntimeError: inductor failed on purpose"
    assert state.llm is not None and not state.llm.engine.runner.compiled_layers
    state.llm.close()


def test_a_hung_phase_times_out_a_failed_one_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    state = _state(tmp_path)
    runner = Runner(state, tmp_path / "r.json", time_budget_s=60, budgets={"hangs": 1.0})
    never = threading.Event()
    ran: list[str] = []

    def hangs(state: State, figures: dict[str, Any], deadline: float) -> None:
        figures["before"] = 1
        never.wait(30)  # no deadline check: only the phase's alarm can end it

    def fails(state: State, figures: dict[str, Any], deadline: float) -> None:
        raise RuntimeError("broken on purpose")

    def works(state: State, figures: dict[str, Any], deadline: float) -> None:
        ran.append("works")

    start = time.perf_counter()
    runner.run("hangs", hangs)
    assert time.perf_counter() - start < 10
    runner.run("fails", fails)
    runner.run("works", works)
    written = json.loads((tmp_path / "r.json").read_text())["phases"]
    assert written["hangs"]["status"] == "timeout" and written["hangs"]["before"] == 1  # partial figures kept
    assert written["fails"] == {"status": "failed", "seconds": written["fails"]["seconds"],
                                "error": "RuntimeError: broken on purpose"}  # fmt: skip
    assert written["works"]["status"] == "ok" and ran == ["works"]


def test_a_spent_time_budget_marks_the_remaining_phases_timed_out(tmp_path: Path) -> None:
    runner = Runner(_state(tmp_path), None, time_budget_s=0)
    runner.run("late", lambda state, figures, deadline: None)
    assert runner.state.results["late"]["status"] == "timeout"


def test_a_failing_batch_size_is_reported_and_the_next_still_runs(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.args.batch_sizes = [1, 2]

    def run_one(batch: int, deadline: float) -> RunTiming:
        if batch == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return RunTiming(batch, prompt_tokens=10, tokens=8, seconds=2.0, decode_tokens=6, decode_seconds=1.0,
                         complete=True)  # fmt: skip

    figures: dict[str, Any] = {}
    sweep(state, figures, time.perf_counter() + 60, run_one)
    assert figures["1"] == {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB"}
    assert figures["2"]["e2e_tok_s"] == 4.0 and figures["2"]["decode_tok_s"] == 6.0
    assert figures["2"]["floor_tok_s"] is None  # no bandwidth measured in this state


def test_a_run_cut_short_leaves_the_engine_empty(tiny_checkpoint: Path) -> None:
    with LLM(str(tiny_checkpoint), enforce_eager=ENFORCE_EAGER) as llm:
        texts, images = requests_for(3, seed=1)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        timing = drive_engine(llm, as_prompts(texts, images), params, deadline=time.perf_counter())
        assert not timing.complete and timing.tokens == 0
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.stats().kv_blocks_used == 0
        full = drive_engine(llm, as_prompts(texts, images), params, deadline=time.perf_counter() + 60)
        assert full.complete and full.tokens == 3 * 4 and full.prompt_tokens > 16  # 16 image tokens each


def test_missing_cuda_exits_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "r.json"
    assert main(["--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().out
    assert json.loads(out.read_text())["phases"]["environment"]["cuda_available"] is False


def test_7b_preset_has_llava_1_5_7b_shapes() -> None:
    config, tokenizer, strategy = LLAVA.make_config(size="7b")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (
        1024, 24, 16, 4096
    )  # fmt: skip
    assert (vision.image_size, vision.patch_size, config.image_seq_length, strategy) == (336, 14, 576, "default")
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4096, 32, 32, 32
    )  # fmt: skip
    assert (text.intermediate_size, text.vocab_size, len(tokenizer)) == (11008, 32064, 32064)
    assert SIZE_PRESETS["7b"].dtype == "bfloat16"
    with torch.device("meta"):  # shapes without memory
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's count


def test_other_dtypes_are_drawn_directly_with_the_preset_spread() -> None:
    preset = dataclasses.replace(SIZE_PRESETS["tiny"], dtype="bfloat16")
    config, _, _ = LLAVA.make_config(size="tiny")
    torch.manual_seed(0)
    model = instantiate(LlavaForConditionalGeneration, config, preset, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    weight = model.get_parameter("model.language_model.layers.0.mlp.up_proj.weight").float()
    assert abs(weight.std().item() - preset.initializer_range) < 0.2 * preset.initializer_range
