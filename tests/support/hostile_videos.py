"""Hostile uploads crafted as an attacker crafts them (bytes edited in Python), and the valid clips they start from.

Every builder is pure Python over bytes a real encoder wrote (PyAV, or OpenCV
through ``vllm_stgridpool_testing.sample_videos``); nothing needs the ffmpeg
command.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import numpy as np

# --- valid clips in each accepted container ------------------------------------------------

# container format -> (PyAV muxer, video encoder, muxer options)
CONTAINERS = {
    "mp4": ("mp4", "mpeg4", {}),
    "fragmented_mp4": ("mp4", "mpeg4", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
    "mov": ("mov", "mpeg4", {}),
    "mkv": ("matroska", "mpeg4", {}),
    "webm": ("webm", "libvpx-vp9", {}),
    "avi": ("avi", "mpeg4", {}),
    "ts": ("mpegts", "mpeg2video", {}),
    "mpg": ("mpeg", "mpeg2video", {}),
    "flv": ("flv", "flv", {}),
    "ogg": ("ogg", "libvpx", {}),
}


def clip(container: str, num_frames: int = 12, width: int = 64, height: int = 48, rotation: int = 0,
         gop: int = 12) -> bytes:
    """``num_frames`` frames that each differ (a bar grows across), encoded in ``container`` (see
    :data:`CONTAINERS`), with ``rotation`` degrees counter-clockwise in the container's display matrix."""
    import av

    muxer, codec, options = CONTAINERS[container]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer, options=options) as output:
        stream = output.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(num_frames):
            output.mux(stream.encode(av.VideoFrame.from_ndarray(clip_frame(index, width, height), format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


def remuxed(raw: bytes, demuxer: str, muxer: str) -> bytes:
    """The packets of ``raw`` (read with ``demuxer``, e.g. ``m4v`` for a raw MPEG-4 Part 2 stream) in a
    ``muxer`` container, bit for bit: the container's header describes the stream's first headers."""
    import av

    buffer = io.BytesIO()
    with av.open(io.BytesIO(raw), format=demuxer) as source, av.open(buffer, "w", format=muxer) as output:
        video = source.streams.video[0]
        stream = output.add_stream_from_template(video)
        for index, packet in enumerate(packet for packet in source.demux(video) if packet.size):
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, Fraction(1, 10), index, index
            output.mux(packet)
    return buffer.getvalue()


def clip_frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame ``index`` of :func:`clip`: grey, a red block at the top left (shows rotation), a bar growing right."""
    frame = np.full((height, width, 3), 96, np.uint8)
    frame[: height // 3, : width // 4] = (230, 30, 30)
    frame[-height // 4 :, : (index + 1) * width // 16] = 250
    return frame


# --- ISO base media (mp4) boxes ------------------------------------------------------------------

_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"moof", b"traf", b"mvex"}


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None, path: tuple = ()):
    """``(path, offset, header_size, size)`` of every box, depth first (``path`` ends with the box's type)."""
    end = len(data) if end is None else end
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        size = end - position if size == 0 else size
        yield path + (kind,), position, 8, size
        if kind in _MP4_CONTAINERS:
            yield from mp4_boxes(data, position + 8, position + size, path + (kind,))
        position += size


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, payload: bytes) -> bytes:
    return _box(kind, bytes(4) + payload)  # version 0, no flags


def _rebuild(data: bytes, replace: dict) -> bytes:
    """``data`` with each box whose type is in ``replace`` swapped for ``replace[type](box_bytes)`` (None drops
    it); container boxes are rebuilt around their new children."""

    def level(start: int, end: int) -> bytes:
        out, position = b"", start
        while position + 8 <= end:
            size, kind = struct.unpack_from(">I4s", data, position)
            if kind in _MP4_CONTAINERS:
                out += _box(kind, level(position + 8, position + size))
            elif kind in replace:
                out += replace[kind](data[position : position + size]) or b""
            else:
                out += data[position : position + size]
            position += size
        return out

    return level(0, len(data))


def offsets_past_the_end(valid: bytes) -> bytes:
    """``valid`` (an mp4) with every chunk offset of its ``stco`` box pointing far past the end of the file.

    The demuxer then seeks beyond the data to read a frame: decord's
    in-memory reader answered that by copying from beyond its buffer and
    crashed the process.
    """
    data = bytearray(valid)
    box = data.find(b"stco")
    assert box > 0, "the mp4 has no stco box"
    (count,) = struct.unpack_from(">I", data, box + 8)  # after the box type: version and flags, then the count
    assert count > 0, "the stco box lists no chunk"
    for entry in range(count):
        struct.pack_into(">I", data, box + 12 + 4 * entry, 0x7FFFFFF0)
    return bytes(data)


def index_bomb_mp4(valid: bytes, samples: int, keep_mdat: int = 512) -> bytes:
    """``valid`` (a one-track mp4, ``moov`` after ``mdat``) cut (or padded) to ``keep_mdat`` bytes of media whose sample
    tables declare ``samples`` one-byte samples in one chunk: FFmpeg indexes every declared sample when it
    opens the file (35 bytes each here)."""
    cut = _rebuild(valid, {b"mdat": lambda box: _box(b"mdat", box[8 : 8 + keep_mdat].ljust(keep_mdat, b"\0"))})
    media = next(offset for path, offset, header, _ in mp4_boxes(cut) if path == (b"mdat",)) + 8
    return _rebuild(cut, {
        b"stts": lambda box: _full_box(b"stts", struct.pack(">III", 1, samples, 1024)),
        b"stsc": lambda box: _full_box(b"stsc", struct.pack(">IIII", 1, 1, samples, 1)),
        b"stsz": lambda box: _full_box(b"stsz", struct.pack(">II", 1, samples)),
        b"stco": lambda box: _full_box(b"stco", struct.pack(">II", 1, media)),
        b"stss": lambda box: None,
    })


def fragment_bomb_mp4(fragmented: bytes, samples: int) -> bytes:
    """A fragmented mp4 whose first fragment (``trun``) declares ``samples`` samples of the default size."""
    data = bytearray(fragmented)
    offset = next(offset for path, offset, header, _ in mp4_boxes(fragmented) if path[-1] == b"trun")
    flags, _ = struct.unpack_from(">II", data, offset + 8)
    struct.pack_into(">II", data, offset + 8, flags & ~0xF00, samples)  # no per-sample fields: default sizes
    return bytes(data)


def rotated_mp4(valid: bytes, degrees: int) -> bytes:
    """``valid`` with its track's display matrix (``tkhd``) turning the picture ``degrees`` counter-clockwise,
    as phones write portrait videos (0x10000 is 1.0)."""
    turns = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees % 360]  # (cos, sin)
    cos, sin = turns
    data = bytearray(valid)
    offset = next(offset for path, offset, header, _ in mp4_boxes(valid) if path[-1] == b"tkhd")
    struct.pack_into(">4i", data, offset + 8 + 40, cos << 16, -sin << 16, 0, sin << 16)
    struct.pack_into(">i", data, offset + 8 + 56, cos << 16)
    return bytes(data)


def no_picture_mp4(valid: bytes) -> bytes:
    """``valid`` (an MPEG-4 Part 2 mp4) whose sample entry says 0x0 and whose samples are all zero bytes:
    FFmpeg finds no frame size anywhere."""
    data = bytearray(valid)
    offset = next(offset for path, offset, header, _ in mp4_boxes(valid) if path[-1] == b"stsd")
    struct.pack_into(">HH", data, offset + 16 + 8 + 24, 0, 0)  # stsd header, entry header, then width/height
    media = next((offset, size) for path, offset, header, size in mp4_boxes(valid) if path == (b"mdat",))
    data[media[0] + 8 : media[0] + media[1]] = bytes(media[1] - 8)
    return bytes(data)


# --- other containers and formats ---------------------------------------------------------------


def ffconcat_script(*names: str) -> bytes:
    """An ffconcat script: FFmpeg's concat demuxer opens each named file, relative to the script."""
    return b"ffconcat version 1.0\n" + b"".join(b"file " + name.encode() + b"\n" for name in names)


def hls_playlist(*segments: str) -> bytes:
    """An HLS playlist: FFmpeg's hls demuxer reads each segment (a file next to it, or a URL)."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:10", "#EXT-X-MEDIA-SEQUENCE:0"]
    for segment in segments:
        lines += ["#EXTINF:1.0,", segment]
    return ("\n".join(lines + ["#EXT-X-ENDLIST"]) + "\n").encode()


def png_image(width: int = 16, height: int = 16) -> bytes:
    """One PNG (FFmpeg would read it with an image demuxer, the kind that also reads numbered sequences)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def zero_size_animated_webp() -> bytes:
    """An animated WebP of one frame whose VP8 key frame header says 0x0."""
    vp8 = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", 0, 0) + bytes(8)  # frame tag, start code, 0x0
    frame = b"VP8 " + struct.pack("<I", len(vp8)) + vp8
    anmf = bytes(6) + bytes(6) + bytes(3) + b"\x00" + frame  # position, size (minus one), duration, flags
    vp8x = struct.pack("<I", 0x02) + bytes(6)  # the animation flag, a canvas of 1x1 (sizes minus one)
    chunks = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    chunks += b"ANIM" + struct.pack("<I", 6) + bytes(6)
    chunks += b"ANMF" + struct.pack("<I", len(anmf)) + anmf
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def lying_avi(valid: bytes, frames: int) -> bytes:
    """``valid`` (an AVI) whose main header (``avih``) and video stream header (``strh``) declare ``frames``."""
    data = bytearray(valid)
    for fourcc, offset in _riff_chunks(valid, 12, len(valid)):
        if fourcc == b"avih":
            struct.pack_into("<I", data, offset + 8 + 16, frames)  # dwTotalFrames
        elif fourcc == b"strh" and valid[offset + 8 : offset + 12] == b"vids":
            struct.pack_into("<I", data, offset + 8 + 32, frames)  # dwLength
    return bytes(data)


def _riff_chunks(data: bytes, start: int, end: int):
    position = start
    while position + 8 <= end:
        fourcc = data[position : position + 4]
        (size,) = struct.unpack_from("<I", data, position + 4)
        yield fourcc, position
        if fourcc == b"LIST":
            yield from _riff_chunks(data, position + 12, position + 8 + size)
        position += 8 + size + (size & 1)


def flv_keyframes_bomb(valid: bytes, entries: int) -> bytes:
    """``valid`` (an FLV) whose metadata tag holds a keyframe index declaring ``entries`` times and file
    positions: FFmpeg allocates 8 bytes per declared entry, zeroed, before reading one."""

    def amf_string(text: str) -> bytes:
        return struct.pack(">H", len(text)) + text.encode()

    keyframes = b"\x03"  # an object: times and filepositions as strict arrays of one number each
    for name in ("times", "filepositions"):
        keyframes += amf_string(name) + b"\x0a" + struct.pack(">I", entries) + b"\x00" + struct.pack(">d", 0.0)
    keyframes += b"\x00\x00\x09"
    body = b"\x02" + amf_string("onMetaData") + b"\x08" + struct.pack(">I", 1)
    body += amf_string("keyframes") + keyframes + b"\x00\x00\x09"
    tag = bytes([18]) + len(body).to_bytes(3, "big") + bytes(7) + body
    header = valid[:13]  # "FLV", version, flags, header size, the first previous-tag size
    return header + tag + struct.pack(">I", len(tag)) + _flv_tags_without_metadata(valid)


def _flv_tags_without_metadata(valid: bytes) -> bytes:
    out, position = b"", 13
    while position + 11 <= len(valid):
        kind, size = valid[position], int.from_bytes(valid[position + 1 : position + 4], "big")
        if kind != 18:
            out += valid[position : position + 11 + size + 4]
        position += 11 + size + 4
    return out
