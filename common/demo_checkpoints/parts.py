"""What every demo checkpoint shares: size presets, the byte-level BPE tokenizer, vision and text configs.

The tokenizer is a byte-level BPE trained on `assets/corpus.txt` with the `tokenizers` library: every UTF-8
string tokenizes (the 256 byte symbols are in the base alphabet), `<image>` is a special token, and `<s>` is
prepended like LLaVA's Llama tokenizer does.

The `tiny` preset uses `initializer_range=0.2`: at HF's default 0.02 attention is close to uniform and position
or masking bugs still give the "right" tokens (see shared/notes/hf-seam.md). The `bench` preset is sized like a
real deployment's shapes, scaled down: a CLIP-B/16 tower at 224 px and a ~30M-parameter GQA language model. The
`7b` preset has LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px, Llama-7B, vocabulary 32064) in bfloat16, for the
GPU check (`benchmarks/gpu_check.py`); its tokenizer is trained on the corpus plus seeded filler words, which is
what it takes for the BPE to reach 32064 tokens (the corpus alone yields ~1,300). Only LLaVA-style builders take it.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)

CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "corpus.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"
VISION_CHOICES = ("clip", "siglip")
TEXT_CHOICES = ("llama", "qwen2", "mistral", "opt")


@dataclass(frozen=True)
class SizePreset:
    vocab_size: int  # BPE target size (the corpus may yield fewer tokens)
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    max_position_embeddings: int
    initializer_range: float
    dtype: str = "float32"  # the weights' dtype, drawn and stored (torch attribute name)
    filler_words: int = 0  # seeded random words added to the tokenizer's training text, to reach vocab_size


SIZE_PRESETS = {
    "tiny": SizePreset(
        vocab_size=600, image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, vision_heads=4,
        vision_intermediate=64, text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
        text_intermediate=128, max_position_embeddings=2048, initializer_range=0.2,
    ),
    "bench": SizePreset(
        vocab_size=2000, image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
        vision_intermediate=3072, text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2,
        text_intermediate=1408, max_position_embeddings=4096, initializer_range=0.02,
    ),
    "7b": SizePreset(  # llava-hf/llava-1.5-7b-hf's shapes: ~7.1B parameters, ~14 GB in bfloat16
        vocab_size=32064, image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
        text_intermediate=11008, max_position_embeddings=4096, initializer_range=0.02, dtype="bfloat16",
        filler_words=80_000,
    ),
}  # fmt: skip


def size_preset(size: str) -> SizePreset:
    if size not in SIZE_PRESETS:
        raise ValueError(f"size must be one of {tuple(SIZE_PRESETS)}, got {size!r}")
    return SIZE_PRESETS[size]


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def train_bpe(
    vocab_size: int, special_tokens: Sequence[str], unk_token: str | None = "<unk>", extra_texts: Sequence[str] = ()
) -> Tokenizer:
    """A byte-level BPE trained on the bundled corpus (and `extra_texts`), deterministic; every family's demo
    tokenizer starts from one and adds its own special tokens and BOS rule."""
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator([*lines, *extra_texts], trainer=trainer)
    return tokenizer


def prepend_bos(tokenizer: Tokenizer, bos: str) -> Tokenizer:
    """Make `tokenizer` put `bos` in front of every text it encodes with special tokens (Llama's and Gemma's way)."""
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def build_tokenizer(
    vocab_size: int = SIZE_PRESETS["tiny"].vocab_size, filler_words: int = 0
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the bundled corpus (deterministic), `<s>` prepended as LLaVA's Llama does."""
    tokenizer = prepend_bos(train_bpe(vocab_size, SPECIAL_TOKENS, extra_texts=filler_text(filler_words)), "<s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def filler_text(num_words: int) -> list[str]:
    """`num_words` random lowercase words (3-9 letters, seed 0), 20 to a line: text with enough distinct letter
    pairs for a BPE to learn tens of thousands of merges. Empty for 0, so the small presets' tokenizers are the
    corpus's alone."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(num_words)]
    return [" ".join(words[i : i + 20]) for i in range(0, num_words, 20)]


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int):
            raise TypeError(f"{token!r} did not map to a single id")
        ids[token] = token_id
    return ids


def vision_config(kind: str, size: SizePreset) -> PretrainedConfig:
    check_choice("vision", kind, VISION_CHOICES)
    common: dict[str, Any] = dict(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        initializer_range=size.initializer_range,
    )
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=size.vision_hidden, **common)
    return SiglipVisionConfig(**common)


def text_config(kind: str, size: SizePreset, vocab_size: int, special_ids: dict[str, int]) -> PretrainedConfig:
    """A causal LM config; OPT (BLIP-2's language model) has learned absolute positions and a tied head."""
    check_choice("text", kind, TEXT_CHOICES)
    ids: dict[str, Any] = dict(
        vocab_size=vocab_size,
        bos_token_id=special_ids["<s>"],
        eos_token_id=special_ids["</s>"],
        pad_token_id=special_ids["<pad>"],
        max_position_embeddings=size.max_position_embeddings,
    )
    if kind == "opt":
        return OPTConfig(
            hidden_size=size.text_hidden,
            word_embed_proj_dim=size.text_hidden,
            ffn_dim=size.text_intermediate,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            init_std=size.initializer_range,
            **ids,
        )
    common: dict[str, Any] = dict(
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        initializer_range=size.initializer_range,
        tie_word_embeddings=False,
        **ids,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    return MistralConfig(sliding_window=size.max_position_embeddings, **common)


def set_special_ids(config: PretrainedConfig, special_ids: dict[str, int]) -> None:
    config.bos_token_id = special_ids["<s>"]
    config.eos_token_id = special_ids["</s>"]
    config.pad_token_id = special_ids["<pad>"]


def save_checkpoint(
    out_dir: str | Path,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    description: dict[str, Any],
    hf_processor_name: str | None = None,
) -> Path:
    """Write the model, its processor and a `mmserve_demo.json` describing how it was built.

    `hf_processor_name`: the HF processor class the saved configs name, where `processor` is an images-only
    subclass of it (`ImagesOnlyProcessor`): the checkpoint then looks like a hub one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if model.generation_config is not None and pad_token_id is not None:
        model.generation_config.pad_token_id = pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if hf_processor_name is not None:
        for name in ("processor_config.json", "tokenizer_config.json"):
            settings = json.loads((out / name).read_text())
            settings["processor_class"] = hf_processor_name
            (out / name).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out / "mmserve_demo.json").write_text(json.dumps(description, indent=2) + "\n")
    return out


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


def instantiate(model_class: type[PreTrainedModel], config: PretrainedConfig, preset: SizePreset, device: str) -> Any:
    """The model with random weights drawn on `device` in the preset's dtype, in eval mode.

    float32 on the CPU is the original path, kept as it was so the small presets' files stay byte-identical. Other
    dtypes or devices are created there directly: a 7B model is drawn on a GPU in seconds, in bfloat16 (14 GB, not
    28), and `save_pretrained` copies it out. The device's RNG differs from the CPU's: same seed, other weights.
    """
    if preset.dtype == "float32" and device == "cpu":
        return model_class(config).eval()
    with torch.device(device):
        model = model_class._from_config(config, dtype=getattr(torch, preset.dtype))
    return model.eval()
