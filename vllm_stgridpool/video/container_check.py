"""Which container an upload is, and whether the counts its header declares can be true, read before FFmpeg.

FFmpeg picks a demuxer by probing the bytes, and some demuxers read other
files: an ``ffconcat`` script or an HLS playlist sent as a video names files
next to the upload (or URLs), and FFmpeg opens them. So only the video
containers users send reach a demuxer (:data:`DEMUXERS`), chosen here from
the upload's first bytes and handed to FFmpeg by name, never probed.

Some demuxers also build an index from counts the header declares before
any limit can be checked: an mp4's sample tables (``stsz``, or a fragment's
``trun``) and HEIF item lists, and an FLV's keyframe arrays are allocated
from their declared counts (a 1,371-byte mp4 declaring 20M samples took
704 MB, a 1,163-byte FLV 2 GB). An AVI's or mp4's frame count costs FFmpeg
nothing but reached the API server as the video's length. Such counts are
checked here against the bytes received and ``max_video_packets``.
Matroska, MPEG-TS/PS and Ogg declare no count FFmpeg allocates by; they are
indexed as they are read (their packets are counted when the decoder reads
them).

Pure Python over the bytes (a ``bytes``, ``mmap`` or ``memoryview``):
imports no FFmpeg and no vLLM, and runs in the API server before a worker is
asked, and again in the worker before ``av.open``.
"""

from __future__ import annotations

import mmap
import struct

import numpy as np

__all__ = ["DEMUXERS", "FORMAT_WHITELIST", "ContainerRefused", "identify", "inspect", "jpeg_frame_size"]

# FFmpeg demuxer name -> the name users know. Why each: the containers phones, cameras,
# screen recorders, browsers and editors write (mp4/mov, WebM/Matroska), and the older or
# broadcast ones still uploaded (AVI, MPEG-TS/PS, FLV, Ogg). None of these opens another file.
DEMUXERS = {
    "mov": "MP4/MOV",
    "matroska": "Matroska/WebM",
    "avi": "AVI",
    "mpegts": "MPEG-TS",
    "mpeg": "MPEG-PS",
    "flv": "FLV",
    "ogg": "Ogg",
}
FORMAT_WHITELIST = ",".join(DEMUXERS)  # FFmpeg's own check of the demuxer it was given
ACCEPTED = ", ".join(DEMUXERS.values())

# What is refused, said by name: formats that read other files or URLs, and images and
# streams without a container.
_KNOWN_OTHERS = (
    (b"ffconcat version", "an ffconcat script (a list of other files to read)"),
    (b"#EXTM3U", "an HLS playlist (a list of other files or URLs to read)"),
    (b"<?xml", "an XML document (such as a DASH manifest, a list of URLs to read)"),
    (b"<MPD", "a DASH manifest (a list of URLs to read)"),
    (b"v=0", "an SDP description (network streams)"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "an ASF/WMV file"),
    (b"\x00\x00\x00\x01", "a raw video stream with no container"),
)

# Boxes an ISO base media file (mp4, mov, 3gp, m4v, fragmented mp4) may begin with.
_MP4_FIRST_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"sidx", b"moof", b"uuid"}
_TS_PACKET_SIZES = ((188, 0), (192, 4), (204, 0))  # (packet size, offset of the sync byte)
# Every AVI frame is a chunk of at least its 8-byte header in the file.
_AVI_CHUNK_HEADER = 8
# FLV keyframe arrays as FFmpeg's flv demuxer reads them: the name, then a strict array's type byte.
_FLV_KEYFRAME_ARRAYS = (b"\x00\x05times\x0a", b"\x00\x0dfilepositions\x0a")
_AMF_NUMBER_BYTES = 9


class ContainerRefused(ValueError):
    """The upload is not an accepted video container, or its header declares counts it cannot hold (HTTP 400)."""


class _Overstated(Exception):
    """What a container's header declares beyond its bytes or the server's cap (completed by :func:`inspect`)."""


def identify(data) -> str:
    """The FFmpeg demuxer for ``data`` from its first bytes; :class:`ContainerRefused` unless one of :data:`DEMUXERS`."""
    head = bytes(data[:16])
    if len(head) >= 8 and head[4:8] in _MP4_FIRST_BOXES and _box_size_plausible(head):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if _is_transport_stream(data):
        return "mpegts"
    raise ContainerRefused(
        f"Could not decode video: the upload is {_describe(head)}, not a video container this server accepts "
        f"({ACCEPTED})"
    )


