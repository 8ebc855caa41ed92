"""The messages between the API server and a decode worker, and the server's checks on every reply.

A worker parses hostile input, so the server treats it as an untrusted
party: replies are typed msgpack (never a pickle), at most
:data:`MAX_REPLY_BYTES` long, read against a deadline, and checked
(:func:`check_reply`: the expected type, sizes and counts in range, finite
numbers, known failure kinds, bounded text). Any violation is
:class:`WorkerMisbehaved`, and the server retires that worker.

Framing: a 4-byte big-endian length, then the msgpack body, on a Unix
stream socket; the ``Decode`` request carries the frames' memfd as
``SCM_RIGHTS``. This module imports no vLLM and no PyAV.
"""

from __future__ import annotations

import array
import math
import socket
import struct
import time
from typing import Union

import msgspec

from vllm_stgridpool.video.decoder import VideoHeader

__all__ = [
    "Close",
    "Closed",
    "Decode",
    "Decoded",
    "Failed",
    "FAILURE_KINDS",
    "MAX_REPLY_BYTES",
    "Open",
    "Opened",
    "Ready",
    "WorkerMisbehaved",
    "check_reply",
    "receive_reply",
    "receive_request",
    "send",
]


# --- requests (server -> worker) ----------------------------------------------------------


class Open(msgspec.Struct, tag=True):
    path: str
    max_pixels: int
    max_packets: int
    cpu_seconds: int  # the worker's CPU time limit for this video (RLIMIT_CPU, from what it has used)


class Decode(msgspec.Struct, tag=True):
    indices: list[int]
    nbytes: int  # followed by the frames' memfd


class Close(msgspec.Struct, tag=True):
    pass


# --- replies (worker -> server) -----------------------------------------------------------


class Ready(msgspec.Struct, tag=True):
    network_isolated: bool  # the worker runs in a network namespace of its own


class Opened(msgspec.Struct, tag=True):
    header: VideoHeader


class Decoded(msgspec.Struct, tag=True):
    pass


class Closed(msgspec.Struct, tag=True):
    pass


class Failed(msgspec.Struct, tag=True):
    kind: str  # one of FAILURE_KINDS
    message: str


# What a worker may say went wrong: the video's fault ("undecodable", "frame_size"), one of its limits
# ("memory": RLIMIT_DATA; "open_files": RLIMIT_NOFILE), or its own ("internal").
FAILURE_KINDS = frozenset({"undecodable", "frame_size", "memory", "open_files", "internal"})
MAX_REPLY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 2000  # of a Failed reply's text, which reaches the client
# Largest values a reply may carry: past these a header is not a video but a lie.
MAX_SIDE = 1 << 16
MAX_FRAMES = 1 << 40
MAX_FPS = 1e6

_REQUESTS = msgspec.msgpack.Decoder(Union[Open, Decode, Close])
_REPLIES = msgspec.msgpack.Decoder(Union[Ready, Opened, Decoded, Closed, Failed])
_ENCODER = msgspec.msgpack.Encoder()
_LENGTH = struct.Struct(">I")


class WorkerMisbehaved(Exception):
    """A worker's reply broke the protocol (too long, malformed, unexpected, out of range) or came too late."""


class ReplyTimeout(WorkerMisbehaved):
    """No complete reply before the deadline."""


def send(sock: socket.socket, message, handle: int | None = None, timeout: float = 10.0) -> None:
    """Send one message (and ``handle`` as SCM_RIGHTS); ``OSError`` if the peer is gone or stalls for ``timeout``."""
    data = encode(message)
    ancillary = [] if handle is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [handle]))]
    sock.settimeout(timeout)
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_reply(sock: socket.socket, until: float):
    """The worker's next reply, decoded and typed; raises ``EOFError`` when it closed the socket.

    Any file descriptor the worker attaches is dropped by the kernel (no
    ancillary buffer is offered); a reply longer than
    :data:`MAX_REPLY_BYTES`, malformed, or not complete by ``until``
    (``time.monotonic()``) is :class:`WorkerMisbehaved`.
    """
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size, until))
    if length > MAX_REPLY_BYTES:
        raise WorkerMisbehaved(f"sent a reply of {length:,} bytes (the most is {MAX_REPLY_BYTES:,})")
    body = _read_exactly(sock, length, until)
    try:
        return _REPLIES.decode(body)
    except msgspec.DecodeError as error:
        raise WorkerMisbehaved(f"sent a malformed reply ({error})") from None


def check_reply(reply, expected: tuple[type, ...], max_pixels: int = 0):
    """``reply`` if it is one of ``expected`` (or a valid ``Failed``) with every value in range; else
    :class:`WorkerMisbehaved`."""
    if isinstance(reply, Failed):
        if reply.kind not in FAILURE_KINDS:
            raise WorkerMisbehaved(f"sent an unknown failure kind {reply.kind[:40]!r}")
        if len(reply.message) > MAX_MESSAGE_CHARS or not reply.message.isprintable():
            raise WorkerMisbehaved(f"sent a failure message of {len(reply.message):,} characters, not all printable")
        return reply
    if not isinstance(reply, expected):
        raise WorkerMisbehaved(f"answered {type(reply).__name__} where {' or '.join(t.__name__ for t in expected)} was due")
    if isinstance(reply, Opened):
        _check_header(reply.header, max_pixels)
    return reply


def _check_header(header: VideoHeader, max_pixels: int) -> None:
    width, height, frames, fps = header.width, header.height, header.total_frames, header.fps
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise WorkerMisbehaved(f"sent a frame size of {width}x{height}")
    if max_pixels and width * height > 2 * max_pixels:  # the worker's FFmpeg refuses larger frames itself
        raise WorkerMisbehaved(f"sent a frame size of {width}x{height}, past the limit it was given")
    if not 1 <= frames <= MAX_FRAMES:
        raise WorkerMisbehaved(f"sent a frame count of {frames}")
    if not (math.isfinite(fps) and 0 <= fps <= MAX_FPS):
        raise WorkerMisbehaved(f"sent a frame rate of {fps}")
    if getattr(header, "rotation", 0) not in (0, 90, 180, 270):
        raise WorkerMisbehaved(f"sent a rotation of {header.rotation}")


def _read_exactly(sock: socket.socket, size: int, until: float) -> bytes:
    chunks, missing = [], size
    while missing:
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise ReplyTimeout("sent no complete reply in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(missing, 1 << 16))
        except (socket.timeout, TimeoutError):
            raise ReplyTimeout("sent no complete reply in time") from None
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


# --- the worker's side (it trusts the server) ---------------------------------------------


def receive_request(sock: socket.socket):
    """``(request, handle or None)``; ``EOFError`` when the server closed the socket."""
    header, handles = _receive_with_handles(sock, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    body, more = _receive_with_handles(sock, length)
    handles += more
    request = _REQUESTS.decode(body)
    return request, (handles[0] if handles else None)


def _receive_with_handles(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    chunks, handles, missing = [], [], size
    while missing:
        chunk, fds, _, _ = socket.recv_fds(sock, missing, 1)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        handles += fds
        missing -= len(chunk)
    return b"".join(chunks), handles


def encode(message) -> bytes:
    """One framed message (for a worker's replies, and for tests that play a worker)."""
    body = _ENCODER.encode(message)
    return _LENGTH.pack(len(body)) + body
