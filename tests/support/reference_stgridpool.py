"""Plain reference implementation of ST-GridPool, written from the spec only.

Deliberately slow and literal: Python loops over pyramid levels, chunks,
frames, tiles and NSP windows. It is the oracle the fast path is tested
against, so it imports nothing from ``vllm_stgridpool`` and takes plain
arguments instead of a config object. Works in any float dtype (tests use
float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_GRID_SIZES = (4, 4, 4)
DEFAULT_GRID_STRIDES = (2, 4, 8)


def sample_indices(num_frames: int, stride: int) -> list[int]:
    """Frame indices sampled at one pyramid level (empty when T // s == 0)."""
    n = num_frames // stride
    if n == 0:
        return []
    points = torch.linspace(0, num_frames, n + 1, dtype=torch.float32)[1:] - 1
    idx = torch.clamp(torch.round(points), 0, num_frames - 1)
    return [int(v) for v in idx.tolist()]


def mosaic_layout(grid_size: int) -> tuple[int, int]:
    """(rows, cols) of the mosaic for ``grid_size`` frames."""
    best = None
    a = 1
    while a * a <= grid_size:
        if grid_size % a == 0:
            b = grid_size // a
            if best is None or abs(a - b) < abs(best[0] - best[1]):
                best = (a, b)
        a += 1
    a, b = best
    return max(a, b), min(a, b)


def resize_frame(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize one (H, W, D) frame to (height, width, D) as the spec says."""
    H, W = frame.shape[0], frame.shape[1]
    chw = frame.permute(2, 0, 1).unsqueeze(0)
    if height < H or width < W:
        out = F.interpolate(chw, size=(height, width), mode="area")
    else:
        out = F.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0)


def build_mosaic(frames: list[torch.Tensor], grid_size: int) -> torch.Tensor:
    """Tile ``grid_size`` frames of shape (H, W, D) into one (H, W, D) mosaic."""
    assert len(frames) == grid_size
    H, W, D = frames[0].shape
    rows, cols = mosaic_layout(grid_size)
    h = math.ceil(H / rows)
    w = math.ceil(W / cols)
    canvas = torch.zeros(rows * h, cols * w, D, dtype=frames[0].dtype)
    for j, frame in enumerate(frames):
        r, c = j // cols, j % cols
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = resize_frame(frame, h, w)
    return canvas[:H, :W].clone()


def ptg_level(features: torch.Tensor, grid_size: int, stride: int) -> torch.Tensor:
    """One pyramid level; returns a new (T, H, W, D) tensor."""
    out = features.clone()
    T = features.shape[0]
    idx = sample_indices(T, stride)
    snapshot = [features[i].clone() for i in idx]
    num_chunks = len(idx) // grid_size
    for c in range(num_chunks):
        chunk = snapshot[c * grid_size:(c + 1) * grid_size]
        target = idx[(c + 1) * grid_size - 1]
        out[target] = build_mosaic(chunk, grid_size)
    return out


def ptg(features: torch.Tensor, grid_sizes, grid_strides) -> torch.Tensor:
    """All pyramid levels in order, each on the previous level's output."""
    assert len(grid_sizes) == len(grid_strides)
    out = features.clone()
    for g, s in zip(grid_sizes, grid_strides):
        out = ptg_level(out, g, s)
    return out


def nsp_window(tokens: torch.Tensor, temperature: float, norm_p: float) -> torch.Tensor:
    """Reduce (N, D) tokens of one window to one (D,) token."""
    D = tokens.shape[-1]
    score = tokens.abs().pow(norm_p).sum(dim=-1).pow(1.0 / norm_p) / D ** (1.0 / norm_p)
    weights = torch.softmax(temperature * score, dim=0)
    return (weights[:, None] * tokens).sum(dim=0)


def nsp(features: torch.Tensor, kernel_size: int, temperature: float, norm_p: float) -> torch.Tensor:
    """Norm-based spatial pooling of every frame; (T, H, W, D) -> (T, H', W', D)."""
    T, H, W, D = features.shape
    k = kernel_size
    out_h = (H - k) // k + 1
    out_w = (W - k) // k + 1
    out = torch.empty(T, out_h, out_w, D, dtype=features.dtype)
    for t in range(T):
        frame = features[t]
        for i in range(out_h):
            for j in range(out_w):
                window = frame[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(k * k, D)
                out[t, i, j] = nsp_window(window, temperature, norm_p)
    return out


def st_gridpool_reference(
    x: torch.Tensor,
    grid_sizes=DEFAULT_GRID_SIZES,
    grid_strides=DEFAULT_GRID_STRIDES,
    kernel_size: int = 2,
    temperature: float = 1.0,
    norm_p: float = 2.0,
) -> torch.Tensor:
    """ST-GridPool of one video (T, H, W, D) -> (T, H', W', D)."""
    assert x.dim() == 4
    features = ptg(x.detach().cpu(), tuple(grid_sizes), tuple(grid_strides))
    return nsp(features, kernel_size, temperature, norm_p)
