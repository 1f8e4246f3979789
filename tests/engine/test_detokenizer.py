"""IncrementalDetokenizer against full decode() with tiny byte-level BPE and Llama-style tokenizers trained here."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, cast

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from generator_service.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer

SPECIAL_TOKENS = ["<s>", "</s>", "<image>", "<pad>"]
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serving", "engine", "streams", "cache"]
_ACCENTED = ["café", "naïve", "über", "señor", "façade", "Ångström", "crème", "brûlée", "jalapeño", "déjà", "vu"]
_CJK = ["你好", "世界", "日本語", "東京", "한국어", "模型", "图像", "缓存", "生成"]
_EMOJI = ["😀", "🚀", "👍🏽", "🇫🇷", "❤️", "👨\u200d👩\u200d👧", "🎉", "🙂"]
# Characters absent from the training corpus: the byte-level BPE splits them into single bytes, the Llama-style
# tokenizer falls back to <0xNN> byte tokens. Either way one character spans several tokens.
UNSEEN = "🦀 龍 🧪 ß"


def corpus(num_lines: int = 300) -> list[str]:
    rng = random.Random(0)
    pool = _WORDS * 3 + _ACCENTED + _CJK + _EMOJI
    return [
        " ".join(rng.choice(pool) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", ""])
        for _ in range(num_lines)
    ]


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerBase:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerBase:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return wrap(tokenizer)


@pytest.fixture(scope="module")
def llama_style() -> PreTrainedTokenizerBase:
    """SentencePiece-like, as transformers builds LLaVA's Llama tokenizer: "▁" spaces, byte fallback, Strip decoder."""
    tokenizer = Tokenizer(models.BPE(unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS))
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    strip = decoders.Strip(content=" ", left=1, right=0)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), strip])
    return wrap(tokenizer)


@pytest.fixture(params=["byte_level", "llama_style"])
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return cast(PreTrainedTokenizerBase, request.getfixturevalue(request.param))


def full_decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return cast(str, tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return cast(list[int], tokenizer.encode(text, add_special_tokens=False))


def stream(
    detokenizer: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random | None = None
) -> list[DetokenizerDelta]:
    """Feed ids in chunks of 1 token (or 1-3 random-sized chunks with rng); flush unless stopped."""
    deltas, position = [], 0
    while position < len(ids) and not detokenizer.stopped:
        size = rng.randint(1, 3) if rng else 1
        deltas.append(detokenizer.step(ids[position : position + size]))
        position += size
    if not detokenizer.stopped:
        deltas.append(DetokenizerDelta(detokenizer.flush()))
    return deltas


def test_random_token_ids_stream_equals_full_decode(byte_level: PreTrainedTokenizerBase) -> None:
    """Random ids (specials, lone bytes, invalid UTF-8 included) in random chunks add up to decode(ids)."""
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(byte_level)) for _ in range(rng.randint(1, 40))]
        detokenizer = IncrementalDetokenizer(byte_level)
        streamed = "".join(d.text for d in stream(detokenizer, ids, rng))
        assert streamed == full_decode(byte_level, ids), ids
        assert detokenizer.output_text == streamed


def test_encoded_text_streams_without_replacement_chars(any_tokenizer: PreTrainedTokenizerBase) -> None:
    rng = random.Random(2)
    lines = [*corpus(40), f"{UNSEEN} then text", f"text then {UNSEEN}", "🦀🦀龍"]
    for line in lines:
        ids = encode(any_tokenizer, line)
        deltas = stream(IncrementalDetokenizer(any_tokenizer), ids, rng)
        assert "".join(d.text for d in deltas) == full_decode(any_tokenizer, ids) == line
        assert not any("\ufffd" in d.text for d in deltas), [d.text for d in deltas]


