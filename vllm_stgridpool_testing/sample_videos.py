"""Real encoded mp4 clips whose every frame differs, for tests, demo and benchmarks.

A video path is only exercised for real by bytes that a demuxer and decoder
must parse, so these helpers encode MPEG-4 Part 2 video in an mp4 container
rather than handing raw arrays around.  Frame ``i`` has a background colour
that steps with ``i`` (consecutive frames always differ, on all sizes, even a
single pixel) plus a square moving right and a bar moving down.

Which sizes encode (measured with opencv-python-headless 5.0, PyAV 18.1,
decord 0.6.0):

* OpenCV's ``VideoWriter`` with fourcc ``mp4v`` writes any even width and
  height >= 2 (4000x16 and 100 frames included; 1 and 2 frames decode as 1
  and 2 frames).  It refuses a width or height of 1, and silently rounds odd
  sizes down to even (7x1000 comes out 6x1000).  ``avc1``/``H264`` are not
  built into the OpenCV wheel.
* PyAV (package ``av``, a project dependency) with its ``mpeg4`` encoder
  writes every size, odd ones and 1x1 included; its ``libx264`` needs even
  sizes in yuv420p.  ``write_mp4`` uses it for odd sizes.
* cv2 decodes all of the above to the requested frame count and size.
  decord 0.6.0 returns the right frame count but, for some narrow widths
  (1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 72 among 1..99), frames with a wrong
  channel count (e.g. 1x1 comes back as 1x1x96), and ``get_batch`` fails
  for them; ``DECORD_BAD_WIDTHS`` lists those seen.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

DEFAULT_WIDTH = 160
DEFAULT_HEIGHT = 120
DEFAULT_FPS = 10.0
DECORD_BAD_WIDTHS = frozenset({1, 2, 3, 4, 6, 8, 12, 16, 24, 48, 72})


class UnsupportedVideoSize(ValueError):
    """The encoder cannot write this frame size exactly."""


def synthetic_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB frame ``index`` of the sample clip, shape (height, width, 3), uint8."""
    background = ((40 + 53 * index) % 256, (80 + 97 * index) % 256, (120 + 29 * index) % 256)
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = background
    side = max(1, min(width, height) // 4)
    x = (index * max(1, width // 8)) % max(1, width - side + 1)
    y = (height - side) // 2
    frame[y : y + side, x : x + side] = (255 - background[0], 255 - background[1], 255 - background[2])
    bar_y = (index * max(1, height // 8)) % height
    frame[bar_y : bar_y + max(1, height // 16), :] = (255, 255, 255) if index % 2 else (0, 0, 0)
    return frame


def write_mp4(
    path,
    num_frames: int,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    fps: float = DEFAULT_FPS,
) -> Path:
    """Encode ``num_frames`` synthetic frames as an MPEG-4 Part 2 mp4 at ``path``."""
    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"need at least one frame of at least 1x1, got {num_frames} frames of {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = (synthetic_frame(i, width, height) for i in range(num_frames))
    if width % 2 == 0 and height % 2 == 0:
        _write_with_opencv(path, frames, width, height, fps)
    else:
        _write_with_pyav(path, frames, width, height, fps)
    return path


def mp4_bytes(
    num_frames: int,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    fps: float = DEFAULT_FPS,
) -> bytes:
    """The bytes ``write_mp4`` would write: what an HTTP client uploads."""
    with tempfile.TemporaryDirectory() as scratch:
        return write_mp4(Path(scratch) / "clip.mp4", num_frames, width, height, fps).read_bytes()


def _write_with_opencv(path: Path, frames, width: int, height: int, fps: float) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise UnsupportedVideoSize(f"OpenCV cannot open an mp4v writer for {width}x{height}")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    finally:
        writer.release()


def _write_with_pyav(path: Path, frames, width: int, height: int, fps: float) -> None:
    from fractions import Fraction

    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = max(400_000, width * height * 8)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def size_bomb_mp4(num_frames: int, width: int, height: int, fps: float = DEFAULT_FPS) -> bytes:
    """A tiny H.264 mp4 of ``num_frames`` one-colour frames of ``width`` x ``height`` (even sizes).

    libx264 at CRF 51 spends almost nothing on frames that never change: 64
    frames of 8192 x 8192 are about 200 KB, yet 12.9 GB of RGB once decoded.
    """
    import io
    from fractions import Fraction

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "51", "preset": "ultrafast"}
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([128]) * plane.buffer_size)
        for index in range(num_frames):
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def growing_m4v(small: tuple[int, int], large: tuple[int, int], frames_each: int = 4) -> bytes:
    """A raw MPEG-4 Part 2 stream whose frames grow from ``small`` to ``large`` (width, height) halfway.

    Its header (the first VOL) declares ``small``; a decoder that trusts the
    header is handed frames of ``large`` from frame ``frames_each`` on.
    """
    from fractions import Fraction

    import av

    def encode(width: int, height: int) -> bytes:
        codec = av.CodecContext.create("mpeg4", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.time_base, codec.framerate = Fraction(1, 10), 10
        packets = []
        for index in range(frames_each):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height), format="rgb24")
            frame.pts = index
            packets += codec.encode(frame)
        packets += codec.encode(None)
        return b"".join(bytes(packet) for packet in packets)

    return encode(*small) + encode(*large)


def time_bomb_mp4(num_frames: int, fps: float = 30.0) -> bytes:
    """An mp4 of ``num_frames`` 16 x 16 MPEG-4 frames with a single key frame: small to send, slow to sample.

    Every sampled frame is reached by decoding from the one key frame, so
    sampling 64 frames spread over the video decodes nearly all of them
    (about 10 us each here: 900,000 frames, 8.4 hours at 30 fps, take some 9 s
    and weigh 11 MB). Built by encoding a key frame and one unchanged frame,
    then muxing that frame's packet ``num_frames - 1`` times (2 s for 300,000).
    """
    import io
    from fractions import Fraction

    import av

    codec = av.CodecContext.create("mpeg4", "w")
    codec.width, codec.height, codec.pix_fmt = 16, 16, "yuv420p"
    codec.time_base, codec.gop_size = Fraction(1, 30), 1_000_000
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    packets = []
    for index in range(2):
        frame.pts = index
        packets += codec.encode(frame)
    packets += codec.encode(None)
    key, unchanged = bytes(packets[0]), bytes(packets[1])
    time_base = Fraction(1, 1) / Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.codec_context.extradata = codec.extradata
        for index in range(num_frames):
            packet = av.Packet(key if index == 0 else unchanged)
            packet.pts = packet.dts = index
            packet.time_base, packet.stream, packet.is_keyframe = time_base, stream, index == 0
            container.mux(packet)
    return buffer.getvalue()
