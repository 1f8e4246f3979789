"""torch.Tensor <-> `mmserve.encoder.v1.Tensor` (raw little-endian, row-major bytes + dtype + shape).

Exact in both directions for float32, float16 and bfloat16: the bytes are the tensor's own storage, never
a float conversion. bfloat16 has no numpy dtype, so bytes go through an int16 view of the same storage.
"""

from __future__ import annotations

import sys

import torch

from protos import encoder_pb2

if sys.byteorder != "little":  # the wire format is little-endian and so are the hosts we support (x86-64, arm64)
    raise ImportError("mmserve's tensor codec supports little-endian hosts only")

_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FROM_TORCH = {dtype: name for name, dtype in _TO_TORCH.items()}
# Same-width integer views: bytes are taken from these, so no value is ever converted.
_BIT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
MAX_DIMS = 8


class TensorDecodeError(ValueError):
    """A Tensor message whose dtype, shape or byte length is invalid; the message says which."""


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw little-endian bytes) of a float32/float16/bfloat16 tensor on any device."""
    if tensor.dtype not in _FROM_TORCH:
        raise ValueError(f"cannot serialise dtype {tensor.dtype}: use float32, float16 or bfloat16")
    flat = tensor.detach().to("cpu").contiguous().view(_BIT_VIEWS[tensor.dtype])
    return _FROM_TORCH[tensor.dtype], list(tensor.shape), flat.numpy().tobytes()


def tensor_from_bytes(dtype: str, shape: list[int] | tuple[int, ...], data: bytes) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`; validates dtype, shape and length. Returns a CPU tensor that owns its memory."""
    if dtype not in _TO_TORCH:
        raise TensorDecodeError(f"unsupported tensor dtype {dtype!r}: expected float32, float16 or bfloat16")
    if len(shape) > MAX_DIMS or any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"invalid tensor shape {list(shape)}")
    torch_dtype = _TO_TORCH[dtype]
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != numel * itemsize:
        raise TensorDecodeError(
            f"tensor data is {len(data)} bytes but shape {list(shape)} of {dtype} needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    bits = torch.frombuffer(bytearray(data), dtype=_BIT_VIEWS[torch_dtype])
    return bits.view(torch_dtype).reshape(tuple(shape))


def tensor_to_proto(tensor: torch.Tensor) -> encoder_pb2.Tensor:
    dtype, shape, data = tensor_to_bytes(tensor)
    return encoder_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def tensor_from_proto(message: encoder_pb2.Tensor) -> torch.Tensor:
    return tensor_from_bytes(message.dtype, list(message.shape), message.data)
