"""Load one half of a Hugging Face LLaVA checkpoint without materialising the other half.

The encoder needs the vision tower and the projector; the generator needs the language model and its head.
Loading the full `LlavaForConditionalGeneration` on both sides would double the memory of each service, so we
read the safetensors files ourselves and keep only the tensors of the wanted half.

Checkpoint key layouts in the wild (all handled here):

    in-memory name (5.x)           save_pretrained (5.x)        llava-hf hub (legacy)
    model.vision_tower.X           vision_tower.X               vision_tower.vision_model.X
    model.multi_modal_projector.X  multi_modal_projector.X      multi_modal_projector.X
    model.language_model.X         language_model.model.X       language_model.model.X
    lm_head.X                      language_model.lm_head.X     language_model.lm_head.X

Modules are built from the config with HF's initialisation turned off (their parameters are then replaced by
the loaded tensors), so buffers that are not stored in checkpoints (CLIP's position ids, rotary frequencies)
are computed as usual. `LoadReport` records which checkpoint tensors were read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlavaConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from common.hashing import fingerprint_digest

# Checkpoint key -> (part, name inside that part's module). First match wins.
_PART_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vision_tower", re.compile(r"^(?:model\.)?vision_tower\.")),
    ("projector", re.compile(r"^(?:model\.)?multi_modal_projector\.")),
    ("language_model", re.compile(r"^(?:model\.language_model\.|language_model\.model\.)")),
    ("lm_head", re.compile(r"^(?:language_model\.)?lm_head\.")),
)
VISION_PARTS = ("vision_tower", "projector")
TEXT_PARTS = ("language_model", "lm_head")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint is missing, incomplete or not a LLaVA checkpoint; the message says which file or key."""


@dataclass
class LoadReport:
    """Which checkpoint tensors a half-load read (and how many bytes), for logs and tests."""

    tensors_read: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tensors_skipped: int = 0


@dataclass
class VisionHalf:
    config: LlavaConfig
    vision_tower: PreTrainedModel
    projector: nn.Module
    report: LoadReport


@dataclass
class TextHalf:
    config: LlavaConfig
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


def load_llava_config(path: Path) -> LlavaConfig:
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, LlavaConfig):
        raise CheckpointError(
            f"{path} holds a {type(config).__name__} ({config.model_type!r}); mmserve serves LLaVA checkpoints"
        )
    return config


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json (only safetensors load)")


def _classify(key: str) -> tuple[str, str] | None:
    for part, pattern in _PART_PATTERNS:
        match = pattern.match(key)
        if match:
            return part, key[match.end():]
    return None


def _part_tensors(path: Path, parts: tuple[str, ...]) -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
    """Yield (part, local name, loader) for every checkpoint tensor of `parts`; others are never read."""
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                classified = _classify(key)
                if classified is None or classified[0] not in parts:
                    continue
                part, local = classified
                yield part, local, functools.partial(handle.get_tensor, key)


def _build_empty(factory: Callable[[], nn.Module], device: str) -> nn.Module:
    # HF init off: parameters are allocated but not initialised (they are all replaced below), while
    # non-persistent buffers (position ids, rotary inv_freq) are computed by the constructors as usual.
    with torch.device(device), no_init_weights():
        return factory()


