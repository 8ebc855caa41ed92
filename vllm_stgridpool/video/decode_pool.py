"""Worker processes that decode uploads, so a decoder crash costs one request and not the API server.

vLLM decodes videos inside its API server process; a native crash there
(FFmpeg parsing hostile input) would end the server for every client. Here
each video is decoded by one of a few worker processes started once and
reused. The frames come back through shared memory (a ``memfd`` the server
creates, sized from the header and handed to the worker; reused for later
videos once the frames are released, see :class:`Arenas`), not as a
pickled copy. Messages are typed msgpack, so a worker taken over by a crafted video
cannot send the server a pickle. A worker that dies fails only its request
(:class:`DecoderDied`) and is replaced by the next request that needs one.

The decoded bytes of all videos decoding at once stay under a budget
(:class:`DecodeBudget`): a request waits for a worker and for its share of
the budget up to a deadline, then gets :class:`DecoderBusy`.

This module imports no vLLM: ``python -m vllm_stgridpool.video.decode_pool FD``
is the worker's entry point.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import msgspec
import numpy as np

from vllm_stgridpool.video.decoder import FrameSizeMismatch, UndecodableVideo, VideoHeader

__all__ = ["Arenas", "DecodeBudget", "DecodePool", "DecoderBusy", "DecoderDied", "WorkerFailure"]


# --- messages --------------------------------------------------------------------


class Open(msgspec.Struct, tag=True):
    path: str
    max_pixels: int


class Decode(msgspec.Struct, tag=True):
    indices: list[int]
    nbytes: int  # followed by the shared memory's file descriptor


class Close(msgspec.Struct, tag=True):
    pass


class Opened(msgspec.Struct, tag=True):
    header: VideoHeader


class Decoded(msgspec.Struct, tag=True):
    pass


class Failed(msgspec.Struct, tag=True):
    kind: str  # "undecodable", "frame_size" or "internal"
    message: str


_REQUESTS = msgspec.msgpack.Decoder(Open | Decode | Close)
_REPLIES = msgspec.msgpack.Decoder(Opened | Decoded | Failed)
_ENCODER = msgspec.msgpack.Encoder()


# --- errors the server turns into HTTP answers ----------------------------------------


class DecoderBusy(Exception):
    """No worker or no budget came free before the deadline (HTTP 503)."""


class DecoderDied(Exception):
    """The worker decoding this video ended (crash, kill) or overran the decode timeout."""

    def __init__(self, message: str, crashed: bool):
        super().__init__(message)
        self.crashed = crashed  # ended by a crash signal (the input's fault) rather than killed or timed out


class WorkerFailure(Exception):
    """A worker's own error that is not the video's fault (HTTP 500)."""


_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
# Both sides map the frames' pages in one call instead of taking a page fault per 4 KB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


# --- the server's side ---------------------------------------------------------------


class DecodeBudget:
    """Bytes of decoded frames that may be in flight at once; reservations wait their turn."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, deadline: float) -> Iterator[None]:
        with self._changed:
            while self.in_flight + nbytes > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DecoderBusy(
                        f"the server is decoding {self.in_flight:,} bytes of video frames and this video needs "
                        f"{nbytes:,} more, over its video decode budget of {self.capacity:,} bytes; try again later"
                    )
                self._changed.wait(remaining)
            self.in_flight += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= nbytes
                self._changed.notify_all()


