"""Build a random-weight LLaVA checkpoint in the standard Hugging Face directory layout.

    python -m common.demo_model OUT_DIR [--vision clip|siglip] [--text llama|qwen2|mistral]
                                        [--size tiny|bench] [--seed N]

Tests, the demo and benchmarks use these checkpoints because no weights can be downloaded here. The output
loads offline with `AutoProcessor.from_pretrained` and `LlavaForConditionalGeneration.from_pretrained`, exactly
like an `llava-hf/*` checkpoint: `config.json`, `model.safetensors`, tokenizer files, an image-processor config
and a chat template.

The tokenizer is a byte-level BPE trained on `assets/corpus.txt` with the `tokenizers` library: every UTF-8
string tokenizes (the 256 byte symbols are in the base alphabet), `<image>` is a special token, and `<s>` is
prepended like LLaVA's Llama tokenizer does.

The `tiny` preset uses `initializer_range=0.2`: at HF's default 0.02 attention is close to uniform and
position or masking bugs still give the "right" tokens (see shared/notes/hf-seam.md). The `bench` preset is
sized like a real deployment's shapes, scaled down: a CLIP-B/16 tower at 224 px and a ~30M-parameter GQA
language model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

CORPUS_PATH = Path(__file__).parent / "assets" / "corpus.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

# LLaVA-1.5-style conversation: "USER: <image>\n<text> ASSISTANT:". Images of a message come before its text,
# as in llava-hf's template; the assistant's turns end with the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


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
}
VISION_CHOICES = ("clip", "siglip")
TEXT_CHOICES = ("llama", "qwen2", "mistral")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the bundled corpus (deterministic)."""
    return _build_tokenizer(SIZE_PRESETS["tiny"].vocab_size)


def _build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise TypeError(f"{token!r} did not map to a single id")
    return token_id


def _vision_config(kind: str, size: SizePreset) -> PretrainedConfig:
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


def _text_config(kind: str, size: SizePreset, vocab_size: int, special_ids: dict[str, int]) -> PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_position_embeddings,
        initializer_range=size.initializer_range,
        bos_token_id=special_ids["<s>"],
        eos_token_id=special_ids["</s>"],
        pad_token_id=special_ids["<pad>"],
        tie_word_embeddings=False,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    return MistralConfig(sliding_window=size.max_position_embeddings, **common)


def build_checkpoint(
    out_dir: str | Path,
    *,
    vision: str = "clip",
    text: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str | None = None,
) -> Path:
    """Write a random-weight LLaVA checkpoint to `out_dir` and return its path. Same arguments, same files."""
    if vision not in VISION_CHOICES:
        raise ValueError(f"vision must be one of {VISION_CHOICES}, got {vision!r}")
    if text not in TEXT_CHOICES:
        raise ValueError(f"text must be one of {TEXT_CHOICES}, got {text!r}")
    if size not in SIZE_PRESETS:
        raise ValueError(f"size must be one of {tuple(SIZE_PRESETS)}, got {size!r}")
    preset = SIZE_PRESETS[size]
    # CLIP has a CLS token that LLaVA's "default" strategy drops; SigLIP has none and uses "full".
    strategy = vision_feature_select_strategy or ("default" if vision == "clip" else "full")

    tokenizer = _build_tokenizer(preset.vocab_size)
    special_ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    llava_kwargs: dict[str, Any] = dict(
        vision_config=_vision_config(vision, preset),
        text_config=_text_config(text, preset, vocab_size, special_ids),
        image_token_index=special_ids[IMAGE_TOKEN],
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=(preset.image_size // preset.patch_size) ** 2,
        initializer_range=preset.initializer_range,
    )
    config = LlavaConfig(**llava_kwargs)
    config.bos_token_id = special_ids["<s>"]
    config.eos_token_id = special_ids["</s>"]
    config.pad_token_id = special_ids["<pad>"]

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = special_ids["<pad>"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _processor(vision, preset, tokenizer, strategy).save_pretrained(out)
    (out / "mmserve_demo.json").write_text(
        json.dumps({"vision": vision, "text": text, "size": size, "seed": seed}, indent=2) + "\n"
    )
    return out


def _processor(vision: str, preset: SizePreset, tokenizer: PreTrainedTokenizerFast, strategy: str) -> LlavaProcessor:
    side = preset.image_size
    image_processor: CLIPImageProcessorPil | SiglipImageProcessorPil
    if vision == "clip":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if vision == "clip" else 0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.demo_model",
        description="Build a random-weight LLaVA checkpoint (Hugging Face layout) for tests, demos and benchmarks.",
    )
    parser.add_argument("out_dir", help="directory to write the checkpoint to (created if missing)")
    parser.add_argument("--vision", choices=VISION_CHOICES, default="clip", help="vision tower (default: clip)")
    parser.add_argument("--text", choices=TEXT_CHOICES, default="llama", help="language model (default: llama)")
    parser.add_argument(
        "--size", choices=tuple(SIZE_PRESETS), default="tiny", help="tiny (tests) or bench (benchmarks); default tiny"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    args = parser.parse_args(argv)
    out = build_checkpoint(args.out_dir, vision=args.vision, text=args.text, size=args.size, seed=args.seed)
    print(f"wrote {args.size} LLaVA checkpoint ({args.vision} + {args.text}, seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
