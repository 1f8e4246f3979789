"""The compiled language model (common/compilation.py) is exact: every family's greedy tokens equal Hugging Face's
`generate(do_sample=False)`, and every generated token's top-5 logprobs equal the eager engine's bit for bit (float32;
bfloat16 too, for one family).

The batch mixes images of different sizes, several images per prompt and a text-only prompt, under a token budget
small enough that chunked prefill splits images and steps mix prefill chunks with decode rows. Dynamo must not
recompile after the warm-up (its two graphs serve every step) nor break the graph (counted by dynamo).

This module always runs compiled; `make test-compiled` also runs the engine and family exactness suites compiled.
The first compile of each family's layer class takes tens of seconds on CPU (cached on disk afterwards).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from common.compilation import compile_layers
from generator_service import LLM, SamplingParams
from generator_service.llm import CompletionOutput
from tests.conftest import CheckpointFactory
from tests.families.test_serving import MAX_TOKENS, SPECS, Spec, cases
from tests.generator_service.support import Reference

# One family per kind of language model: Llama (LLaVA), Mistral (LLaVA-NeXT), OPT (BLIP-2), Gemma 3, Qwen2-VL's
# M-RoPE text model, and Idefics3's Llama with its own connector; the other families share these layer classes.
FAMILIES = ("llava", "llava_next", "blip2", "gemma3", "qwen2_vl", "idefics3")


@pytest.fixture(scope="module", params=FAMILIES)
def spec(request: pytest.FixtureRequest) -> Spec:
    from common.models.idefics3 import processor_loads_without_torchvision

    if request.param == "idefics3" and not processor_loads_without_torchvision():
        pytest.skip("this transformers release loads Idefics3 processors only with torchvision")
    return SPECS[request.param]


def _prompts(spec: Spec) -> list[dict]:
    return [{"prompt": prompt, "multi_modal_data": {"image": images}} for prompt, images in cases(spec)]


def _generate_without_recompiles(llm: LLM, prompts: list[dict], sampling: SamplingParams) -> list[CompletionOutput]:
    counters.clear()
    # The warm-up compiled both graphs: a recompile here would be a shape class it missed.
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = llm.generate(prompts, sampling)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert llm.engine.block_manager.num_used_blocks == 0
    return outputs


def test_compiled_engine_equals_hf(spec: Spec, checkpoint_factory: CheckpointFactory) -> None:
    checkpoint = checkpoint_factory(family=spec.family)
    reference = Reference(checkpoint)
    expected = [reference.generate(prompt, images, MAX_TOKENS) for prompt, images in cases(spec)]
    with LLM(
        str(checkpoint), enforce_eager=False, block_size=4, num_kv_blocks=256, max_num_batched_tokens=24
    ) as llm:
        assert llm.engine.runner.compiled_layers
        greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        outputs = _generate_without_recompiles(llm, _prompts(spec), greedy)
    assert [output.token_ids for output in outputs] == expected


def _assert_compiled_equals_eager(spec: Spec, checkpoint: Path, dtype: str = "float32") -> None:
    """One LLM, run eagerly, then compiled in place: the same image embeddings (its image cache; two LLMs could batch
    the images differently, which moves embeddings by an ulp), no prefix cache (the second run recomputes it all)."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=5)
    with LLM(
        str(checkpoint),
        dtype=dtype,
        enforce_eager=True,
        block_size=4,
        num_kv_blocks=256,
        max_num_batched_tokens=24,
        enable_prefix_caching=False,
    ) as llm:
        eager = llm.generate(_prompts(spec), sampling)
        assert compile_layers(llm.engine.runner.model)
        llm.engine.warm_up()
        compiled = _generate_without_recompiles(llm, _prompts(spec), sampling)
    for compiled_output, eager_output in zip(compiled, eager, strict=True):
        assert compiled_output.token_ids == eager_output.token_ids
        # floats compared with ==: every generated token's logits are the eager ones, bit for bit
        assert compiled_output.logprobs == eager_output.logprobs


def test_compiled_logits_equal_eager_bit_for_bit(spec: Spec, checkpoint_factory: CheckpointFactory) -> None:
    _assert_compiled_equals_eager(spec, checkpoint_factory(family=spec.family))


def test_compiled_bfloat16_equals_eager_bit_for_bit(checkpoint_factory: CheckpointFactory) -> None:
    """bfloat16 (the dtype of GPU serving), one family: inductor must round after every op as eager does
    (`emulate_precision_casts`); without it the logprobs differ and a request's tokens changed."""
    spec = SPECS["llava"]
    _assert_compiled_equals_eager(spec, checkpoint_factory(family=spec.family), dtype="bfloat16")
