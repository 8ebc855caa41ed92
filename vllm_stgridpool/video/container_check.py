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
# The names of the FLV keyframe arrays FFmpeg's flv demuxer reads (each a strict array: type byte 0x0a).
_FLV_KEYFRAME_ARRAYS = (b"times", b"filepositions")
_AMF_NUMBER_BYTES = 9


class ContainerRefused(ValueError):
    """The upload is not an accepted video container, or its header declares counts it cannot hold (HTTP 400)."""


class _Overstated(Exception):
    """What a container's header declares beyond its bytes or the server's cap (completed by :func:`inspect`)."""


def identify(data) -> str:
    """The FFmpeg demuxer for ``data`` from its first bytes; :class:`ContainerRefused` unless one of :data:`DEMUXERS`."""
    try:
        return _identify(data)
    except ContainerRefused:
        raise
    except Exception as error:  # whatever the bytes do to this reader, the answer is a 400, never a 500
        raise ContainerRefused(f"Could not decode video: the upload could not be read ({type(error).__name__})") from None


def _identify(data) -> str:
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
    except Exception as error:  # a 400, never a 500, whatever the bytes do to this reader
        raise ContainerRefused(
            f"Could not decode video: the {DEMUXERS[demuxer]} container could not be read ({type(error).__name__})"
        ) from None
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

# FFmpeg's mov reader gives up past 11 levels of boxes ("Atoms too deeply nested"); real files nest < 10.
MAX_BOX_DEPTH = 16
# Boxes FFmpeg's mov reader reads as lists of boxes. It reads each child by its type wherever it is
# (a ``stsz`` inside ``dinf`` or ``udta`` sets the last track's samples), so each is walked the same way.
_MP4_CONTAINERS = frozenset({
    b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"edts", b"udta", b"mvex", b"moof", b"traf", b"mfra",
    b"tref", b"ilst", b"wave", b"sinf", b"schi", b"iprp", b"ipco", b"rmra", b"rmda", b"clip", b"matt", b"gmhd",
    b"tapt", b"meco", b"strk", b"strd",
})
# Bytes before a sample entry's own boxes (FFmpeg reads the rest of each ``stsd`` entry as boxes):
# video, sound versions 0, 1 and 2, and the plain 8 of other entries.
_SAMPLE_ENTRY_HEADERS = (78, 28, 44, 64, 8)
# Tables FFmpeg allocates or indexes by their entry count: type -> (where the count is, bytes per entry).
_MP4_TABLES = {
    b"stts": (4, 8), b"ctts": (4, 8), b"stco": (4, 4), b"co64": (4, 8), b"stsc": (4, 12), b"stss": (4, 4),
    b"stps": (4, 4), b"elst": (4, 12), b"dref": (4, 8), b"sbgp": (8, 8),
}


class _Track:
    """What one track's boxes declare (every copy: FFmpeg keeps the last, so each must fit)."""

    def __init__(self):
        self.handler = b""
        self.sizes: list[tuple[int, int]] = []  # (sample count, sample size) of each stsz/stz2
        self.times: list[tuple[int, int, int]] = []  # (entries, frames, first delta) of each stts
        self.chunks = 0


