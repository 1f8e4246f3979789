"""The one hashing module: encoder fingerprints, image keys and KV prefix-block hashes.

Every hash here is SHA-256 over an unambiguous byte encoding (length-prefixed or fixed-width fields),
never Python's `hash()`: the same image must map to the same key in every process and replica, and a
crafted input must not collide with another (vLLM's CVEs came from `hash()` and from hashing pixels
without their shape).

    image key   = SHA256("mmserve-image-v1" | fingerprint | raw image bytes [| "condition" | condition])
    PIL image   = raw image bytes are b"pil-rgb:<W>x<H>:" + the RGB pixels (offline API images have no file)
    block hash  = SHA256("mmserve-block-v1" | parent hash | token ids (int64 LE) | (image key, offset)*)

The image key is the Redis key suffix, the generator's embedding-cache key and the `extra` of the prefix
block hash, so one image is named the same everywhere. No torch, grpc or redis imports: the block manager
uses this module and must stay pure Python.
"""

from __future__ import annotations

import hashlib
import json
import struct
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_KEY_PREFIX = "mmserve:emb:"

_IMAGE_DOMAIN = b"mmserve-image-v1"
_BLOCK_DOMAIN = b"mmserve-block-v1"
_FINGERPRINT_DOMAIN = b"mmserve-encoder-fingerprint-v1"
_CONDITION_TAG = b"condition"


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def fingerprint_digest(parts: Mapping[str, Any]) -> str:
    """Hex digest of a JSON-serialisable description of an encoder (weights digest, config, dtype...).

    Keys are sorted, so the same description always gives the same fingerprint.
    """
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_FINGERPRINT_DOMAIN + _length_prefixed(canonical.encode())).hexdigest()


def image_key(fingerprint: str, image_bytes: bytes, condition: str | None = None) -> str:
    """The content key of one image under one encoder: hex SHA-256, computed without decoding the image.

    `condition` is what else the embedding depends on (InstructBLIP's instruction; see
    `ModelFamily.embedding_condition`): the same image under two conditions has two keys. None adds nothing, so
    keys of families without a condition are unchanged.
    """
    digest = hashlib.sha256(_IMAGE_DOMAIN)
    digest.update(_length_prefixed(fingerprint.encode()))
    digest.update(struct.pack("<Q", len(image_bytes)))
    digest.update(image_bytes)
    if condition is not None:
        digest.update(_CONDITION_TAG + _length_prefixed(condition.encode()))
    return digest.hexdigest()


def pil_image_bytes(mode_rgb_size: tuple[int, int], rgb_pixels: bytes) -> bytes:
    """What a decoded RGB image is keyed by: its exact pixels with their size (never pixels alone)."""
    width, height = mode_rgb_size
    return b"pil-rgb:%dx%d:" % (width, height) + rgb_pixels


def redis_key(key: str) -> str:
    """The Redis key under which the embedding of image `key` is stored."""
    return IMAGE_KEY_PREFIX + key


def block_hash(
    parent_hash: bytes | None,
    token_ids: Sequence[int],
    extra: Sequence[tuple[str, int]] = (),
) -> bytes:
    """Hash of one full KV block, chained to the hash of the block before it (None for the first block).

    `extra` holds `(image_key, row)` for every image span overlapping the block (row: the embedding row of the
    block's first token, relative to the span; see block_manager._image_extra): image placeholder
    token ids are identical for all images, so without it two different images would share KV blocks.
    """
    digest = hashlib.sha256(_BLOCK_DOMAIN)
    digest.update(parent_hash if parent_hash is not None else b"\0" * 32)
    ids = array("q", token_ids)
    digest.update(struct.pack("<Q", len(ids)))
    digest.update(ids.tobytes() if ids.itemsize == 8 and _LITTLE_ENDIAN else _int64_le(token_ids))
    digest.update(struct.pack("<Q", len(extra)))
    for key, offset in extra:
        digest.update(_length_prefixed(key.encode()))
        digest.update(struct.pack("<q", offset))
    return digest.digest()


def _int64_le(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


_LITTLE_ENDIAN = array("H", [1]).tobytes() == b"\x01\x00"
