"""Decode an untrusted video file with PyAV: its header first, then only the sampled frames.

The header (frame size, frame count, frame rate) is read with FFmpeg's
``max_pixels`` set, so probing a 8192 x 8192 file decodes none of its
frames; the caller checks the header against the server's limits before
asking for frames. Frames are then decoded straight into the caller's
buffer (shared memory in the decode pool), seeking from key frame to key
frame like decord does, and every decoded frame must have the size the
header declared: a stream that grows is stopped at its first larger frame.

This module imports no vLLM: it runs in the decode pool's worker processes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import msgspec
import numpy as np

__all__ = ["FrameSizeMismatch", "OpenVideo", "UndecodableVideo", "VideoHeader", "decode_frames", "open_video"]


class UndecodableVideo(ValueError):
    """The bytes are not a video PyAV can decode (the client's error: HTTP 400)."""


class FrameSizeMismatch(ValueError):
    """A decoded frame is not the size the container's header declared."""


class VideoHeader(msgspec.Struct, frozen=True):
    width: int
    height: int
    total_frames: int
    fps: float


@dataclass
class OpenVideo:
    """A video opened for decoding: its container, stream, header and packet index."""

    container: object
    stream: object
    reopen: object  # () -> (container, stream) at the start of the file
    header: VideoHeader
    frame_pts: list  # presentation timestamps in display order; frame i is frame_pts[i]
    key_pts: list  # timestamps of key frames, ascending

    def close(self) -> None:
        self.container.close()


def open_video(path: str, max_pixels: int) -> OpenVideo:
    """Open the video file at ``path`` and read its header and packet index, decoding no frame.

    FFmpeg gets a ``max_pixels`` of twice that: stream probing, which
    otherwise decodes a first frame of any size, and the decoder stay within
    it. (Twice, because FFmpeg counts the row length padded for SIMD: a
    2160 x 3840 frame is 2176 x 3840 to it. The exact limit is the caller's
    check of the header; every decoded frame must match the header.)
    """
    import av

    limit = {"max_pixels": str(2 * max(1, max_pixels))}

    def reopen():
        container = av.open(path, options=limit)
        if not container.streams.video:
            container.close()
            raise UndecodableVideo("Could not decode video: the data holds no video stream (0 frames).")
        stream = container.streams.video[0]
        stream.codec_context.options = dict(limit)  # the decoder refuses larger frames too
        stream.thread_type = "AUTO"
        return container, stream

    try:
        container, stream = reopen()
    except av.FFmpegError as error:
        raise UndecodableVideo(f"Could not decode video with PyAV: {error}") from error
    try:
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
        total_frames = stream.frames or len(packets)
        if total_frames <= 0 or not packets:
            raise UndecodableVideo("Could not decode video: it has no frames (0 frames).")
        rate = stream.average_rate or stream.guessed_rate
        header = VideoHeader(
            width=stream.width, height=stream.height, total_frames=total_frames, fps=float(rate) if rate else 0.0
        )
        frame_pts = sorted(pts for pts, _ in packets if pts is not None)
        key_pts = sorted(pts for pts, key in packets if key and pts is not None)
        if len(set(frame_pts)) != len(packets):
            frame_pts, key_pts = [], []  # missing or repeated timestamps (raw streams): decoded in order, counted
        return OpenVideo(container, stream, reopen, header, frame_pts, key_pts)
    except UndecodableVideo:
        container.close()
        raise
    except av.FFmpegError as error:
        container.close()
        raise UndecodableVideo(f"Could not decode video with PyAV: {error}") from error


def decode_frames(video: OpenVideo, indices: list[int], out: np.ndarray) -> None:
    """Decode frames ``indices`` of ``video`` as RGB into ``out`` (shape ``(len(indices), H, W, 3)``, uint8).

    Raises:
        UndecodableVideo: a sampled frame cannot be decoded.
        FrameSizeMismatch: a decoded frame is not the header's size (the
            first such frame stops decoding).
    """
    import av

    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    try:
        if video.frame_pts:
            _decode_by_seeking(video, slots, out)
        else:
            _decode_in_order(video, slots, out)
    except av.FFmpegError as error:
        raise UndecodableVideo(f"Could not decode video with PyAV: {error}") from error


# Decoding on is cheaper than a seek (which empties the decoder's frame threads) for this many frames.
SEEK_AFTER_FRAMES = 16


def _decode_by_seeking(video: OpenVideo, slots: dict[int, list[int]], out: np.ndarray) -> None:
    """Seek to the key frame before a wanted frame when that skips more than ``SEEK_AFTER_FRAMES`` frames."""
    frames = None
    last = -1  # index of the last decoded frame
    for index in sorted(slots):
        if index >= len(video.frame_pts):
            raise _unreadable(index)
        target = video.frame_pts[index]
        key_position = bisect.bisect_right(video.key_pts, target) - 1
        key = video.key_pts[key_position] if key_position >= 0 else video.frame_pts[0]
        key_index = bisect.bisect_left(video.frame_pts, key)
        if frames is None or index <= last or key_index - last > SEEK_AFTER_FRAMES:
            # (Reading the packet index left the demuxer at the end, so the first frame seeks too.)
            video.container.seek(key, stream=video.stream, backward=True)
            frames = video.container.decode(video.stream)
        for frame in frames:
            if frame.pts is None:
                _check_size(frame, last + 1, video.header)
                continue
            last = bisect.bisect_left(video.frame_pts, frame.pts)
            _check_size(frame, last, video.header)
            if frame.pts >= target:
                break
        else:
            raise _unreadable(index)
        if frame.pts != target:
            raise _unreadable(index)
        _store(frame, slots[index], out)


def _decode_in_order(video: OpenVideo, slots: dict[int, list[int]], out: np.ndarray) -> None:
    """Decode from the start, counting frames (for streams whose packets carry no timestamps)."""
    video.container.close()  # reading the packet index used it up; such streams may not seek back
    video.container, video.stream = video.reopen()
    missing = set(slots)
    for position, frame in enumerate(video.container.decode(video.stream)):
        _check_size(frame, position, video.header)
        if position in missing:
            _store(frame, slots[position], out)
            missing.discard(position)
            if not missing:
                return
    raise _unreadable(min(missing))


def _check_size(frame, index: int, header: VideoHeader) -> None:
    if (frame.width, frame.height) != (header.width, header.height):
        raise FrameSizeMismatch(
            f"video frame {index} decodes to {frame.width}x{frame.height}, not the {header.width}x{header.height} "
            "its header declares (the server's max_video_pixels and max_video_decode_bytes are checked against "
            "the header); the video is refused at that frame"
        )


def _store(frame, slots: list[int], out: np.ndarray) -> None:
    rgb = frame.to_ndarray(format="rgb24")
    for slot in slots:
        out[slot] = rgb


def _unreadable(index: int) -> UndecodableVideo:
    return UndecodableVideo(f"Could not decode video: frame {index} is unreadable")
