"""LLaVA-NeXT's grid newline layout (``add_token_per_grid``), written out plainly from its description.

LLaVA-Video was trained with ``mm_newline_position: "grid"``: after pooling,
frame after frame and row after row, a row's tokens are followed by one
``image_newline``; the video as a whole gets no newline of its own. The
oracle for the plugin's layout, so it imports nothing from ``vllm_stgridpool``.
"""

from __future__ import annotations

import torch


def add_token_per_grid(frames: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(T, h, w, D) pooled frames and a (D,) newline -> the (T * h * (w + 1), D) token sequence."""
    tokens = []
    for frame in frames:
        for row in frame:
            tokens.extend(row)
            tokens.append(newline)
    return torch.stack(tokens)