class _Worker:
    """One worker process and the server's end of its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.connection = Connection(ours.detach())
        self.broken = False

    def send(self, request, handle: int | None = None) -> None:
        try:
            self.connection.send_bytes(_ENCODER.encode(request))
            if handle is not None:
                send_handle(self.connection, handle, self.process.pid)
        except OSError:
            raise self._died() from None

    def receive(self, timeout: float):
        try:
            if not self.connection.poll(timeout):
                self.stop()
                self.broken = True
                raise DecoderDied(f"decoding took longer than {timeout:g} s; the decoder process was ended", False)
            return _REPLIES.decode(self.connection.recv_bytes())
        except (OSError, EOFError):
            raise self._died() from None

    def _died(self) -> DecoderDied:
        self.broken = True
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.stop()
            code = self.process.returncode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return DecoderDied(f"the decoder process ended with {name} while decoding this video", -code in _CRASH_SIGNALS)
        return DecoderDied(f"the decoder process exited with status {code} while decoding this video", False)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class PooledDecoder:
    """One request's use of a worker: open the video, read its header, then decode the sampled frames."""

    def __init__(self, worker: _Worker, budget: DecodeBudget, arenas: Arenas, deadline: float, timeout: float):
        self._worker, self._budget, self._arenas, self._deadline, self._timeout = worker, budget, arenas, deadline, timeout
        self._open = False

    def open(self, path: str, max_pixels: int) -> VideoHeader:
        self._worker.send(Open(path=path, max_pixels=max_pixels))
        reply = self._result(self._worker.receive(self._timeout))
        self._open = True
        return reply.header

    def decode(self, indices: list[int], header: VideoHeader, nbytes: int) -> np.ndarray:
        """The frames as a (T, H, W, 3) uint8 array over shared memory the worker wrote."""
        with self._budget.reserve(nbytes, self._deadline):
            handle, size = self._arenas.take(nbytes)
            try:
                self._open = False  # the worker closes the video after any Decode
                self._worker.send(Decode(indices=indices, nbytes=nbytes), handle)
                self._result(self._worker.receive(self._timeout))
                shared = mmap.mmap(handle, nbytes, flags=_MAP_FLAGS)
            except BaseException:
                self._arenas.give_back(handle, size)
                raise
        # Every view of the frames keeps ``flat`` alive (numpy points views at it): once the
        # last is gone the arena goes back for the next video.
        flat = np.frombuffer(shared, np.uint8)
        weakref.finalize(flat, self._arenas.give_back, handle, size)
        return flat.reshape(len(indices), header.height, header.width, 3)

    def close(self) -> None:
        if self._open and not self._worker.broken:
            self._open = False
            self._worker.send(Close())

    @staticmethod
    def _result(reply):
        if isinstance(reply, Failed):
            if reply.kind == "undecodable":
                raise UndecodableVideo(reply.message)
            if reply.kind == "frame_size":
                raise FrameSizeMismatch(reply.message)
            raise WorkerFailure(reply.message)
        return reply


class InProcessDecoder:
    """:class:`PooledDecoder`'s interface, decoding in this process (a pool of size 0: no crash containment)."""

    def __init__(self, budget: DecodeBudget, deadline: float):
        self._budget, self._deadline = budget, deadline
        self._video = None

    def open(self, path: str, max_pixels: int) -> VideoHeader:
        from vllm_stgridpool.video.decoder import open_video

        self._video = open_video(path, max_pixels)
        return self._video.header

    def decode(self, indices: list[int], header: VideoHeader, nbytes: int) -> np.ndarray:
        from vllm_stgridpool.video.decoder import decode_frames

        with self._budget.reserve(nbytes, self._deadline):
            frames = np.empty((len(indices), header.height, header.width, 3), np.uint8)
            decode_frames(self._video, indices, frames)
        return frames

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None


class DecodePool:
    """Up to ``size`` worker processes, started on demand and reused (0: decode in this process)."""

    def __init__(self, size: int, budget: DecodeBudget):
        self.size = size
        self.budget = budget
        self.arenas = Arenas(keep_bytes=min(ARENA_CACHE_BYTES, budget.capacity))
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._changed = threading.Condition()
        atexit.register(self.shutdown)

    @contextlib.contextmanager
    def decoder(self, wait_seconds: float, timeout: float) -> Iterator[PooledDecoder]:
        """A worker for one video; waits at most ``wait_seconds`` for it and for budget."""
        deadline = time.monotonic() + wait_seconds
        if self.size <= 0:
            local = InProcessDecoder(self.budget, deadline)
            try:
                yield local
            finally:
                local.close()
            return
        worker = self._acquire(deadline, wait_seconds)
        session = PooledDecoder(worker, self.budget, self.arenas, deadline, timeout)
        try:
            yield session
            session.close()
        except BaseException:
            with contextlib.suppress(DecoderDied):
                session.close()
            raise
        finally:
            self._release(worker)

    def worker_pids(self) -> list[int]:
        with self._changed:
            return [worker.process.pid for worker in self._all]

    def shutdown(self) -> None:
        with self._changed:
            workers, self._idle, self._all = list(self._all), [], set()
        for worker in workers:
            worker.stop()
        self.arenas.close()

    def _acquire(self, deadline: float, wait_seconds: float) -> _Worker:
        with self._changed:
            while not self._idle and len(self._all) >= self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DecoderBusy(
                        f"all {self.size} video decoder processes stayed busy for {wait_seconds:g} s; try again later"
                    )
                self._changed.wait(remaining)
            while self._idle:
                worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                self._all.discard(worker)  # died while idle (the OOM killer, an operator): no request lost
                worker.stop()
            worker = _Worker()
            self._all.add(worker)
            return worker

    def _release(self, worker: _Worker) -> None:
        if worker.broken:
            worker.stop()
        with self._changed:
            if worker.broken:
                self._all.discard(worker)
            elif worker in self._all:
                self._idle.append(worker)
            self._changed.notify()


