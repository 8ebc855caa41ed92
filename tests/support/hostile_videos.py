"""Malformed videos built from valid ones, for the loader's and the server's bad-input tests."""

from __future__ import annotations

import struct


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