class _Mp4Walk:
    """Walks every box FFmpeg's mov demuxer reads, without recursion, adding up the samples it would index."""

    def __init__(self, data: memoryview, max_packets: int):
        self.data, self.max_packets = data, max_packets
        self.searchable = data.obj if isinstance(data.obj, (bytes, mmap.mmap)) else bytes(data)
        self.boxes = 0
        self.samples = 0
        self.tracks = [_Track()]  # the first collects what comes before any trak
        self.default_sizes: dict[int, int] = {}  # track id -> default sample size (trex)
        self.default_size = 0  # of the fragment being read (tfhd)

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
            self._step()
            yield kind, position + header, min(position + size, end)
            position += size

    def file(self) -> None:
        levels = [(b"", self.children(0, len(self.data)))]
        while levels:
            parent, boxes = levels[-1]
            for kind, start, end in boxes:
                if kind == b"hoov" and bytes(self.data[start + 4 : start + 8]) in (b"mvhd", b"cmov"):
                    kind = b"moov"  # FFmpeg reads such a box as the moov
                self.visit(kind, start, end)
                inner = self._children_start(parent, kind, start, end)
                if inner is not None:
                    if len(levels) >= MAX_BOX_DEPTH:
                        raise _Overstated(f"nests boxes deeper than {MAX_BOX_DEPTH} levels (FFmpeg reads 11)")
                    levels.append((kind, self.children(inner, end)))
                    break
            else:
                levels.pop()
        for track in self.tracks:
            self.track(track)

    def visit(self, kind: bytes, at: int, end: int) -> None:
        track = self.tracks[-1]
        if kind == b"cmov":
            raise _Overstated("has a compressed header (cmov), which this server does not read")
        if kind == b"trak":
            self.tracks.append(_Track())
        elif kind == b"hdlr" and not track.handler:  # the media handler comes before minf's data handler
            track.handler = bytes(self.data[at + 8 : at + 12])
        elif kind in (b"stsz", b"stz2"):
            track.sizes.append((self._u32(at + 8), self._u32(at + 4) if kind == b"stsz" else 0))
        elif kind in _MP4_TABLES:
            offset, per_entry = _MP4_TABLES[kind]
            offset += 4 * (kind == b"sbgp" and self.data[at] == 1 if at < end else 0)  # v1 adds a parameter
            entries = self._u32(at + offset)
            _within(f"entries in a {kind.decode()} table", entries, per_entry, len(self.data) - at, self.max_packets)
            if kind == b"stts":
                track.times.append(self._time_to_sample(at, entries))
            elif kind in (b"stco", b"co64"):
                track.chunks = max(track.chunks, entries)
        elif kind == b"sdtp":
            _within("sample dependency flags (sdtp)", max(0, end - at - 4), 1, len(self.data), self.max_packets)
        elif kind == b"traf":
            self.default_size = 0
        elif kind == b"trex" and at + 20 <= end:
            track_id, _, _, size = struct.unpack_from(">IIII", self.data, at + 4)
            self.default_sizes[track_id] = size
        elif kind == b"tfhd" and at + 8 <= end:
            self.fragment_defaults(at, end)
        elif kind == b"trun" and at + 8 <= end:
            self.fragment_samples(at, end)
        elif kind in (b"iinf", b"iloc") and at + 8 <= end:
            version = self.data[at]
            if kind == b"iinf":
                count, per_item = _count_field(self.data, at + 4, wide=version != 0), 12
            else:
                count, per_item = _count_field(self.data, at + 6, wide=version >= 2), 6
            _within(f"image items ({kind.decode()})", count, per_item, end - at, self.max_packets)
        elif kind == b"ipma" and at + 8 <= end:
            _within("image item properties (ipma)", _count_field(self.data, at + 4, True), 3, end - at,
                    self.max_packets)

    def _children_start(self, parent: bytes, kind: bytes, start: int, end: int) -> int | None:
        """Where the boxes inside this one start, if FFmpeg reads it as a list of boxes."""
        if kind in _MP4_CONTAINERS:
            return start
        if kind == b"meta":
            return self._meta_children(start, end)
        if kind == b"stsd":
            return start + 8
        if parent == b"stsd":
            return next((start + skip for skip in _SAMPLE_ENTRY_HEADERS if self._tiles(start + skip, end)), None)
        return None

    def _tiles(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is one or more whole boxes."""
        position = start
        while position + 8 <= end:
            (size,) = struct.unpack_from(">I", self.data, position)
            if size == 1 and position + 16 <= end:
                (size,) = struct.unpack_from(">Q", self.data, position + 8)
            if size < 8 or position + size > end:
                return False
            self._step()
            position += size
        return start < position == end

    def _step(self) -> None:
        self.boxes += 1
        if self.boxes > self.max_packets:
            raise _Overstated(f"holds more boxes than {_cap(self.max_packets)}")

    def track(self, track: _Track) -> None:
        sound = track.handler == b"soun" and bool(track.times)
        if sound and all(entries == 1 and delta == 1 for entries, _, delta in track.times):
            # Uncompressed audio: FFmpeg indexes its chunks, not its (byte-sized) samples.
            for samples, sample_size in track.sizes:
                _within("sound samples", samples, sample_size, len(self.data), 2**62)
            self._count("audio chunks", track.chunks)
            return
        for samples, sample_size in track.sizes:
            _within("samples in one track", samples, sample_size, len(self.data), self.max_packets)
        for _, frames, _ in track.times:
            _within("frames in one track", frames, 1, len(self.data), self.max_packets)
        self._count("samples", max((samples for samples, _ in track.sizes), default=0))

    def fragment_defaults(self, at: int, end: int) -> None:
        flags, track_id = struct.unpack_from(">II", self.data, at)
        self.default_size = self.default_sizes.get(track_id, 0)
        if flags & 0x10:  # default-sample-size-present, after the optional fields before it
            offset = at + 8 + 8 * bool(flags & 0x1) + 4 * bool(flags & 0x2) + 4 * bool(flags & 0x8)
            if offset + 4 <= end:
                (self.default_size,) = struct.unpack_from(">I", self.data, offset)

    def fragment_samples(self, at: int, end: int) -> None:
        flags, count = struct.unpack_from(">II", self.data, at)
        per_sample = 4 * bin(flags & 0xF00).count("1")
        header = 8 + 4 * bool(flags & 0x1) + 4 * bool(flags & 0x4)
        if per_sample:
            _within("per-sample entries in a fragment", count, per_sample, end - at - header, 2**62)
        if not flags & 0x200:  # no per-sample sizes: each sample has the default size
            _within("samples in a fragment", count, self.default_size, len(self.data), self.max_packets)
        self._count("samples", count)

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

    def _time_to_sample(self, at: int, entries: int) -> tuple[int, int, int]:
        """``stts``: its entry count, the samples its entries add up to, and the first entry's delta."""
        readable = max(0, min(entries, (len(self.data) - at - 8) // 8))
        pairs = np.frombuffer(self.data, ">u4", 2 * readable, at + 8)
        return entries, int(pairs[0::2].sum(dtype=np.uint64)), int(pairs[1]) if readable else 0

    def _u32(self, at: int) -> int:
        raw = bytes(self.data[at : at + 4])
        return int.from_bytes(raw, "big") if len(raw) == 4 else 0


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

    Looked for anywhere in the file (FFmpeg reads script tags wherever they are). FFmpeg reads a name by
    its 16-bit length and compares it as a C string, so ``times`` followed by NUL bytes within that length
    is ``times`` too."""
    raw = data.obj if isinstance(data.obj, (bytes, mmap.mmap)) else bytes(data)
    for name in _FLV_KEYFRAME_ARRAYS:
        position = raw.find(name, 2)
        while position >= 0:
            (length,) = struct.unpack_from(">H", raw, position - 2)
            after = position + length  # the array's type byte, then its count
            if length >= len(name) and after + 5 <= len(raw) and raw[after] == 0x0A \
                    and not bytes(raw[position + len(name) : after]).strip(b"\0"):
                (count,) = struct.unpack_from(">I", raw, after + 1)
                _within("keyframe index entries", count, _AMF_NUMBER_BYTES, len(raw) - after - 5, max_packets)
            position = raw.find(name, position + 1)


_DECLARED_COUNTS = {"mov": _mp4_samples, "avi": _avi_frames, "flv": _flv_keyframes}


# --- JPEG frames ------------------------------------------------------------------------------

# Markers as PIL's JPEG reader takes them (JpegImagePlugin.MARKER): FFC0-FFFE, the frame headers among them
# (DHP included), and those with no length after them; libjpeg skips the same way.
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE}
_JPEG_UNSIZED_MARKERS = {0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}  # JPG, RST0-7, SOI, EOI, JPG0-13
_JPEG_START_OF_SCAN = 0xDA


def jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's frame header, found as PIL finds it, before anything decodes it.

    Markers are read as PIL reads them: bytes other than 0xFF are skipped,
    ``FF 00`` is an escaped byte and ``FF FF`` fill, and each segment is
    skipped by its length up to the start of the scan.
    :class:`ContainerRefused` when ``data`` is not a JPEG, has no frame header
    before its image data, or more than one (libjpeg refuses those; PIL would
    take the last).
    """
    if not data.startswith(b"\xff\xd8\xff"):
        raise ContainerRefused("is not a JPEG image")
    sizes = []
    position = 2
    while position + 1 < len(data):
        if data[position] != 0xFF:
            position += 1
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill: the second 0xFF may start the marker
            position += 1
            continue
        position += 2
        if marker == 0x00 or marker in _JPEG_UNSIZED_MARKERS:
            continue
        if marker < 0xC0:
            raise ContainerRefused("is a damaged JPEG image (no marker where one is due)")
        if position + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, position)
        if marker in _JPEG_FRAME_MARKERS:
            if length < 7 or position + 7 > len(data):
                raise ContainerRefused("is a damaged JPEG image (a frame header too short for its size)")
            height, width = struct.unpack_from(">HH", data, position + 3)
            sizes.append((width, height))
        position += max(length, 2)
        if marker == _JPEG_START_OF_SCAN:
            break
    if not sizes:
        raise ContainerRefused("is a JPEG image without a frame header before its image data")
    if len(sizes) > 1:
        described = ", ".join(f"{width}x{height}" for width, height in sizes)
        raise ContainerRefused(f"is a JPEG image with {len(sizes)} frame headers ({described}), where one is allowed")
    return sizes[0]
