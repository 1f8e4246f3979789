from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data", "embedding_key")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    embedding_key: str
    def __init__(self, data: _Optional[bytes] = ..., embedding_key: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "return_embeddings", "instruction")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    return_embeddings: bool
    instruction: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., return_embeddings: _Optional[bool] = ..., instruction: _Optional[str] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("embedding_key", "cache_hit", "num_tokens", "hidden_size", "embedding", "layout")
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    embedding_key: str
    cache_hit: bool
    num_tokens: int
    hidden_size: int
    embedding: Tensor
    layout: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, embedding_key: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., embedding: _Optional[_Union[Tensor, _Mapping]] = ..., layout: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EncodedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[EncodedImage, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "fingerprint", "dtype", "device", "image_placeholder", "hidden_size", "max_context", "image_token_id", "image_size", "version", "family", "tokens_per_image", "image_embeddings_depend_on_instruction", "images_before_text")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDDINGS_DEPEND_ON_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_BEFORE_TEXT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    fingerprint: str
    dtype: str
    device: str
    image_placeholder: str
    hidden_size: int
    max_context: int
    image_token_id: int
    image_size: int
    version: str
    family: str
    tokens_per_image: int
    image_embeddings_depend_on_instruction: bool
    images_before_text: bool
    def __init__(self, model_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., image_placeholder: _Optional[str] = ..., hidden_size: _Optional[int] = ..., max_context: _Optional[int] = ..., image_token_id: _Optional[int] = ..., image_size: _Optional[int] = ..., version: _Optional[str] = ..., family: _Optional[str] = ..., tokens_per_image: _Optional[int] = ..., image_embeddings_depend_on_instruction: _Optional[bool] = ..., images_before_text: _Optional[bool] = ...) -> None: ...
