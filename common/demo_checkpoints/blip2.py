"""Random-weight BLIP-2 (`Blip2ForConditionalGeneration`: ViT + QFormer + OPT) and InstructBLIP
(`InstructBlipForConditionalGeneration`: ViT + instruction-reading QFormer + Llama) checkpoints.

Each loads offline with `AutoProcessor.from_pretrained` and the HF model class's `from_pretrained`, like a
`Salesforce/blip2-*` / `Salesforce/instructblip-*` checkpoint: `config.json`, `model.safetensors`, the language
model's tokenizer, a `processor_config.json` holding the image processor and `num_query_tokens`, and for
InstructBLIP a BERT-style WordPiece tokenizer for the QFormer in `qformer_tokenizer/`.

The tokenizer has `<image>` as a special token but no `image_token` attribute, like the hub's OPT and Vicuna
tokenizers: the processor then registers `<image>` itself and puts `num_query_tokens` of them in front of the
text. HF initialises `query_tokens` to zeros, which makes every query row identical; here they are random so
that a row-order bug in an image span changes the tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from common.demo_checkpoints.parts import (
    CORPUS_PATH,
    IMAGE_TOKEN,
    SizePreset,
    build_tokenizer,
    check_choice,
    save_checkpoint,
    seeded,
    set_special_ids,
    size_preset,
    special_token_ids,
    text_config,
)

VISION_CHOICES = ("blip",)  # the BLIP ViT (EVA-CLIP in the originals): the families' own vision model
TEXT_CHOICES = ("opt", "llama")  # BLIP-2's OPT, InstructBLIP's Vicuna; Flan-T5 variants are not served
QUERY_TOKENS = {"tiny": 8, "bench": 32}  # the hub checkpoints use 32
QFORMER_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
QFORMER_VOCAB_SIZE = 400


def build_blip2(
    out_dir: str | Path,
    *,
    vision: str = "blip",
    text: str = "opt",
    size: str = "tiny",
    seed: int = 0,
    num_query_tokens: int | None = None,
) -> Path:
    """Write a random-weight BLIP-2 checkpoint to `out_dir` and return its path. Same arguments, same files."""
    check_choice("vision", vision, VISION_CHOICES)
    check_choice("text", text, TEXT_CHOICES)
    preset = size_preset(size)
    queries = num_query_tokens or QUERY_TOKENS[size]
    tokenizer = lm_tokenizer(preset)
    special_ids = special_token_ids(tokenizer)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**vision_settings(preset)),
        qformer_config=Blip2QFormerConfig(**qformer_settings(preset)),
        text_config=text_config(text, preset, len(tokenizer), special_ids),
        num_query_tokens=queries,
        image_token_index=special_ids[IMAGE_TOKEN],
        initializer_range=preset.initializer_range,
    )
    set_special_ids(config, special_ids)
    seeded(seed)
    model = with_random_queries(Blip2ForConditionalGeneration(config), preset)
    processor = Blip2Processor(image_processor=image_processor(preset), tokenizer=tokenizer, num_query_tokens=queries)
    description = describe("blip2", vision, text, size, seed, queries)
    return save_checkpoint(out_dir, model, processor, description)


def build_instructblip(
    out_dir: str | Path,
    *,
    vision: str = "blip",
    text: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    num_query_tokens: int | None = None,
) -> Path:
    """Write a random-weight InstructBLIP checkpoint to `out_dir` and return its path. Same arguments, same files."""
    check_choice("vision", vision, VISION_CHOICES)
    check_choice("text", text, TEXT_CHOICES)
    preset = size_preset(size)
    queries = num_query_tokens or QUERY_TOKENS[size]
    tokenizer = lm_tokenizer(preset)
    special_ids = special_token_ids(tokenizer)
    qformer_tokenizer = build_qformer_tokenizer()
    qformer = InstructBlipQFormerConfig(
        **qformer_settings(preset),
        vocab_size=len(qformer_tokenizer),
        pad_token_id=qformer_tokenizer.pad_token_id,
    )
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**vision_settings(preset)),
        qformer_config=qformer,
        text_config=text_config(text, preset, len(tokenizer), special_ids),
        num_query_tokens=queries,
        image_token_index=special_ids[IMAGE_TOKEN],
        initializer_range=preset.initializer_range,
    )
    set_special_ids(config, special_ids)
    seeded(seed)
    model = with_random_queries(InstructBlipForConditionalGeneration(config), preset)
    processor = InstructBlipProcessor(
        image_processor=image_processor(preset),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=queries,
    )
    description = describe("instructblip", vision, text, size, seed, queries)
    return save_checkpoint(out_dir, model, processor, description)


def vision_settings(preset: SizePreset) -> dict[str, Any]:
    # Blip2VisionConfig's own default initializer_range is 1e-10: set it, or the tower is nearly constant.
    return dict(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        initializer_range=preset.initializer_range,
    )


def qformer_settings(preset: SizePreset) -> dict[str, Any]:
    # Cross-attention to the image in every other layer, as in the hub checkpoints (cross_attention_frequency 2).
    return dict(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.vision_heads,
        cross_attention_frequency=2,
        encoder_hidden_size=preset.vision_hidden,
        initializer_range=preset.initializer_range,
    )


def with_random_queries(model: PreTrainedModel, preset: SizePreset) -> PreTrainedModel:
    """HF initialises the query tokens to zeros (identical rows): draw them like the other weights."""
    with torch.no_grad():
        model.get_parameter("query_tokens").normal_(mean=0.0, std=preset.initializer_range)
    return model.eval()


def lm_tokenizer(preset: SizePreset) -> PreTrainedTokenizerFast:
    """The shared byte-level BPE, without the `image_token` attribute (BLIP processors add `<image>` themselves
    and fail on a plain-string `tokenizer.image_token`)."""
    shared = build_tokenizer(preset.vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=shared.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )


def build_qformer_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer trained on the bundled corpus: `[CLS] text [SEP]`, like the
    `bert-base-uncased` tokenizer InstructBLIP's QFormer reads instructions with."""
    # The vocabulary is built here rather than by tokenizers' WordPieceTrainer, whose "##" pieces get ids in a hash
    # map's order (its vocabulary differed between runs): the specials, every character alone and as "##"
    # continuation, then whole words by frequency (ties alphabetical). Greedy longest-match WordPiece then reads
    # any text. Same corpus, same files.
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    counts = Counter(
        word for line in lines for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    alphabet = sorted({char for word in counts for char in word})
    vocab = [*QFORMER_SPECIAL_TOKENS, *alphabet, *(f"##{char}" for char in alphabet)]
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    vocab += words[: max(0, QFORMER_VOCAB_SIZE - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def image_processor(preset: SizePreset) -> BlipImageProcessorPil:
    side = preset.image_size
    return BlipImageProcessorPil(size={"height": side, "width": side})


def describe(family: str, vision: str, text: str, size: str, seed: int, queries: int) -> dict[str, Any]:
    return {
        "family": family,
        "vision": vision,
        "text": text,
        "size": size,
        "seed": seed,
        "num_query_tokens": queries,
    }
