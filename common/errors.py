"""Errors shared by the checkpoint loader, the model-family layer and both services (no torch imports).

Each carries a message that is safe to show a client; the services map them to gRPC status codes in one table
(`common/serving.py`).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """The checkpoint is missing, incomplete or of an unsupported architecture; the message says which and why."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture has no model family in mmserve; the message lists the supported ones."""


class InvalidPrompt(ValueError):
    """The prompt and its images do not fit together; the message says how (sent as INVALID_ARGUMENT)."""
