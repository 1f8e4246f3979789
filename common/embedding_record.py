"""The cache record of one image embedding (the value stored under `mmserve:emb:<image key>`).

    offset  size  field
    0       6     magic b"MMEMB\\0"
    6       1     format version (2)
    7       4     header length N (uint32, little-endian)
    11      N     header: UTF-8 JSON
                  {"dtype": "float16", "shape": [576, 4096], "fingerprint": "<hex>", "key": "<hex>"
                   [, "layout": [1, 16, 22]]}   (the family's image layout; absent = none)
    11+N    ...   raw little-endian row-major tensor bytes (exactly prod(shape) * itemsize)

Every field is verified on read: a record with a wrong magic, version, header, fingerprint, image key or
length is rejected (the caller treats it as a miss and deletes it). The header names the image key the record
was written for, so another key's value (same encoder and shape, different image; copied or written under the
wrong Redis key) is rejected instead of returning the wrong image's embedding. Version 1 records (no key in the
header) fail the version check: they are misses, deleted and re-encoded. Nothing in a record is ever executed
(no pickle). Pure Python: no torch needed to check a record.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

MAGIC = b"MMEMB\0"
VERSION = 2  # 2: the header carries the image key (version 1 records are rejected)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_PREFIX = struct.Struct("<6sBI")
_MAX_HEADER = 4096


class RecordError(ValueError):
    """A cache record that fails verification; the message says which check failed."""


@dataclass(frozen=True)
class EmbeddingRecord:
    dtype: str
    shape: tuple[int, ...]
    fingerprint: str
    key: str
    data: bytes
    layout: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise RecordError(f"unsupported dtype {self.dtype!r}")
        if not self.key:
            raise RecordError("record has no image key")
        if len(self.shape) != 2 or any(dim <= 0 for dim in self.shape):
            raise RecordError(f"embedding shape must be [num_tokens, hidden_size], got {list(self.shape)}")
        expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise RecordError(f"payload is {len(self.data)} bytes, shape {list(self.shape)} needs {expected}")
        if any(value < 0 for value in self.layout):
            raise RecordError(f"layout must be non-negative integers, got {list(self.layout)}")


def encode_record(record: EmbeddingRecord) -> bytes:
    fields: dict[str, object] = {
        "dtype": record.dtype,
        "shape": list(record.shape),
        "fingerprint": record.fingerprint,
        "key": record.key,
    }
    if record.layout:
        fields["layout"] = list(record.layout)
    header = json.dumps(fields, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + record.data


def decode_record(blob: bytes, expected_fingerprint: str, expected_key: str) -> EmbeddingRecord:
    """Parse and verify a record; raises RecordError unless it is intact, from this encoder and for this key."""
    if len(blob) < _PREFIX.size:
        raise RecordError("record shorter than its fixed prefix")
    magic, version, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise RecordError("bad magic: not an mmserve embedding record")
    if version != VERSION:
        raise RecordError(f"record format version {version}, expected {VERSION}")
    if header_len > _MAX_HEADER or _PREFIX.size + header_len > len(blob):
        raise RecordError("header length out of range")
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + header_len])
        dtype, shape, fingerprint, key = header["dtype"], header["shape"], header["fingerprint"], header["key"]
        layout = header.get("layout", [])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordError(f"unreadable header: {type(exc).__name__}") from None
    if not isinstance(shape, list) or not all(isinstance(dim, int) for dim in shape):
        raise RecordError("header shape is not a list of integers")
    if not isinstance(layout, list) or not all(isinstance(value, int) for value in layout):
        raise RecordError("header layout is not a list of integers")
    if fingerprint != expected_fingerprint:
        raise RecordError("record was written by a different encoder (fingerprint mismatch)")
    if key != expected_key:
        raise RecordError("record belongs to another image key")
    return EmbeddingRecord(
        dtype=str(dtype),
        shape=tuple(shape),
        fingerprint=fingerprint,
        key=key,
        data=blob[_PREFIX.size + header_len :],
        layout=tuple(layout),
    )
