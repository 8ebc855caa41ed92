"""The server's limits on uploaded videos, checked against the container's header before any frame is decoded.

A few kilobytes of mp4 can declare 64 frames of 8192 x 8192: 12.9 GB of RGB
once decoded. The header says so up front, so such a video is refused from
it (HTTP 400 naming the limit and the video's value), and the decoded
bytes of all videos being decoded at once stay under a budget (see
``decode_pool``). The limits are the server's: environment variables of
the API server process (``vllm_stgridpool.envs``), never request options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm_stgridpool import envs

__all__ = [
    "DEFAULT_MAX_VIDEO_PACKETS",
    "VideoLimits",
    "VideoTooLarge",
    "default_decode_budget_bytes",
    "machine_memory_bytes",
    "over_max_video_pixels",
]

# The pixel and decoded-byte defaults (envs.py) admit 4K UHD, portrait too, and 64 such frames decoded.
# Packets (mp4 samples, frames) a container may declare or hold: 9 hours of 30 fps video, or 3.6 hours
# with 48 kHz AAC sound (FFmpeg indexes every stream). FFmpeg's mp4 index costs 35-72 bytes a sample.
DEFAULT_MAX_VIDEO_PACKETS = 1_000_000
# Decoding in flight may use this share of the machine's (or the container's) memory.
DECODE_BUDGET_SHARE_OF_MEMORY = 0.25


class VideoTooLarge(ValueError):
    """A video over one of the server's limits (a client error: HTTP 400)."""


@dataclass(frozen=True)
class VideoLimits:
    max_video_pixels: int
    max_video_decode_bytes: int
    decode_budget_bytes: int
    max_video_packets: int = DEFAULT_MAX_VIDEO_PACKETS

    @classmethod
    def from_env(cls) -> VideoLimits:
        return cls(
            max_video_pixels=envs.STGRIDPOOL_MAX_VIDEO_PIXELS,
            max_video_decode_bytes=envs.STGRIDPOOL_MAX_VIDEO_DECODE_BYTES,
            decode_budget_bytes=envs.STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES or default_decode_budget_bytes(),
            max_video_packets=envs.STGRIDPOOL_MAX_VIDEO_PACKETS,
        )

    def check_header(self, width: int, height: int, total_frames: int, upload_bytes: int) -> None:
        """Refuse a header that cannot be true of an upload of ``upload_bytes``: no picture, or more frames
        than the bytes hold (every frame is at least one byte) or than ``max_video_packets``."""
        if width < 1 or height < 1:
            raise VideoTooLarge(f"video frames of {width}x{height} hold no picture")
        if not 1 <= total_frames <= min(upload_bytes, self.max_video_packets):
            raise VideoTooLarge(
                f"the video's header declares {total_frames:,} frames, which its {upload_bytes:,} bytes cannot "
                f"hold or which is over the server's max_video_packets of {self.max_video_packets:,} "
                "(STGRIDPOOL_MAX_VIDEO_PACKETS)"
            )

    def check_frame_size(self, width: int, height: int) -> None:
        """Refuse a frame size over ``max_video_pixels``."""
        if width * height > self.max_video_pixels:
            raise VideoTooLarge(over_max_video_pixels(width, height, self.max_video_pixels))

    def check_decoded_size(self, num_frames: int, width: int, height: int) -> int:
        """The RGB bytes of ``num_frames`` decoded frames; refused over ``max_video_decode_bytes`` or the budget."""
        decoded = num_frames * width * height * 3
        for name, variable, limit in (
            ("max_video_decode_bytes", "STGRIDPOOL_MAX_VIDEO_DECODE_BYTES", self.max_video_decode_bytes),
            ("video decode budget", "STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES", self.decode_budget_bytes),
        ):
            if decoded > limit:
                raise VideoTooLarge(
                    f"{num_frames} sampled video frames of {width}x{height} decode to {decoded:,} bytes of RGB, "
                    f"over the server's {name} of {limit:,} bytes ({variable})"
                )
        return decoded


def over_max_video_pixels(width: int, height: int, max_video_pixels: int) -> str:
    """Why frames of ``width`` x ``height`` are refused (the decode worker says it too, from the header)."""
    return (
        f"video frames of {width}x{height} ({width * height:,} pixels) are over the server's "
        f"max_video_pixels of {max_video_pixels:,} (STGRIDPOOL_MAX_VIDEO_PIXELS)"
    )


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's memory limit when that is lower (containers)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                value = file.read().strip()
        except OSError:
            continue
        if value.isdigit():
            return min(physical, int(value))
    return physical


def default_decode_budget_bytes() -> int:
    """A quarter of the machine's memory, and never less than one video at ``max_video_decode_bytes``."""
    return max(int(machine_memory_bytes() * DECODE_BUDGET_SHARE_OF_MEMORY), envs.STGRIDPOOL_MAX_VIDEO_DECODE_BYTES)
