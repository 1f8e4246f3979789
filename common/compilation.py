"""torch.compile for the language model, kept bit-identical to eager (float32, CPU: the parity standard).

What is compiled: the decoder layers of the language model, in place (`compile_layers`), around the paged attention,
which is an opaque custom op (`mmserve::paged_attention`, paged_attention.py): the graph does not break on it and the
step's token count stays symbolic, so two graphs (steps of one token, and of more) serve every layer of every step,
like vLLM's piecewise compile. When: by default on CUDA only (`ModelConfig.compile_language_model`; on this
project's CPUs it cost start-up time for no speed-up, docs/torch-compile.md); `--compile` / `enforce_eager=False`
on any device; `--no-compile` / `enforce_eager=True` never. Compilation is lazy (at the first call of each shape
class), so the services and `LLM` run a warm-up generation before they serve (`LLMEngine.warm_up`) and log its time.
The vision tower stays eager: on CPU its compile was slower or inexact.

Why the ATen fallbacks: inductor's own kernels for a few ops round differently from ATen's (measured on the bench
Llama and CLIP, float32, CPU): `mean` (RMSNorm's variance: another reduction order, up to 4.8e-7 after the norm),
`cos`/`sin` (RoPE tables: another vector math library, 1 ulp), LayerNorm, sigmoid and GELU (1.2e-7 .. 4.5e-7).
Every other op of a layer (linears, SiLU * up, RoPE application, residual adds) is bit-identical. Letting those ops
run as ATen calls inside the compiled graph makes the forward bit-identical to eager, so greedy parity with HF stays
exact rather than tolerance-based. In bfloat16, inductor's `emulate_precision_casts` does the same for its fused
chains (install_eager_numerics).

Caveats, each handled here or tested:
- the fallbacks use private inductor APIs and apply process-wide: torch is pinned, and the compiled exactness
  suite (tests/engine/test_compiled_exactness.py) compares every step with eager bit for bit, so drift fails CI;
- the fallback set is not part of inductor's FX-graph cache key: a cache shared with a process that compiled
  without it would serve non-exact kernels, so the inductor cache directory is namespaced by torch's version and
  a hash of the fallback set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo.config
import torch.fx.experimental._config
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Ops whose inductor kernels round differently from ATen's (see the module docstring).
ATEN_FALLBACKS = ("mean", "cos", "sin", "native_layer_norm", "sigmoid", "gelu")
_installed = False


def install_eager_numerics() -> None:
    """Process-wide, idempotent: make inductor call ATen for `ATEN_FALLBACKS`, emulate eager's half-precision
    rounding, and give it a cache directory of its own (under $TORCHINDUCTOR_CACHE_DIR or inductor's default)."""
    global _installed
    if _installed:
        return
    import torch._inductor.config as inductor_config
    from torch._inductor import decomposition, lowering
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Half precision: inductor computes fused element-wise chains in float32 and rounds once at the end, where eager
    # rounds after every op; emulating eager's casts keeps bfloat16 bit-identical too (measured: without it, 1 of 5
    # tiny-LLaVA requests changed tokens; with it, every logprob equal).
    inductor_config.emulate_precision_casts = True
    for name in ATEN_FALLBACKS:
        packet = getattr(torch.ops.aten, name)
        for overload in [packet, *(getattr(packet, o) for o in packet.overloads())]:
            decomposition.decompositions.pop(overload, None)  # else inductor decomposes before it lowers
        lowering.make_fallback(packet, warn=False, override_decomp=True)
    tag = hashlib.sha256(",".join([*ATEN_FALLBACKS, "emulate_precision_casts"]).encode()).hexdigest()[:12]
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    directory = os.path.join(base, f"mmserve-torch{torch.__version__}-{tag}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    logger.info("torch.compile: ATen numerics for %s; inductor cache %s", ", ".join(ATEN_FALLBACKS), directory)
    _installed = True


class CompiledForward:
    """A forward through `torch.compile(dynamic=True)`, called under `tracing_settings()`."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        install_eager_numerics()
        self.eager = forward
        self._compiled: Callable[..., Any] = torch.compile(forward, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with tracing_settings():
            return self._compiled(*args, **kwargs)


def compile_layers(model: torch.nn.Module) -> list[str]:
    """Compile, in place, the `forward` of each decoder layer of `model` (members of a ModuleList whose class the
    Hugging Face model lists in `_no_split_modules`); returns their names. Each traces on its first call (warm-up).

    Layers, not the whole model: HF's model-level forwards record outputs through hooks and a global registry
    (transformers.utils.output_capturing) that dynamo guards on, so the model-level graph recompiles whenever another
    model is created in the process (the vision tower, say). A layer is plain tensor code around our attention op,
    every layer of a stack shares its graphs (same code, parameters as inputs, `layer_idx` symbolic), and it holds
    what fusion gains: norm, activation, RoPE and residual element-wise ops. Only `forward` is compiled, so the
    layer's hooks stay eager."""
    layer_classes = {
        name
        for sub in model.modules()
        if isinstance(sub, PreTrainedModel)
        for name in (getattr(sub, "_no_split_modules", None) or ())
    }
    layers = [
        (f"{list_name}.{index}", layer)
        for list_name, sub in model.named_modules()
        if isinstance(sub, torch.nn.ModuleList)
        for index, layer in enumerate(sub)
        if type(layer).__name__ in layer_classes
    ]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to compile found (use --no-compile)")
    for _, layer in layers:
        if not isinstance(layer.forward, CompiledForward):  # a model shared by several engines is compiled once
            layer.forward = CompiledForward(layer.forward)
    return [name for name, _ in layers]


def uncompile_layers(model: torch.nn.Module) -> None:
    """Undo `compile_layers`: every layer's own forward again."""
    for layer in model.modules():
        forward = layer.__dict__.get("forward")
        if isinstance(forward, CompiledForward):
            layer.forward = forward.eager


# How our layers are traced (read by dynamo only when it compiles, but set around every compiled call, since a call
# may compile):
# - sizes are not specialized where torch can avoid it (`backed_size_oblivious`); a one-token step still gets a graph
#   of its own (a stride computation specializes on size 1): two graphs, both made at warm-up;
# - a module's int attributes (an attention's `layer_idx`, which it passes to our op) are symbolic ints, not
#   constants: else every layer of a stack would be a graph of its own;
# - floats stay constants (`specialize_float`): as graph inputs, OPT's `q * self.scaling` rounded unlike eager;
# - HF wraps every layer class's forward in one function (`forward_with_checkpointing`), so all models of a process
#   share dynamo's cache entries for that code: a higher limit than the default 8 before dynamo gives up and runs
#   eagerly (several models in one process, as in the tests).
_TRACING_SETTINGS: tuple[tuple[Any, str, object], ...] = (
    (torch.fx.experimental._config, "backed_size_oblivious", True),
    (torch._dynamo.config, "allow_unspec_int_on_nn_module", True),
    (torch._dynamo.config, "specialize_float", True),
    (torch._dynamo.config, "recompile_limit", 64),
)
_settings_lock = threading.Lock()
_settings_depth = 0  # callers inside tracing_settings(), all threads: set on the first entry, restored on the last exit
_settings_saved: list[object] = []


@contextlib.contextmanager
def tracing_settings() -> Iterator[None]:
    """`_TRACING_SETTINGS` for the duration (nestable, thread-safe). Plain attribute sets, ~1 us when already active:
    `config.patch()` costs ~150 us, which per layer per step was 10% of a batch-1 decode step. The model runner holds
    it around the whole forward, so the layers' own entries are only a depth count."""
    global _settings_depth, _settings_saved
    with _settings_lock:
        if _settings_depth == 0:
            _settings_saved = [getattr(module, name) for module, name, _ in _TRACING_SETTINGS]
            for module, name, value in _TRACING_SETTINGS:
                setattr(module, name, value)
        _settings_depth += 1
    try:
        yield
    finally:
        with _settings_lock:
            _settings_depth -= 1
            if _settings_depth == 0:
                for (module, name, _), value in zip(_TRACING_SETTINGS, _settings_saved, strict=True):
                    setattr(module, name, value)
