"""The value the image path carries: one image's projected embedding and its layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's embedding `[rows, hidden_size]` (CPU) and its layout.

    `layout` is what the language-model side needs besides the rows, as the family defines it
    (`ModelFamily.image_layout`): Qwen2-VL's patch grid (t, h, w) for M-RoPE positions, Idefics3's tile grid (rows,
    cols) for the prompt's row/column tokens; empty for families that need nothing. It travels with the tensor
    everywhere: caches, Redis records, `EncodedImage.layout`.
    """

    tensor: torch.Tensor
    layout: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
