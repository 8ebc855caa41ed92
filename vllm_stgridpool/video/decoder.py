"""Decode an untrusted video file with PyAV: its header first, then only the sampled frames.

The file is read through Python (a read-only mapping handed to PyAV), so
FFmpeg opens no file and no URL itself: the demuxer is the one
``container_check`` names from the bytes (never probed; ``ffconcat`` and
HLS playlists never reach FFmpeg), FFmpeg's ``format_whitelist`` repeats
the allow-list, and any attempt of a demuxer to open another file or URL
fails (``io_open``, ``protocol_whitelist``, ``enable_drefs``).

The header (frame size, frame count, frame rate, rotation) is read with
FFmpeg's ``max_pixels`` set, so probing a 8192 x 8192 file decodes none of
its frames; the caller checks the header against the server's limits
before asking for frames. Frames are then decoded straight into the
caller's buffer (shared memory in the decode pool), seeking from key frame
to key frame like decord does, turned upright as the container's display
matrix says (as opencv does), and every decoded frame must have the size
the header declared: a stream that grows is stopped at its first larger
frame.

This module imports no vLLM: it runs in the decode pool's worker processes.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from vllm_stgridpool.video import container_check
from vllm_stgridpool.video.limits import DEFAULT_MAX_VIDEO_PACKETS, over_max_video_pixels

__all__ = ["FrameSizeMismatch", "OpenVideo", "UndecodableVideo", "VideoHeader", "decode_frames", "open_video"]

# Options of every container FFmpeg opens here (see the module's note).
_CONTAINER_OPTIONS = {
    "format_whitelist": container_check.FORMAT_WHITELIST,
    "protocol_whitelist": "none",
    "enable_drefs": "0",
}


class UndecodableVideo(ValueError):
    """The bytes are not a video PyAV can decode (the client's error: HTTP 400)."""


class FrameSizeMismatch(ValueError):
    """A decoded frame is not the size the container's header declared."""


class VideoHeader(msgspec.Struct, frozen=True):
    width: int  # of the frames as displayed (after rotation)
    height: int
    total_frames: int
    fps: float
    rotation: int = 0  # degrees counter-clockwise the decoded frames are turned: 0, 90, 180 or 270


@dataclass
class OpenVideo:
    """A video opened for decoding: its container, stream, header and packet index."""

    container: object
    stream: object
    reopen: object  # () -> (container, stream) at the start of the file
    header: VideoHeader
    frame_pts: np.ndarray  # presentation timestamps in display order; frame i is frame_pts[i] (empty: untimed)
    key_pts: np.ndarray  # timestamps of key frames, ascending
    key_seek: np.ndarray  # where to seek for each of them: the lower of its pts and dts (demuxers seek by either)
    source: mmap.mmap
    checkpoint: Callable[[], None] = lambda: None  # called before each decoded frame is used (a deadline's check)

    def close(self) -> None:
        self.container.close()
        self.source.close()


def open_video(path: str, max_pixels: int, max_packets: int = DEFAULT_MAX_VIDEO_PACKETS) -> OpenVideo:
    """Open the video file at ``path`` and read its header and packet index, decoding one frame at most.

    The container's declared counts are checked first (``container_check``),
    and reading stops past ``max_packets`` video packets. FFmpeg gets a
    ``max_pixels`` of twice that: stream probing, which otherwise decodes a
    first frame of any size, and the decoder stay within it. (Twice, because
    FFmpeg counts the row length padded for SIMD: a 2160 x 3840 frame is
    2176 x 3840 to it. The exact limit is the caller's check of the header;
    every decoded frame must match the header.) The one frame decoded is the
    first, for the rotation FFmpeg attaches to frames.
    """
    import av

    source = _mapped(path)
    try:
        demuxer = container_check.inspect(source, max_packets)
    except container_check.ContainerRefused as error:
        source.close()
        raise UndecodableVideo(str(error)) from None
    limit = {"max_pixels": str(2 * max(1, max_pixels))}

    def reopen():
        container = av.open(
            _Upload(source), format=demuxer, options=limit, container_options=_CONTAINER_OPTIONS,
            io_open=_no_other_files, metadata_errors="replace",
        )
        if container.format.name.split(",")[0] not in container_check.DEMUXERS or not container.streams.video:
            container.close()
            raise UndecodableVideo("Could not decode video: the data holds no video stream (0 frames).")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            container.close()
            raise UndecodableVideo("Could not decode video: there is no decoder for its video codec")
        stream.codec_context.options = dict(limit)  # the decoder refuses larger frames too
        stream.thread_type = "AUTO"
        return container, stream

    try:
        container, stream = reopen()
    except UndecodableVideo:
        source.close()
        raise
    except av.FFmpegError as error:
        source.close()
        raise _undecodable(error) from error
    try:
        if stream.width <= 0 or stream.height <= 0:
            raise UndecodableVideo(
                f"Could not decode video: its video stream declares a frame size of {stream.width}x{stream.height}"
            )
        if stream.width * stream.height > max_pixels:  # refused from the header, before the packet index
            raise UndecodableVideo(over_max_video_pixels(stream.width, stream.height, max_pixels))
        frame_pts, key_pts, key_seek, packets = _packet_index(container, stream, max_packets)
        total_frames = min(stream.frames, packets) if stream.frames > 0 else packets  # a header may claim more
        if total_frames <= 0:
            raise UndecodableVideo("Could not decode video: it has no frames (0 frames).")
        rate = stream.average_rate or stream.guessed_rate
        container, stream, turns = _first_frame_turns(container, stream, reopen, frame_pts, key_seek)
        width, height = (stream.height, stream.width) if turns % 2 else (stream.width, stream.height)
        header = VideoHeader(
            width=width, height=height, total_frames=total_frames, fps=float(rate) if rate else 0.0,
            rotation=90 * turns,
        )
        return OpenVideo(container, stream, reopen, header, frame_pts, key_pts, key_seek, source)
    except BaseException as error:
        container.close()
        source.close()
        if isinstance(error, av.FFmpegError):
            raise _undecodable(error) from error
        raise


def _mapped(path: str) -> mmap.mmap:
    """The file at ``path``, mapped read-only (the upload stays readable after the server removes the file)."""
    with open(path, "rb") as file:
        try:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise UndecodableVideo("Could not decode video: the video data is empty.") from None


class _Upload:
    """The mapped upload as the file FFmpeg reads: seeks past the end land there, as in a file (and read nothing)."""

    def __init__(self, source: mmap.mmap):
        self.source, self.position = source, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.source) if size < 0 else self.position + size
        data = self.source[self.position : end]
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.position, len(self.source))[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


def _no_other_files(url, flags, options):
    """FFmpeg's ``io_open``: a demuxer that asks for another file or URL gets none."""
    raise PermissionError("this server's video decoder opens no other file or URL")


def _packet_index(container, stream, max_packets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Timestamps of the video packets in display order, of the key ones (and where to seek for each),
    and how many packets hold data.

    Timestamps that are missing or repeated (raw streams) leave the arrays
    empty: such videos are decoded in order and counted.
    """
    timestamps, keys = [], []
    packets = 0
    timed = True
    for read, packet in enumerate(container.demux(stream), 1):
        if read > max_packets:
            raise UndecodableVideo(
                f"Could not decode video: it holds more than {max_packets:,} video packets, the server's "
                "max_video_packets (STGRIDPOOL_MAX_VIDEO_PACKETS)"
            )
        if not packet.size:
            continue
        packets += 1
        if packet.pts is None:
            timed = False
        elif timed:
            timestamps.append(packet.pts)
            if packet.is_keyframe:
                keys.append((packet.pts, packet.pts if packet.dts is None else min(packet.pts, packet.dts)))
    frame_pts = np.sort(np.array(timestamps, np.int64)) if timed else np.empty(0, np.int64)
    if len(np.unique(frame_pts)) != packets:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), packets
    keys_by_pts = np.array(sorted(keys), np.int64).reshape(-1, 2)
    return frame_pts, keys_by_pts[:, 0].copy(), keys_by_pts[:, 1].copy(), packets


def _first_frame_turns(container, stream, reopen, frame_pts, key_seek):
    """``(container, stream, quarter turns)``: the counter-clockwise quarter turns that put the frames upright.

    FFmpeg attaches the container's display matrix to every decoded frame
    (``frame.rotation``); like opencv, only multiples of 90 degrees turn the
    frames, and mirroring is ignored. A first frame that does not decode
    leaves the frames as they are (a sampled frame that does not decode
    refuses the video later).
    """
    import av

    if len(frame_pts):
        container.seek(int(key_seek[0]) if len(key_seek) else int(frame_pts[0]), stream=stream, backward=True)
    else:
        container.close()  # reading the packet index used it up; such streams may not seek back
        container, stream = reopen()
    try:
        rotation = next((frame.rotation for frame in container.decode(stream)), 0)
    except av.FFmpegError:
        rotation = 0
    return container, stream, (rotation // 90) % 4 if rotation % 90 == 0 else 0


def _undecodable(error) -> UndecodableVideo:
    """FFmpeg's reason, without the file name it may carry."""
    return UndecodableVideo(f"Could not decode video with PyAV: {error.strerror or type(error).__name__}")


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
        if len(video.frame_pts):
            _decode_by_seeking(video, slots, out)
        else:
            _decode_in_order(video, slots, out)
    except av.FFmpegError as error:
        raise _undecodable(error) from error


# Decoding on is cheaper than a seek (which empties the decoder's frame threads) for this many frames.
SEEK_AFTER_FRAMES = 16


def _decode_by_seeking(video: OpenVideo, slots: dict[int, list[int]], out: np.ndarray) -> None:
    """Seek to the key frame before a wanted frame when that skips more than ``SEEK_AFTER_FRAMES`` frames."""
    frames = None
    last = -1  # index of the last decoded frame
    for index in sorted(slots):
        if index >= len(video.frame_pts):
            raise _unreadable(index)
        target = int(video.frame_pts[index])
        key_position = bisect.bisect_right(video.key_pts, target) - 1
        key = int(video.key_pts[key_position] if key_position >= 0 else video.frame_pts[0])
        key_index = bisect.bisect_left(video.frame_pts, key)
        if frames is None or index <= last or key_index - last > SEEK_AFTER_FRAMES:
            # (Reading the packet index left the demuxer at the end, so the first frame seeks too.)
            seek_to = int(video.key_seek[key_position]) if key_position >= 0 else key
            video.container.seek(seek_to, stream=video.stream, backward=True)
            frames = video.container.decode(video.stream)
        for frame in frames:
            video.checkpoint()
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
        _store(frame, slots[index], out, video.header)


def _decode_in_order(video: OpenVideo, slots: dict[int, list[int]], out: np.ndarray) -> None:
    """Decode from the start, counting frames (for streams whose packets carry no timestamps)."""
    video.container.close()  # reading the packet index used it up; such streams may not seek back
    video.container, video.stream = video.reopen()
    missing = set(slots)
    for position, frame in enumerate(video.container.decode(video.stream)):
        video.checkpoint()
        _check_size(frame, position, video.header)
        if position in missing:
            _store(frame, slots[position], out, video.header)
            missing.discard(position)
            if not missing:
                return
    raise _unreadable(min(missing))


def _check_size(frame, index: int, header: VideoHeader) -> None:
    width, height = (header.height, header.width) if header.rotation % 180 else (header.width, header.height)
    if (frame.width, frame.height) != (width, height):
        raise FrameSizeMismatch(
            f"video frame {index} decodes to {frame.width}x{frame.height}, not the {width}x{height} "
            "its header declares (the server's max_video_pixels and max_video_decode_bytes are checked against "
            "the header); the video is refused at that frame"
        )


def _store(frame, slots: list[int], out: np.ndarray, header: VideoHeader) -> None:
    rgb = np.rot90(frame.to_ndarray(format="rgb24"), header.rotation // 90)
    for slot in slots:
        out[slot] = rgb


def _unreadable(index: int) -> UndecodableVideo:
    return UndecodableVideo(f"Could not decode video: frame {index} is unreadable")
