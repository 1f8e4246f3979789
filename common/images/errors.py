"""What can go wrong on the image path, as domain errors with client-safe messages (no grpc here).

Every error the image path raises for a reason the caller should hear is an `ImageError`. Its message never
carries a stack trace, a memory address or an exception class; `index` names the image of the caller's request
it is about (None: the whole request). The servicers turn them into gRPC status codes through one table
(`common.serving.STATUS_CODES`):

    InvalidImageError          the bytes are not a usable image, or the key is malformed   INVALID_ARGUMENT
    EmbeddingNotFoundError     an embedding_key nobody holds                                 FAILED_PRECONDITION
    EncoderOverloadedError     the encoder refused the work for now                          RESOURCE_EXHAUSTED
    ImageDeadlineError         the caller's deadline passed while its images were resolved   DEADLINE_EXCEEDED
    ImageUnavailableError      the cache or the encoder cannot answer now (down, draining,   UNAVAILABLE
                               another model, a bad answer)
"""

from __future__ import annotations


class ImageError(Exception):
    """An image the request cannot use; `str(error)` is safe to send to a client."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index

    def __str__(self) -> str:
        return self.message if self.index is None else f"images[{self.index}]: {self.message}"

    def at(self, index: int | None) -> ImageError:
        """The same error about image `index` of another request (the encoder numbers the images of its own call)."""
        return type(self)(self.message, index=index)


class InvalidImageError(ImageError, ValueError):
    """The image bytes cannot be decoded or processed, or an embedding_key is malformed."""


class EmbeddingNotFoundError(ImageError, LookupError):
    """An `embedding_key` that is not in the cache (expired, evicted, or never stored)."""


class EncoderOverloadedError(ImageError):
    """The encoder refused the work for now (its admission limit); retry later or elsewhere."""


class ImageDeadlineError(ImageError):
    """The caller's deadline passed before its images were resolved."""


class ImageUnavailableError(ImageError):
    """A dependency of the image path cannot answer now: the cache, or the encoder (down, draining, serving
    another model, or answering nonsense)."""


class CacheUnavailableError(ImageUnavailableError):
    """The cache backend did not answer (error, timeout, or circuit breaker open)."""


class SkippedImageError(ImageError):
    """Not encoded because another image of the same encoder call failed; its own bytes may be fine."""