def inspect(data, max_packets: int) -> str:
    """:func:`identify`'s demuxer, once the counts the header declares fit the bytes received and ``max_packets``."""
    demuxer = identify(data)
    check = _DECLARED_COUNTS.get(demuxer)
    try:
        if check is not None:
            with memoryview(data) as view:  # released here: the worker closes the mapping it views
                check(view, max_packets)
    except _Overstated as error:
        raise ContainerRefused(f"Could not decode video: the {DEMUXERS[demuxer]} container {error}") from None
    return demuxer


def _describe(head: bytes) -> str:
    if not head:
        return "empty"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "WAV audio"
    for magic, what in _KNOWN_OTHERS:
        if head.startswith(magic):
            return what
    if head[:3] == b"\x00\x00\x01":
        return "a raw video stream with no container"
    return "not a format it recognises"


def _box_size_plausible(head: bytes) -> bool:
    (size,) = struct.unpack_from(">I", head)
    return size in (0, 1) or size >= 8


def _is_transport_stream(data) -> bool:
    for packet, offset in _TS_PACKET_SIZES:
        syncs = [offset + packet * i for i in range(3) if offset + packet * i < len(data)]
        if len(syncs) >= 2 and all(data[position] == 0x47 for position in syncs):
            return True
    return False


def _cap(max_packets: int) -> str:
    return f"the server's max_video_packets of {max_packets:,} (STGRIDPOOL_MAX_VIDEO_PACKETS)"


def _within(what: str, count: int, per_item: int, nbytes: int, max_packets: int) -> None:
    """``count`` items of at least ``per_item`` bytes each must fit ``nbytes`` and stay within ``max_packets``."""
    if count * max(per_item, 1) > nbytes:
        raise _Overstated(f"declares {count:,} {what}, more than its {nbytes:,} bytes can hold")
    if count > max_packets:
        raise _Overstated(f"declares {count:,} {what}, more than {_cap(max_packets)}")


# --- mp4 / mov ----------------------------------------------------------------------


