from __future__ import annotations

import pytest
import torch

from common.tensor_codec import TensorDecodeError, tensor_from_bytes, tensor_from_proto, tensor_to_proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(7, 33, generator=generator) * 1000
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40])
    tensor = torch.cat([values.flatten(), special]).to(dtype).reshape(-1, 3)
    message = tensor_to_proto(tensor)
    assert message.dtype == str(dtype).removeprefix("torch.")
    assert list(message.shape) == list(tensor.shape)
    back = tensor_from_proto(message)
    assert back.dtype == dtype and back.shape == tensor.shape
    # Compare bit patterns, not values: -0.0 and NaN payloads must survive too.
    assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       tensor.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_nan_and_non_contiguous() -> None:
    tensor = torch.full((4, 6), float("nan")).t()  # non-contiguous view
    back = tensor_from_proto(tensor_to_proto(tensor))
    assert back.shape == (6, 4) and torch.isnan(back).all()


def test_little_endian_wire_format() -> None:
    message = tensor_to_proto(torch.tensor([1.0], dtype=torch.float32))
    assert message.data == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize(
    ("dtype", "shape", "size", "message"),
    [
        ("int8", [1], 1, "unsupported tensor dtype"),
        ("float32", [2, 2], 15, "needs 16"),
        ("float32", [-1, 2], 8, "invalid tensor shape"),
    ],
)
def test_invalid_messages_are_rejected(dtype: str, shape: list[int], size: int, message: str) -> None:
    with pytest.raises(TensorDecodeError, match=message):
        tensor_from_bytes(dtype, shape, b"\0" * size)


def test_unsupported_source_dtype() -> None:
    with pytest.raises(ValueError, match="cannot serialise"):
        tensor_to_proto(torch.zeros(2, dtype=torch.int64))