# Released frame memory kept for the next videos, at most this much: writing pages that are
# already there is about a third cheaper for the decoder than allocating fresh shared pages.
ARENA_CACHE_BYTES = 512 * 2**20


class Arenas:
    """Shared-memory files (memfd) for frames, reused once the frames they held are released.

    A file is reused only for a video that needs at least half of it, and
    files beyond ``keep_bytes`` in all are closed. The pages of a kept file
    are the machine's memory (not any process's RSS while unmapped).
    """

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._free: list[tuple[int, int]] = []  # (size, handle)
        self._lock = threading.RLock()  # give_back runs from garbage collection, maybe inside take

    def take(self, nbytes: int) -> tuple[int, int]:
        with self._lock:
            fitting = [entry for entry in self._free if nbytes <= entry[0] <= 2 * nbytes]
            if fitting:
                entry = min(fitting)
                self._free.remove(entry)
                return entry[1], entry[0]
        return _shared_memory(nbytes), nbytes

    def give_back(self, handle: int, size: int) -> None:
        with self._lock:
            kept = sum(entry[0] for entry in self._free)
            if kept + size <= self.keep_bytes:
                self._free.append((size, handle))
                return
        os.close(handle)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for _, handle in free:
            os.close(handle)


def _shared_memory(nbytes: int) -> int:
    """A file descriptor of ``nbytes`` of anonymous shared memory (not limited by /dev/shm's size)."""
    if hasattr(os, "memfd_create"):
        handle = os.memfd_create("stgridpool-frames", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile() as file:
            handle = os.dup(file.fileno())
    try:
        os.ftruncate(handle, nbytes)
    except OSError:
        os.close(handle)
        raise
    return handle


# --- the worker's side ---------------------------------------------------------------


def serve(fd: int) -> None:
    """Answer the server's requests on the socket ``fd`` until the server closes it."""
    from vllm_stgridpool.video.decoder import decode_frames, open_video

    connection = Connection(fd)
    video = None
    while True:
        try:
            request = _REQUESTS.decode(connection.recv_bytes())
        except (EOFError, OSError):
            return
        if isinstance(request, Close):
            if video is not None:
                video.close()
                video = None
            continue
        try:
            if isinstance(request, Open):
                if video is not None:
                    video.close()
                    video = None
                video = open_video(request.path, request.max_pixels)
                reply = Opened(header=video.header)
            else:
                handle = recv_handle(connection)
                try:
                    _decode_into_shared(video, request, handle, decode_frames)
                finally:
                    os.close(handle)
                    video.close()
                    video = None
                reply = Decoded()
        except UndecodableVideo as error:
            reply = Failed(kind="undecodable", message=str(error))
        except FrameSizeMismatch as error:
            reply = Failed(kind="frame_size", message=str(error))
        except Exception as error:  # a bug or resource error here, not the video's fault
            reply = Failed(kind="internal", message=f"{type(error).__name__}: {error}")
        try:
            connection.send_bytes(_ENCODER.encode(reply))
        except OSError:
            return


def _decode_into_shared(video, request: Decode, handle: int, decode_frames) -> None:
    """Decode into the server's shared memory; the mapping goes when its last view does (an error's traceback too)."""
    shared = mmap.mmap(handle, request.nbytes, flags=_MAP_FLAGS)
    header = video.header
    out = np.frombuffer(shared, np.uint8).reshape(len(request.indices), header.height, header.width, 3)
    decode_frames(video, request.indices, out)


if __name__ == "__main__":
    import av  # noqa: F401  (loaded before the first request, not during it)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server's whole group; the server ends us
    serve(int(sys.argv[1]))
