"""Incremental, UTF-8-safe detokenization of one request's output, with stop strings.

Text is produced with the prefix/read-offset window that vLLM and TGI use, so each step decodes a few tokens,
never the whole output:

    output token ids:  [ ..... emitted ..... | prefix window | read window ]
                                             ^ prefix_offset ^ read_offset ^ len(token_ids)

    prefix_text = decode(ids[prefix_offset:read_offset])     # already emitted, decoded again as context
    new_text    = decode(ids[prefix_offset:])                # context + the new tokens
    delta       = new_text[len(prefix_text):]

Decoding with a context token on the left is what makes the diff correct: byte-level BPE tokens and SentencePiece
"▁" pieces only turn into the right characters (spaces, multi-byte UTF-8) next to their neighbours, and decoders that
strip the leading space of a decode call (Llama's Strip decoder) strip the same token in both windows. A trailing
U+FFFD in new_text means the last token ended inside a multi-byte character: nothing is emitted and the offsets
stay put until a later token completes it. Offsets only advance at character boundaries, so the concatenated deltas
equal `decode(output_ids)`.

Stop strings are then searched for in the not-yet-streamed text only (the held-back tail plus the new delta), and
the longest suffix that could still grow into a stop string is held back, so no part of a stop string is ever
streamed. The text is truncated before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT_CHAR = "\ufffd"  # what decode() yields for bytes of an incomplete UTF-8 character


@dataclass(frozen=True)
class DetokenizerDelta:
    """Text that is safe to stream after one step; `stopped` when a stop string ended the output."""

    text: str
    stopped: bool = False
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output token ids into streamable text, step by step.

    The streamed text (all `step()` deltas plus `flush()`) equals `tokenizer.decode(output_ids,
    skip_special_tokens=..., clean_up_tokenization_spaces=False)` unless a stop string cut it short.
    Decoding starts at the first output token, with no prompt context: for SentencePiece tokenizers (LLaVA's
    Llama) the first output token then loses its leading "▁" space exactly as in HF's `decode(output_ids)`.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        # Every proper prefix of a stop string: a text tail equal to one of them must be held back.
        self._stop_prefixes = frozenset(s[:n] for s in self._stop for n in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stop), default=0)
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted: list[str] = []  # streamed chunks; joined only when output_text is read
        self._held = ""  # decoded text not streamed yet because it may be the start of a stop string
        self._stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_string is not None

    @property
    def output_text(self) -> str:
        """All text decoded so far: what was streamed plus the held-back tail (truncated at a stop string)."""
        return "".join(self._emitted) + self._held

    def step(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add the tokens sampled this step; return the text that can be streamed now.

        After a stop string has matched, further calls return empty deltas with stopped=True.
        """
        if self.stopped:
            return DetokenizerDelta("", True, self._stop_string)
        self._token_ids.extend(new_token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At finish (max_tokens, EOS, stop token): the text still held back, incomplete characters included."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True).text

    def _decode(self, token_ids: list[int]) -> str:
        # No clean-up: its " ." -> "." style rewrites are not local to a window, so window diffs would not add up.
        text = self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
        return text

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        # Wait when the new tokens add nothing yet (skipped special tokens, a partial byte sequence decoded to
        # nothing) or end inside a multi-byte character; at finish, take whatever decode() makes of it.
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _release(self, new_text: str, final: bool) -> DetokenizerDelta:
        # Only `pending` can contain a new stop string: the streamed text before it has no suffix that starts one
        # (it would have been held back), so this is the "new tail plus max(len(stop)) - 1 overlap" search.
        pending = self._held + new_text
        match = self._find_stop(pending)
        if match is not None:
            index, self._stop_string = match
            text, self._held = pending[:index], ""
            self._emitted.append(text)
            return DetokenizerDelta(text, True, self._stop_string)
        hold = 0 if final else self._stop_prefix_length(pending)
        text, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        if text:
            self._emitted.append(text)
        return DetokenizerDelta(text)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """(start index, stop string) of the earliest match; the first listed wins a tie."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = text.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string (0 if none)."""
        for length in range(min(self._max_hold, len(text)), 0, -1):
            if text[-length:] in self._stop_prefixes:
                return length
        return 0
