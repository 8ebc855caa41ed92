"""A decode worker process: hard limits first, then PyAV, then the server's requests until it hangs up.

``python -m vllm_stgridpool.video.decode_worker FD MEMORY_BYTES CPU_SECONDS``
is started by the decode pool with a scrubbed environment in an empty
directory. Before it imports anything that parses video it sets its own
hard limits, so a video that takes the decoder over still cannot take the
machine:

* ``RLIMIT_DATA`` = MEMORY_BYTES (heap and private mappings: FFmpeg's
  index and frame buffers; the frames' shared memory is not counted, the
  server sized it). An allocation past it fails, and the video is refused
  naming the limit.
* ``RLIMIT_CPU``: CPU_SECONDS over the worker's life (then SIGKILL), and
  per video a soft limit the server sets in ``Open`` (then SIGXCPU).
* ``RLIMIT_NOFILE`` 64, ``RLIMIT_CORE`` 0 (no core dumps), ``RLIMIT_MEMLOCK`` 0,
  and ``PR_SET_NO_NEW_PRIVS``.
* Where the kernel lets an unprivileged process, a user and network
  namespace of its own: no network interface but a loopback that is down.

This module imports no vLLM.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import resource
import signal
import socket
import sys

OPEN_FILES = 64
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
# The worker maps the frames' memory in one call instead of taking a page fault per 4 KB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def apply_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """The worker's hard limits (see the module's note); called before PyAV is imported."""
    for limit, value in (
        (resource.RLIMIT_DATA, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_MEMLOCK, 0),
    ):
        resource.setrlimit(limit, (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def isolate_network() -> bool:
    """Enter a user and network namespace of our own (no network); False where the kernel forbids it."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0


def limit_cpu_for_next_video(cpu_seconds: int) -> None:
    """A soft CPU limit ``cpu_seconds`` past what this worker has used (SIGXCPU there), within its life's limit."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, life = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if life == resource.RLIM_INFINITY else min(soft, life), life))


def failure_kind(error: BaseException) -> str:
    """Which :data:`~decode_protocol.FAILURE_KINDS` an exception (or the error it was raised from) is."""
    from vllm_stgridpool.video.decoder import FrameSizeMismatch, UndecodableVideo

    seen = error
    while seen is not None:
        if isinstance(seen, MemoryError) or getattr(seen, "errno", None) in (errno.ENOMEM, errno.EAGAIN):
            return "memory"  # (EAGAIN: FFmpeg could not start a thread within RLIMIT_DATA)
        if getattr(seen, "errno", None) in (errno.EMFILE, errno.ENFILE):
            return "open_files"
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, UndecodableVideo):
        return "undecodable"
    if isinstance(error, FrameSizeMismatch):
        return "frame_size"
    return "internal"


def serve(sock: socket.socket) -> None:
    """Answer the server's requests until it closes the socket. After ``Decoded`` or ``Closed`` no video is open."""
    from vllm_stgridpool.video import decode_protocol as protocol
    from vllm_stgridpool.video.decoder import decode_frames, open_video

    video = None
    while True:
        try:
            request, handle = protocol.receive_request(sock)
        except (EOFError, OSError):
            return
        try:
            if isinstance(request, protocol.Close):
                reply = protocol.Closed()
            elif isinstance(request, protocol.Open):
                limit_cpu_for_next_video(request.cpu_seconds)
                video = open_video(request.path, request.max_pixels, request.max_packets)
                reply = protocol.Opened(header=video.header)
            else:
                _decode_into_shared(video, request, handle, decode_frames)
                reply = protocol.Decoded()
        except Exception as error:  # noqa: BLE001 - every failure is a reply
            reply = protocol.Failed(kind=failure_kind(error), message=_printable(f"{error}"))
        finally:
            if handle is not None:
                os.close(handle)
        if not isinstance(reply, protocol.Opened) and video is not None:
            video.close()
            video = None
        try:
            sock.sendall(protocol.encode(reply))
        except OSError:
            return


def _decode_into_shared(video, request, handle: int, decode_frames) -> None:
    """Decode into the server's memfd, and unmap it before the reply (the server then seals the file for writes).

    After an error the mapping goes with the error's traceback (its views
    are in there), also before the reply; the server discards such frames.
    """
    import numpy as np

    if video is None or handle is None:
        raise RuntimeError("Decode without an open video or without its memory")
    header = video.header
    shared = mmap.mmap(handle, request.nbytes, flags=_MAP_FLAGS)
    out = np.frombuffer(shared, np.uint8).reshape(len(request.indices), header.height, header.width, 3)
    decode_frames(video, request.indices, out)
    del out
    shared.close()


def _printable(text: str) -> str:
    from vllm_stgridpool.video.decode_protocol import MAX_MESSAGE_CHARS

    return "".join(c if c.isprintable() else " " for c in text)[:MAX_MESSAGE_CHARS]


def main(argv: list[str]) -> None:
    fd, memory_bytes, cpu_seconds = (int(value) for value in argv[1:4])
    apply_limits(memory_bytes, cpu_seconds)
    isolated = isolate_network()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server's whole group; the server ends us
    import av  # noqa: F401  (loaded before the first request, not during it)
    import numpy  # noqa: F401

    from vllm_stgridpool.video import decode_protocol as protocol

    sock = socket.socket(fileno=fd)
    sock.sendall(protocol.encode(protocol.Ready(network_isolated=isolated)))
    serve(sock)


if __name__ == "__main__":
    main(sys.argv)
