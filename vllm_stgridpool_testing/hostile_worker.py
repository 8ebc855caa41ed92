"""A decode worker taken over by a crafted video, for the decode pool's tests: it misbehaves on request.

``DecodePool(size, memory, worker_module="vllm_stgridpool_testing.hostile_worker")``
starts it like the real worker (same limits, same ``Ready``). The path of
``Open`` names what it does; a ``Decode`` after it follows the same script:

* ``valid``: a correct 4x4 video of 2 frames, frames filled with 7;
* ``malformed``, ``oversized``, ``wrong_type``, ``unknown_kind``, ``long_message``,
  ``negative_width``, ``nan_fps``, ``zero_frames``, ``bad_rotation``, ``extra_fd``:
  a broken reply to ``Open``;
* ``trickle``: a reply one byte a second; ``silent``: no reply at all;
* ``spin``: burns CPU under a 1-second soft limit (SIGXCPU);
* ``truncate``: on ``Decode``, tries to shrink the frames' memfd, then answers;
* ``keep_mapping`` / ``keep_fd``: on ``Decode``, keeps the frames' mapping or a
  duplicate of its descriptor after answering;
* ``hang_on_close`` / ``crash_on_close``: on ``Close``, never answers / dies.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import sys
import time

from vllm_stgridpool.video import decode_protocol as protocol
from vllm_stgridpool.video import decode_worker
from vllm_stgridpool.video.decoder import VideoHeader

HEADER = VideoHeader(width=4, height=4, total_frames=2, fps=25.0)
_kept: list = []  # what keep_mapping / keep_fd hold on to


def reply_to_open(sock: socket.socket, script: str) -> None:
    say = lambda message: sock.sendall(protocol.encode(message))  # noqa: E731
    if script in ("valid", "truncate", "keep_mapping", "keep_fd", "hang_on_close", "crash_on_close"):
        say(protocol.Opened(header=HEADER))
    elif script == "malformed":
        sock.sendall(len(b"\xc1\xc1\xc1").to_bytes(4, "big") + b"\xc1\xc1\xc1")
    elif script == "oversized":
        sock.sendall((100 * 2**20).to_bytes(4, "big") + b"x" * 4096)
    elif script == "wrong_type":
        say(protocol.Decoded())
    elif script == "unknown_kind":
        say(protocol.Failed(kind="pwned", message="x"))
    elif script == "long_message":
        say(protocol.Failed(kind="undecodable", message="x" * 10_000))
    elif script == "negative_width":
        say(protocol.Opened(header=VideoHeader(width=-4, height=4, total_frames=2, fps=25.0)))
    elif script == "nan_fps":
        say(protocol.Opened(header=VideoHeader(width=4, height=4, total_frames=2, fps=float("nan"))))
    elif script == "zero_frames":
        say(protocol.Opened(header=VideoHeader(width=4, height=4, total_frames=0, fps=25.0)))
    elif script == "bad_rotation":
        say(protocol.Opened(header=VideoHeader(width=4, height=4, total_frames=2, fps=25.0, rotation=45)))
    elif script == "extra_fd":
        data = protocol.encode(protocol.Opened(header=HEADER))
        socket.send_fds(sock, [data], [os.open("/dev/null", os.O_RDONLY)])
    elif script == "trickle":
        for byte in protocol.encode(protocol.Opened(header=HEADER)):
            sock.sendall(bytes([byte]))
            time.sleep(1)
    elif script == "silent":
        time.sleep(3600)
    elif script == "spin":
        decode_worker.limit_cpu_for_next_video(1)
        while True:
            pass


def decode(sock: socket.socket, script: str, request, handle: int) -> None:
    shared = mmap.mmap(handle, request.nbytes, flags=mmap.MAP_SHARED)
    shared[:] = b"\x07" * request.nbytes
    if script == "truncate":
        try:
            os.ftruncate(handle, 1)
        except OSError:
            pass
    if script == "keep_mapping":
        _kept.append(shared)
    else:
        shared.close()
    if script == "keep_fd":
        _kept.append(os.dup(handle))
    os.close(handle)
    sock.sendall(protocol.encode(protocol.Decoded()))


def serve(sock: socket.socket) -> None:
    script = "valid"
    while True:
        try:
            request, handle = protocol.receive_request(sock)
        except (EOFError, OSError):
            return
        if isinstance(request, protocol.Open):
            script = request.path
            reply_to_open(sock, script)
        elif isinstance(request, protocol.Decode):
            decode(sock, script, request, handle)
        elif script == "hang_on_close":
            time.sleep(3600)
        elif script == "crash_on_close":
            os.kill(os.getpid(), signal.SIGSEGV)
        else:
            sock.sendall(protocol.encode(protocol.Closed()))


def main(argv: list[str]) -> None:
    fd, memory_bytes, cpu_seconds = (int(value) for value in argv[1:4])
    decode_worker.apply_limits(memory_bytes, cpu_seconds)
    sock = socket.socket(fileno=fd)
    sock.sendall(protocol.encode(protocol.Ready(network_isolated=decode_worker.isolate_network())))
    serve(sock)


if __name__ == "__main__":
    main(sys.argv)