class _Mp4Walk:
    """Walks the boxes FFmpeg's mov demuxer allocates by, adding up the samples it would index."""

    def __init__(self, data: memoryview, max_packets: int):
        self.data, self.max_packets = data, max_packets
        self.searchable = data.obj if isinstance(data.obj, (bytes, mmap.mmap)) else bytes(data)
        self.boxes = 0
        self.samples = 0
        self.default_sizes: dict[int, int] = {}  # track id -> default sample size (trex)

    def children(self, start: int, end: int):
        """``(kind, payload_start, box_end)`` of each box in ``[start, end)``, read as FFmpeg reads them."""
        position = start
        while position + 8 <= end:
            size, kind = struct.unpack_from(">I4s", self.data, position)
            header = 8
            if size == 1 and position + 16 <= end:
                (size,) = struct.unpack_from(">Q", self.data, position + 8)
                header = 16
            elif size == 0:
                size = end - position
            if size < header:
                return  # FFmpeg stops reading this level too
            self.boxes += 1
            if self.boxes > self.max_packets:
                raise _Overstated(f"holds more boxes than {_cap(self.max_packets)}")
            yield kind, position + header, min(position + size, end)
            position += size

    def file(self) -> None:
        for kind, start, end in self.children(0, len(self.data)):
            if kind == b"moov":
                self.movie(start, end)
            elif kind == b"moof":
                self.fragment(start, end)
            elif kind == b"meta":
                self.items(start, end)

    def movie(self, start: int, end: int) -> None:
        for kind, child, child_end in self.children(start, end):
            if kind == b"cmov":
                raise _Overstated("has a compressed header (cmov), which this server does not read")
            if kind == b"trak":
                self.track(child, child_end)
            elif kind == b"mvex":
                for inner, at, inner_end in self.children(child, child_end):
                    if inner == b"trex" and at + 20 <= inner_end:
                        track_id, _, _, size = struct.unpack_from(">IIII", self.data, at + 4)
                        self.default_sizes[track_id] = size
            else:
                self.metadata(kind, child, child_end)

    def metadata(self, kind: bytes, start: int, end: int) -> None:
        """A ``meta`` box, or the ``udta`` that holds one."""
        if kind == b"meta":
            self.items(start, end)
        elif kind == b"udta":
            for inner, at, inner_end in self.children(start, end):
                self.metadata(inner, at, inner_end)

    def track(self, start: int, end: int) -> None:
        boxes: dict[bytes, int] = {}
        for kind, at, box_end in self._leaves(start, end):
            boxes.setdefault(kind, at)  # the media handler comes before minf's data handler
            self.metadata(kind, at, box_end)
        handler = self._bytes(boxes, b"hdlr", 8, 4)
        samples, sample_size = self._sample_count(boxes)
        entries, frames, first_delta = self._time_to_sample(boxes)
        if handler == b"soun" and entries == 1 and first_delta == 1:
            # Uncompressed audio: FFmpeg indexes its chunks, not its (byte-sized) samples.
            _within("sound samples", samples, sample_size, len(self.data), 2**62)
            self._count("audio chunks", self._u32(boxes, b"stco", 4) or self._u32(boxes, b"co64", 4))
            return
        _within("samples in one track", samples, sample_size, len(self.data), self.max_packets)
        _within("frames in one track", frames, 1, len(self.data), self.max_packets)
        self._count("samples", samples)

    def fragment(self, start: int, end: int) -> None:
        for kind, child, child_end in self.children(start, end):
            if kind != b"traf":
                continue
            default_size = 0
            for inner, at, inner_end in self.children(child, child_end):
                if inner == b"tfhd" and at + 8 <= inner_end:
                    flags, track_id = struct.unpack_from(">II", self.data, at)
                    default_size = self.default_sizes.get(track_id, 0)
                    if flags & 0x10:  # default-sample-size-present, after the optional fields before it
                        offset = at + 8 + 8 * bool(flags & 0x1) + 4 * bool(flags & 0x2) + 4 * bool(flags & 0x8)
                        if offset + 4 <= inner_end:
                            (default_size,) = struct.unpack_from(">I", self.data, offset)
                elif inner == b"trun" and at + 8 <= inner_end:
                    flags, count = struct.unpack_from(">II", self.data, at)
                    per_sample = 4 * bin(flags & 0xF00).count("1")
                    header = 8 + 4 * bool(flags & 0x1) + 4 * bool(flags & 0x4)
                    if per_sample:
                        _within("per-sample entries in a fragment", count, per_sample, inner_end - at - header, 2**62)
                    if not flags & 0x200:  # no per-sample sizes: each sample has the default size
                        _within("samples in a fragment", count, default_size, len(self.data), self.max_packets)
                    self._count("samples", count)

    def items(self, start: int, end: int) -> None:
        """HEIF item lists (``iinf``, ``iloc``, ``ipma``) of a ``meta`` box: FFmpeg allocates by their counts."""
        first = self._meta_children(start, end)
        if first is None:
            return
        for kind, at, box_end in self.children(first, end):
            if kind == b"iprp":
                self.items_properties(at, box_end)
            if kind not in (b"iinf", b"iloc") or at + 8 > box_end:
                continue
            version = self.data[at]
            if kind == b"iinf":
                count, per_item = _count_field(self.data, at + 4, wide=version != 0), 12
            else:
                count, per_item = _count_field(self.data, at + 6, wide=version >= 2), 6
            _within(f"image items ({kind.decode()})", count, per_item, box_end - at, self.max_packets)

    def items_properties(self, start: int, end: int) -> None:
        for kind, at, box_end in self.children(start, end):
            if kind == b"ipma" and at + 8 <= box_end:
                _within("image item properties (ipma)", _count_field(self.data, at + 4, True), 3, box_end - at,
                        self.max_packets)

    def _meta_children(self, start: int, end: int) -> int | None:
        """Where a ``meta`` box's children start: FFmpeg looks for its ``hdlr`` in steps of 4 bytes
        (an ISO ``meta`` has 4 bytes of version and flags first, a QuickTime one none)."""
        position = self.searchable.find(b"hdlr", start, end)
        while position >= 0 and (position - start) % 4:
            position = self.searchable.find(b"hdlr", position + 1, end)
        return position - 4 if position >= 4 else None

    def _count(self, what: str, count: int) -> None:
        self.samples += count
        if self.samples > self.max_packets:
            raise _Overstated(f"declares {self.samples:,} {what} in all, more than {_cap(self.max_packets)}")

    def _leaves(self, start: int, end: int):
        for kind, child, child_end in self.children(start, end):
            if kind in (b"mdia", b"minf", b"stbl"):
                yield from self._leaves(child, child_end)
            else:
                yield kind, child, child_end

    def _sample_count(self, boxes: dict) -> tuple[int, int]:
        if b"stsz" in boxes:
            return self._u32(boxes, b"stsz", 8), self._u32(boxes, b"stsz", 4)
        return self._u32(boxes, b"stz2", 8), 0

    def _time_to_sample(self, boxes: dict) -> tuple[int, int, int]:
        """``stts``: its entry count, the samples its entries add up to, and the first entry's delta."""
        entries = self._u32(boxes, b"stts", 4)
        if not entries:
            return 0, 0, 0
        at = boxes[b"stts"] + 8
        readable = max(0, min(entries, (len(self.data) - at) // 8))
        pairs = np.frombuffer(self.data, ">u4", 2 * readable, at)
        return entries, int(pairs[0::2].sum(dtype=np.uint64)), int(pairs[1]) if readable else 0

    def _u32(self, boxes: dict, kind: bytes, offset: int) -> int:
        raw = self._bytes(boxes, kind, offset, 4)
        return int.from_bytes(raw, "big") if len(raw) == 4 else 0

    def _bytes(self, boxes: dict, kind: bytes, offset: int, size: int) -> bytes:
        at = boxes.get(kind)
        return b"" if at is None else bytes(self.data[at + offset : at + offset + size])


def _count_field(data: memoryview, at: int, wide: bool) -> int:
    raw = bytes(data[at : at + (4 if wide else 2)])
    return int.from_bytes(raw, "big") if len(raw) == (4 if wide else 2) else 0


def _mp4_samples(data: memoryview, max_packets: int) -> None:
    _Mp4Walk(data, max_packets).file()


# --- AVI ------------------------------------------------------------------------------


def _avi_frames(data: memoryview, max_packets: int) -> None:
    """The frame counts of an AVI's header list (``avih``, each video ``strh``, OpenDML's ``dmlh``)."""
    for count in _avi_header_counts(data, 12, len(data), 0):
        _within("video frames", count, _AVI_CHUNK_HEADER, len(data), max_packets)


def _avi_header_counts(data: memoryview, start: int, end: int, depth: int):
    position = start
    while position + 8 <= end and depth < 4:
        fourcc = bytes(data[position : position + 4])
        (size,) = struct.unpack_from("<I", data, position + 4)
        body = position + 8
        kind = bytes(data[body : body + 4])
        if fourcc == b"LIST" and kind in (b"hdrl", b"strl", b"odml"):
            yield from _avi_header_counts(data, body + 4, min(body + size, end), depth + 1)
        elif fourcc == b"LIST" and kind == b"movi":
            return  # the header list is over
        elif fourcc == b"avih" and body + 20 <= end:
            yield struct.unpack_from("<I", data, body + 16)[0]
        elif fourcc == b"strh" and body + 36 <= end and kind == b"vids":
            yield struct.unpack_from("<I", data, body + 32)[0]
        elif fourcc == b"dmlh" and body + 4 <= end:
            yield struct.unpack_from("<I", data, body)[0]
        position = body + size + (size & 1)


# --- FLV ------------------------------------------------------------------------------


def _flv_keyframes(data: memoryview, max_packets: int) -> None:
    """The keyframe arrays of any FLV script tag: FFmpeg allocates 8 bytes per declared entry, zeroed.

    Looked for anywhere in the file (FFmpeg reads script tags wherever they are)."""
    raw = data.obj if isinstance(data.obj, (bytes, mmap.mmap)) else bytes(data)
    for marker in _FLV_KEYFRAME_ARRAYS:
        position = raw.find(marker)
        while position >= 0:
            at = position + len(marker)
            if at + 4 <= len(raw):
                (count,) = struct.unpack_from(">I", raw, at)
                _within("keyframe index entries", count, _AMF_NUMBER_BYTES, len(raw) - at - 4, max_packets)
            position = raw.find(marker, position + 1)


_DECLARED_COUNTS = {"mov": _mp4_samples, "avi": _avi_frames, "flv": _flv_keyframes}


# --- JPEG frames ------------------------------------------------------------------------------

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic coded).
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_UNSIZED_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's frame header (its first SOF marker), before anything decodes it.

    :class:`ContainerRefused` when ``data`` is not a JPEG, or its image data
    starts before any frame header.
    """
    if not data.startswith(b"\xff\xd8"):
        raise ContainerRefused("is not a JPEG image")
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ContainerRefused("is a damaged JPEG image (no marker where one is due)")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_UNSIZED_MARKERS:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _JPEG_FRAME_MARKERS and position + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # end of image or start of scan, before any frame header
            break
        position += 2 + length
    raise ContainerRefused("is a JPEG image without a frame header before its image data")
