"""Load one half of a Hugging Face vision-language checkpoint without materialising the other half.

The encoder needs the vision half (tower, projector, ...); the generator needs the language model and its head.
Loading the full `*ForConditionalGeneration` on both sides would double the memory of each service, so we read
the safetensors files ourselves and keep only the tensors of the wanted half. Which stored key belongs to which
half, and which modules make up the vision half, is the model family's knowledge (`common/models/`).

Modules are built from the config with HF's initialisation turned off (their parameters are then replaced by
the loaded tensors), so buffers that are not stored in checkpoints (CLIP's position ids, rotary frequencies)
are computed as usual. `LoadReport` records which checkpoint tensors were read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from common.errors import CheckpointError
from common.hashing import fingerprint_digest
from common.models import ModelFamily, family_for_config
from common.models.base import Half, VisionModule

_Built = TypeVar("_Built")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadReport:
    """Which checkpoint tensors a half-load read (and how many bytes), for logs and tests."""

    tensors_read: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tensors_skipped: int = 0


@dataclass
class VisionHalf:
    family: ModelFamily
    module: VisionModule  # the family's `build_vision()`, in eval mode, weights exactly as stored
    report: LoadReport

    @property
    def config(self) -> PretrainedConfig:
        return self.family.config


@dataclass
class TextHalf:
    family: ModelFamily
    model: PreTrainedModel  # a *ForCausalLM: `.model` is the decoder stack, `.lm_head` the head
    report: LoadReport


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}: use one of {', '.join(_DTYPES)}") from None


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors, configs, tokenizer) to the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"],
        )
    except Exception as exc:  # network errors, gated repos, missing repos: all surface as one clear message
        raise CheckpointError(f"could not download {model!r} from the Hugging Face hub: {exc}") from exc
    return Path(local)


def load_family(path: Path) -> ModelFamily:
    """The model family of the checkpoint at `path`; UnsupportedArchitectureError lists the supported ones."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:  # unknown model_type, malformed config.json
        raise CheckpointError(f"{path}/config.json could not be read as a Hugging Face config: {exc}") from None
    return family_for_config(config)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json (only safetensors load)")


