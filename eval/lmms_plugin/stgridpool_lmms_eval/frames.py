"""A folder of frames as one video: the frames the authors' harness samples, sent as a ``video/jpeg`` data URL.

Some benchmarks give a video as a folder of images (MVBench's
``episodic_reasoning``: TVQA frames extracted at 3 fps). vLLM cannot open a
folder, but it takes ``data:video/jpeg;base64,<jpeg>,<jpeg>,...`` as a
video of those frames. The frames are chosen by the authors' rule for a
video (LLaVA-Video's ``load_video(path, max_frames, fps=1)``): one frame per
second, every ``round(folder_fps / fps)``-th, when that gives at most
``max_frames``; otherwise ``max_frames`` spread uniformly
(``linspace(0, n - 1, max_frames)``).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_SIDE = 1024  # larger frames are scaled down first (the models see 336-384 px)


def frame_files(folder: Path) -> list[Path]:
    """The folder's images in name order (TVQA's ``00001.jpg``, ``00002.jpg``, ...)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())


def sample_indices(count: int, max_frames: int, folder_fps: float, fps: float | None) -> list[int]:
    """The authors' frame choice for ``count`` frames taken at ``folder_fps``; ``fps=None``: uniform only."""
    if count < 1:
        return []
    if fps:
        step = max(1, round(folder_fps / fps))
        indices = list(range(0, count, step))
        if len(indices) <= max_frames:
            return indices
    if count <= max_frames:
        return list(range(count))
    return np.linspace(0, count - 1, max_frames, dtype=int).tolist()


def jpeg_bytes(path: Path) -> bytes:
    """The frame as JPEG: a JPEG of at most ``MAX_SIDE`` pixels a side as it is, anything else re-encoded."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and max(image.size) <= MAX_SIDE:
            return data
        image = image.convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=95)
        return out.getvalue()


def folder_data_url(folder: Path, max_frames: int, folder_fps: float, fps: float | None) -> tuple[str, int]:
    """``(data URL, frames in it)`` for a folder of frames; ValueError for a folder without any."""
    files = frame_files(folder)
    if not files:
        raise ValueError(f"frame folder {folder} holds no {'/'.join(FRAME_SUFFIXES)} files")
    chosen = [files[i] for i in sample_indices(len(files), max_frames, folder_fps, fps)]
    parts = ",".join(base64.b64encode(jpeg_bytes(p)).decode("ascii") for p in chosen)
    return "data:video/jpeg;base64," + parts, len(chosen)