def _load_into(
    modules: dict[str, nn.Module],
    path: Path,
    dtype: torch.dtype,
    device: str,
    report: LoadReport,
    optional_parts: frozenset[str] = frozenset(),
) -> None:
    expected = {part: set(module.state_dict()) for part, module in modules.items()}
    loaded: dict[str, dict[str, torch.Tensor]] = {part: {} for part in modules}
    for part, local, load in _part_tensors(path, tuple(modules)):
        name = _match_name(local, expected[part])
        if name is None:
            report.tensors_skipped += 1  # e.g. a SigLIP pooling head that LLaVA never calls
            continue
        tensor = load()
        report.tensors_read.append(f"{part}.{name}")
        report.bytes_read += tensor.numel() * tensor.element_size()
        loaded[part][name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    for part, module in modules.items():
        missing = expected[part] - set(loaded[part])
        if missing and not (part in optional_parts and not loaded[part]):
            raise CheckpointError(f"{path}: {part} weights missing from the checkpoint: {sorted(missing)[:5]}")
        module.load_state_dict(loaded[part], strict=False, assign=True)


def _match_name(local: str, expected: set[str]) -> str | None:
    """The module's name for a checkpoint tensor; towers saved with or without a `vision_model.` level."""
    for candidate in (local, local.removeprefix("vision_model."), "vision_model." + local):
        if candidate in expected:
            return candidate
    return None



def load_vision_half(
    model: str | Path, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None
) -> VisionHalf:
    """Vision tower + projector of a LLaVA checkpoint; no language-model tensor is read."""
    path = resolve_checkpoint(str(model), revision)
    config = load_llava_config(path)
    modules: dict[str, nn.Module] = {
        "vision_tower": _build_empty(lambda: AutoModel.from_config(config.vision_config), device),
        "projector": _build_empty(lambda: LlavaMultiModalProjector(config), device),
    }
    report = LoadReport()
    _load_into(modules, path, torch_dtype(dtype), device, report)
    tower, projector = modules["vision_tower"], modules["projector"]
    if not isinstance(tower, PreTrainedModel):
        raise CheckpointError(f"{path}: the vision config builds a {type(tower).__name__}, not a transformers model")
    return VisionHalf(config=config, vision_tower=tower.eval(), projector=projector.eval(), report=report)


def load_text_half(
    model: str | Path, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None
) -> TextHalf:
    """Language model + head of a LLaVA checkpoint as a `*ForCausalLM`; no vision tensor is read."""
    path = resolve_checkpoint(str(model), revision)
    config = load_llava_config(path)
    text_config = config.get_text_config()
    causal_lm = _build_empty(lambda: AutoModelForCausalLM.from_config(text_config), device)
    if not isinstance(causal_lm, PreTrainedModel):
        raise CheckpointError(f"{path}: the text config builds a {type(causal_lm).__name__}, not a causal LM")
    report = LoadReport()
    # One module, two checkpoint parts: the decoder stack under `model.`, the head under `lm_head.`.
    split = {"language_model": causal_lm.model, "lm_head": causal_lm.lm_head}
    # A tied head may be absent from the checkpoint (Qwen2-VL-2B, Gemma3): it shares the embedding matrix.
    tied = frozenset({"lm_head"}) if text_config.tie_word_embeddings else frozenset()
    _load_into(split, path, torch_dtype(dtype), device, report, optional_parts=tied)
    if tied:
        causal_lm.lm_head.weight = causal_lm.model.embed_tokens.weight
    return TextHalf(config=config, model=causal_lm.eval(), report=report)


def vision_weights_digest(model: str | Path) -> str:
    """SHA-256 over the vision tower and projector tensors as stored (names, dtypes, shapes, bytes).

    Computed from the safetensors files without torch, so the generator gets the same value as the encoder
    without loading the vision weights; layout-independent, since names are normalised first.
    """
    path = resolve_checkpoint(str(model))
    entries: list[tuple[str, Path, str, list[int], int, int]] = []
    for file in _safetensors_files(path):
        header_size, header = _read_safetensors_header(file)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            classified = _classify(key)
            if classified is None or classified[0] not in VISION_PARTS:
                continue
            part, local = classified
            begin, end = meta["data_offsets"]
            canonical = f"{part}.{local.removeprefix('vision_model.')}"
            entries.append((canonical, file, meta["dtype"], meta["shape"], 8 + header_size + begin, end - begin))
    if not entries:
        raise CheckpointError(f"{path}: no vision tower or projector tensors found")
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
    checkpoints of the same shape do not), the feature layer and select strategy, the image-processor
    settings and the dtype the encoder computes in.
    """
    path = resolve_checkpoint(str(model), revision)
    config = load_llava_config(path)
    return fingerprint_digest(
        {
            "weights": vision_weights_digest(path),
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "image_processor": image_processor_config(path),
            "dtype": dtype,
        }
    )