def _half_tensors(path: Path, family: ModelFamily, half: Half) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Yield (name inside the half's module, loader) for every checkpoint tensor of `half`; others are never read."""
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                classified = family.classify(key)
                if classified is not None and classified[0] == half:
                    yield classified[1], functools.partial(handle.get_tensor, key)


def _build_empty(factory: Callable[[], _Built], device: str) -> _Built:
    # HF init off: parameters are allocated but not initialised (they are all replaced below), while
    # non-persistent buffers (position ids, rotary inv_freq) are computed by the constructors as usual.
    with torch.device(device), no_init_weights():
        return factory()


def _load_into(
    module: nn.Module,
    half: Half,
    path: Path,
    family: ModelFamily,
    dtype: torch.dtype,
    device: str,
    report: LoadReport,
    optional: frozenset[str] = frozenset(),
    float32_prefixes: tuple[str, ...] = (),
) -> None:
    """Fill `module` with the checkpoint's tensors of `half`; every tensor but the `optional` ones must be there.

    Floating-point tensors are cast to `dtype`, except those under `float32_prefixes`, which stay float32."""
    expected = set(module.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    for stored_name, load in _half_tensors(path, family, half):
        name = _match_name(stored_name, expected)
        if name is None:
            report.tensors_skipped += 1  # e.g. a SigLIP pooling head that the family never calls
            continue
        tensor = load()
        report.tensors_read.append(name)
        report.bytes_read += tensor.numel() * tensor.element_size()
        target = tensor.dtype
        if tensor.is_floating_point():
            target = torch.float32 if name.startswith(float32_prefixes) else dtype
        loaded[name] = tensor.to(device=device, dtype=target)
    missing = expected - set(loaded) - optional
    if missing:
        raise CheckpointError(f"{path}: {half} weights missing from the checkpoint: {sorted(missing)[:5]}")
    module.load_state_dict(loaded, strict=False, assign=True)


def _match_name(stored: str, expected: set[str]) -> str | None:
    """The module's name for a stored tensor; vision towers are saved with or without a `vision_model.` level
    (`vision_tower.vision_model.X` on the llava-hf hub, `vision_tower.X` from 5.x save_pretrained)."""
    head, _, rest = stored.partition(".")
    for candidate_rest in (rest, rest.removeprefix("vision_model."), "vision_model." + rest):
        candidate = f"{head}.{candidate_rest}" if rest else head
        if candidate in expected:
            return candidate
    return None


def load_vision_half(
    model: str | Path, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None
) -> VisionHalf:
    """The vision half of a checkpoint (the family's `build_vision()`); no language-model tensor is read."""
    path = resolve_checkpoint(str(model), revision)
    family = load_family(path)
    module = _build_empty(family.build_vision, device)
    report = LoadReport()
    target = torch_dtype(dtype)
    # As Hugging Face does: `_keep_in_fp32_modules` applies to float16 only (bfloat16 has float32's range).
    float32_prefixes = family.float32_modules if target == torch.float16 else ()
    _load_into(module, "vision", path, family, target, device, report, float32_prefixes=float32_prefixes)
    return VisionHalf(family=family, module=module.eval(), report=report)


def load_text_half(
    model: str | Path, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None
) -> TextHalf:
    """Language model + head of a checkpoint as a `*ForCausalLM`; no vision tensor is read."""
    path = resolve_checkpoint(str(model), revision)
    family = load_family(path)
    text_config = family.text_config
    causal_lm = _build_empty(family.build_text, device)
    if not isinstance(causal_lm, PreTrainedModel):
        raise CheckpointError(f"{path}: the text config builds a {type(causal_lm).__name__}, not a causal LM")
    report = LoadReport()
    # A tied head may be absent from the checkpoint (OPT, Qwen2-VL-2B, Gemma3): it shares the embedding matrix.
    # 5.x keeps the flag on the text config, except for models that keep it on the outer one only (Qwen2-VL).
    tie = getattr(text_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(family.config, "tie_word_embeddings", False)
    tied = frozenset({"lm_head.weight"}) if tie else frozenset()
    _load_into(causal_lm, "text", path, family, torch_dtype(dtype), device, report, optional=tied)
    if tied:
        causal_lm.lm_head.weight = causal_lm.get_input_embeddings().weight
    return TextHalf(family=family, model=causal_lm.eval(), report=report)


def vision_weights_digest(model: str | Path) -> str:
    """SHA-256 over the vision-half tensors as stored (names, dtypes, shapes, bytes).

    Computed from the safetensors files without torch, so the generator gets the same value as the encoder
    without loading the vision weights; layout-independent, since names are normalised first.
    """
    path = resolve_checkpoint(str(model))
    family = load_family(path)
    entries: list[tuple[str, Path, str, list[int], int, int]] = []
    for file in _safetensors_files(path):
        header_size, header = _read_safetensors_header(file)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            classified = family.classify(key)
            if classified is None or classified[0] != "vision":
                continue
            head, _, rest = classified[1].partition(".")
            begin, end = meta["data_offsets"]
            canonical = f"{head}.{rest.removeprefix('vision_model.')}"
            entries.append((canonical, file, meta["dtype"], meta["shape"], 8 + header_size + begin, end - begin))
    if not entries:
        raise CheckpointError(f"{path}: no vision tensors found")
    digest = hashlib.sha256(b"mmserve-vision-weights-v1")
    for canonical, file, dtype, shape, offset, length in sorted(entries):
        digest.update(json.dumps([canonical, dtype, shape]).encode())
        with file.open("rb") as handle:
            handle.seek(offset)
            remaining = length
            while remaining:
                chunk = handle.read(min(remaining, 1 << 24))
                if not chunk:
                    raise CheckpointError(f"{file} is truncated (tensor {canonical})")
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


def _read_safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file} is not a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        header = json.loads(handle.read(size))
    return size, header


def load_processor(path: Path) -> Any:
    """The checkpoint's own processor (tokenizer, chat template, placeholder rules) with a PIL image processor.

    torchvision is not a dependency, so the image processor is always the PIL backend (`load_image_processor`),
    whatever backend the processor would pick by itself.
    """
    processor = load_family(path).load_processor(path)
    processor.image_processor = load_image_processor(path)
    return processor


def load_image_processor(path: Path) -> Any:
    """The checkpoint's own image processor, PIL backend (torchvision is not a dependency).

    Reads `processor_config.json` (5.x) or `preprocessor_config.json` (llava-hf hub layout) offline. The class
    comes from the auto module itself: without torchvision, transformers 5.17 exports `AutoImageProcessor` at the
    top level as a placeholder that refuses to load even the PIL processors.
    """
    try:
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    except TypeError:
        processor = None
    if processor is None or type(processor).__name__.endswith("Fast"):
        # transformers releases before the `backend` argument: there the slow processor is the PIL one.
        processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    return processor


def generation_eos_token_ids(path: Path) -> frozenset[int] | None:
    """The end-of-sequence ids of the checkpoint's `generation_config.json` (HF generate stops at any of them), or
    None when it names none."""
    file = path / "generation_config.json"
    if not file.is_file():
        return None
    eos = json.loads(file.read_text()).get("eos_token_id")
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(int(token) for token in ids) or None


def image_placeholder(processor: Any) -> str:
    """The processor's image placeholder text (`<image>` for LLaVA; BLIP-2 keeps it as an AddedToken)."""
    token = processor.image_token
    return str(getattr(token, "content", token))


def image_processor_config(path: Path) -> dict:
    """The checkpoint's image-processor settings as stored (5.x `processor_config.json` or legacy file)."""
    processor_file = path / "processor_config.json"
    if processor_file.is_file():
        nested = json.loads(processor_file.read_text()).get("image_processor")
        if isinstance(nested, dict):
            return nested
    legacy = path / "preprocessor_config.json"
    if legacy.is_file():
        return dict(json.loads(legacy.read_text()))
    raise CheckpointError(f"{path} has no image-processor config (processor_config.json or preprocessor_config.json)")


def encoder_fingerprint(model: str | Path, *, dtype: str, revision: str | None = None) -> str:
    """Identity of everything that determines an image's embedding; part of every image key.

    Weights (content digest, so a re-saved or re-laid-out copy of the same weights matches and two random
    checkpoints of the same shape do not), the family and its embedding settings (for LLaVA the feature layer
    and select strategy), the image-processor settings and the dtype the encoder computes in.
    """
    path = resolve_checkpoint(str(model), revision)
    family = load_family(path)
    return fingerprint_digest(
        {
            "weights": vision_weights_digest(path),
            "family": family.name,
            **family.embedding_identity(),
            "image_processor": image_processor_config(path),
            "dtype": dtype,
        }
    )