def test_emoji_split_across_tokens_is_held_until_complete(any_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(any_tokenizer, "a🦀b")
    assert len(ids) >= 4, "the emoji must span several tokens for this test to mean anything"
    texts = [d.text for d in stream(IncrementalDetokenizer(any_tokenizer), ids)]
    assert "🦀" in texts  # emitted whole, in one delta, by the token that completed it
    a_at, completed_at = texts.index("a"), texts.index("🦀")
    assert completed_at - a_at >= 3  # at least two tokens carried its first bytes...
    assert texts[a_at + 1 : completed_at] == [""] * (completed_at - a_at - 1)  # ...and they emitted nothing
    assert "".join(texts) == "a🦀b"


def test_first_output_token_space_matches_decode_of_output(llama_style: PreTrainedTokenizerBase) -> None:
    ids = encode(llama_style, "the cache")  # starts with a "▁" piece whose space decode() strips
    assert "".join(d.text for d in stream(IncrementalDetokenizer(llama_style), ids)) == "the cache"


def split_points(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int]:
    """Character offset in the decoded text where each token's text ends."""
    return [len(full_decode(tokenizer, ids[: i + 1])) for i in range(len(ids))]


@pytest.mark.parametrize("tokens_spanned", [2, 3])
def test_stop_string_across_tokens_is_found_and_never_leaked(
    any_tokenizer: PreTrainedTokenizerBase, tokens_spanned: int
) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    ids = encode(any_tokenizer, text)
    ends = split_points(any_tokenizer, ids)
    # Stop string: from the last char of token 3 to the first char of token 3 + tokens_spanned - 1.
    start, stop_end = ends[3] - 1, ends[3 + tokens_spanned - 2] + 1
    stop = text[start:stop_end]
    assert text.find(stop) == start
    detokenizer = IncrementalDetokenizer(any_tokenizer, stop=[stop])
    deltas = stream(detokenizer, ids)
    streamed = ""
    for delta in deltas:
        streamed += delta.text
        assert text[:start].startswith(streamed)  # never any part of the stop string, at any step
    assert streamed == text[:start] == detokenizer.output_text
    assert deltas[-1] == DetokenizerDelta(deltas[-1].text, True, stop)
    assert len(deltas) == 3 + tokens_spanned  # stopped by the token that completed the stop string
    assert detokenizer.step(ids[-1:]) == DetokenizerDelta("", True, stop)
    assert detokenizer.flush() == ""


def test_earliest_of_several_stop_strings_wins(byte_level: PreTrainedTokenizerBase) -> None:
    text = "the lazy dog jumps over the fox"
    detokenizer = IncrementalDetokenizer(byte_level, stop=["fox", "dog jumps", "over", "zzz"])
    deltas = stream(detokenizer, encode(byte_level, text), random.Random(3))
    assert "".join(d.text for d in deltas) == "the lazy "
    assert deltas[-1].stop_string == "dog jumps"


def test_stop_at_the_very_first_token(any_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(any_tokenizer, "the quick fox")
    first = full_decode(any_tokenizer, ids[:1])
    detokenizer = IncrementalDetokenizer(any_tokenizer, stop=[first[:2] or first])
    assert detokenizer.step(ids[:1]) == DetokenizerDelta("", True, first[:2] or first)
    assert detokenizer.output_text == ""


def test_possible_stop_prefix_is_held_then_released(byte_level: PreTrainedTokenizerBase) -> None:
    detokenizer = IncrementalDetokenizer(byte_level, stop=["dog!", "y do!"])
    deltas = stream(detokenizer, encode(byte_level, "the lazy dog"))
    streamed = [sum(len(d.text) for d in deltas[: i + 1]) for i in range(len(deltas))]
    assert all(length <= len("the laz") for length in streamed[:-2])  # "y", "y d", "y do" held: could be "y do!"
    assert deltas[-1].text == "dog" and not detokenizer.stopped  # held as a possible "dog!"; flush releases it
    assert "".join(d.text for d in deltas) == "the lazy dog"


def test_special_tokens_skipped_or_kept(byte_level: PreTrainedTokenizerBase) -> None:
    image, bos, eos = (cast(int, byte_level.convert_tokens_to_ids(t)) for t in ("<image>", "<s>", "</s>"))
    ids = [bos, *encode(byte_level, "café "), image, image, *encode(byte_level, "🚀 ok"), eos]
    skipped = "".join(d.text for d in stream(IncrementalDetokenizer(byte_level), ids))
    assert skipped == "café 🚀 ok"
    kept = "".join(d.text for d in stream(IncrementalDetokenizer(byte_level, skip_special_tokens=False), ids))
    assert kept == full_decode(byte_level, ids, skip_special_tokens=False) == "<s>café <image><image>🚀 ok</s>"


def test_each_step_decodes_a_short_window(byte_level: PreTrainedTokenizerBase) -> None:
    """Long outputs must not be re-decoded whole every step."""
    decoded_lengths: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            decoded_lengths.append(len(ids))
            return full_decode(byte_level, ids, kwargs["skip_special_tokens"])

    ids = encode(byte_level, " ".join(corpus(100)))
    detokenizer = IncrementalDetokenizer(cast(PreTrainedTokenizerBase, CountingTokenizer()))
    assert "".join(d.text for d in stream(detokenizer, ids)) == full_decode(byte_level, ids)
    assert len(ids) > 500 and max(decoded_lengths) <= 12


def test_rejects_empty_stop_string(byte_level: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(byte_level, stop=["ok", ""])
