"""Errors shared by the checkpoint loader and the model-family layer (no torch, no transformers imports)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """The checkpoint is missing, incomplete or of an unsupported architecture; the message says which and why."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture has no model family in mmserve; the message lists the supported ones."""
