"""Worker processes that decode uploads, treated as untrusted: a decoder taken over by a video cannot hurt the server.

vLLM decodes videos inside its API server process; a native crash there
(FFmpeg parsing hostile input) would end the server for every client. Here
each video is decoded by one of a few worker processes
(:mod:`~vllm_stgridpool.video.decode_worker`, started with hard limits, a
scrubbed environment and an empty working directory) that are reused. A
worker that dies, overruns the video's deadline, hits one of its limits or
breaks the protocol fails only its own request, and is retired.

Frames come back through shared memory, never a pickled copy: for each
video the server creates a fresh ``memfd`` of exactly the frames' size,
sealed against shrinking and growing before the worker sees it (so the
worker cannot truncate it under the server: SIGBUS). Once the worker has
answered (its descriptor closed and its mapping gone, else it is retired),
the server seals it against writing, checks the seals and the size, and maps
it copy-on-write: nobody can change those pages any more, and a worker never
gets pages another video used.

Every wait is bounded by the video's :class:`~vllm_stgridpool.video.admission.Deadline`:
for a worker (a bounded number of videos wait; then HTTP 503), for each
reply, for a worker to start. This module imports no vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import math
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vllm_stgridpool.video import decode_protocol as protocol
from vllm_stgridpool.video.admission import Deadline
from vllm_stgridpool.video.decode_protocol import WorkerMisbehaved
from vllm_stgridpool.video.decoder import FrameSizeMismatch, UndecodableVideo, VideoHeader

__all__ = ["DecodePool", "DecoderDied", "LocalDecoders", "WorkerFailure", "WorkerLimitHit", "WorkerMisbehaved"]

logger = logging.getLogger("vllm.stgridpool")

WORKER_MODULE = "vllm_stgridpool.video.decode_worker"
# A worker's CPU time over its whole life (RLIMIT_CPU hard limit); it is retired before a video could reach it.
WORKER_CPU_LIFE_SECONDS = 3600
# How long a worker may take to start (import PyAV) before its first video.
START_SECONDS = 30.0
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
_ALL_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class DecoderDied(Exception):
    """The worker decoding this video ended (crash, kill)."""

    def __init__(self, message: str, crashed: bool):
        super().__init__(message)
        self.crashed = crashed  # ended by a crash signal (the input's fault) rather than killed from outside


class WorkerLimitHit(Exception):
    """The worker hit one of its hard limits on this video (HTTP 422, naming the limit)."""


class WorkerFailure(Exception):
    """A worker's own error that is not the video's fault (HTTP 500)."""


class _Worker:
    """One worker process, the server's end of its socket, and the calls of one video at a time."""

    def __init__(self, module: str, folder: str, memory_bytes: int, deadline: Deadline):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-s", "-m", module, str(theirs.fileno()), str(memory_bytes),
                 str(WORKER_CPU_LIFE_SECONDS)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd=folder,
                env=worker_environment(),
            )
        self.socket = ours
        self.memory_bytes = memory_bytes
        self.broken = False
        self.network_isolated = False
        until = min(deadline.at, time.monotonic() + START_SECONDS)
        try:
            ready = self._reply((protocol.Ready,), until, lambda: WorkerFailure("it sent no Ready in time"))
        except (WorkerFailure, DecoderDied, WorkerMisbehaved) as error:
            self.retire()
            raise WorkerFailure(f"a video decoder process did not start: {error}") from None
        self.network_isolated = ready.network_isolated
        _say_isolation_once(self.network_isolated)

    # --- one video's calls ----------------------------------------------------------------

    def open(self, path: str, max_pixels: int, max_packets: int, deadline: Deadline) -> VideoHeader:
        cpu = math.ceil(deadline.seconds * (os.cpu_count() or 1))
        self._send(protocol.Open(path=path, max_pixels=max_pixels, max_packets=max_packets, cpu_seconds=cpu))
        return self._work((protocol.Opened,), deadline, "opening it", max_pixels).header

    def close(self, deadline: Deadline) -> None:
        """Close the open video and wait for the worker to say so (a crash here is this video's)."""
        self._send(protocol.Close())
        self._work((protocol.Closed,), deadline, "closing it")

    def decode(self, indices: list[int], header: VideoHeader, nbytes: int, deadline: Deadline) -> np.ndarray:
        """The frames as a (T, H, W, 3) uint8 array over sealed shared memory only the server still holds."""
        handle = _frames_memory(nbytes)
        try:
            self._send(protocol.Decode(indices=indices, nbytes=nbytes), handle)
            self._work((protocol.Decoded,), deadline, "decoding it")
            shared = self._take_sealed(handle, nbytes)
        finally:
            os.close(handle)
        return np.frombuffer(shared, np.uint8).reshape(len(indices), header.height, header.width, 3)

    # --- the protocol -----------------------------------------------------------------------

    def _send(self, request, handle: int | None = None) -> None:
        try:
            protocol.send(self.socket, request, handle)
        except OSError:
            raise self._died() from None

    def _work(self, expected, deadline: Deadline, what: str, max_pixels: int = 0):
        """The reply to work on the video, due by its deadline (the worker is ended there)."""
        started = time.monotonic()
        return self._reply(expected, deadline.at, lambda: deadline.overrun(started, what), max_pixels, what)

    def _reply(self, expected, until: float, timed_out, max_pixels: int = 0, what: str = "starting"):
        try:
            reply = protocol.check_reply(protocol.receive_reply(self.socket, until), expected, max_pixels)
        except protocol.ReplyTimeout:
            self.retire()
            raise timed_out() from None
        except WorkerMisbehaved as error:
            self.retire()
            raise WorkerMisbehaved(f"the video decoder process {error} while {what}; it was replaced") from None
        except (OSError, EOFError):
            raise self._died() from None
        if isinstance(reply, protocol.Failed):
            raise self._failure(reply)
        return reply

    def _failure(self, reply: protocol.Failed) -> Exception:
        if reply.kind == "undecodable":
            return UndecodableVideo(reply.message)
        if reply.kind == "frame_size":
            return FrameSizeMismatch(reply.message)
        self.retire()  # a limit hit or an internal error leaves the worker in a state not worth keeping
        if reply.kind == "memory":
            return WorkerLimitHit(
                f"the video decoder ran out of its memory limit of {self.memory_bytes:,} bytes (RLIMIT_DATA, "
                f"STGRIDPOOL_VIDEO_WORKER_MEMORY_BYTES) on this video: {reply.message}"
            )
        if reply.kind == "open_files":
            return WorkerLimitHit(f"the video decoder reached its limit of open files (RLIMIT_NOFILE): {reply.message}")
        return WorkerFailure(reply.message)

    def _take_sealed(self, handle: int, nbytes: int) -> mmap.mmap:
        """Seal the frames' memfd against writes, check it, and map it copy-on-write; retire a worker that kept it."""
        try:
            fcntl.fcntl(handle, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        except OSError as error:
            self.retire()
            raise WorkerMisbehaved(
                f"the video decoder process kept the frames' memory mapped after answering ({error.strerror}); "
                "it was replaced"
            ) from None
        seals = fcntl.fcntl(handle, fcntl.F_GET_SEALS)
        if seals & _ALL_SEALS != _ALL_SEALS or os.fstat(handle).st_size != nbytes:
            self.retire()
            raise WorkerMisbehaved("the frames' memory is not sealed at its size; the decoder process was replaced")
        if _still_holds(self.process.pid, handle):
            self.retire()  # the frames are sealed and safe, but the worker must not keep their pages alive
        return mmap.mmap(handle, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _died(self) -> Exception:
        self.broken = True
        cpu = _cpu_seconds(self.process.pid)  # a zombie still reports it, until it is reaped
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.stop()
            code = self.process.returncode
        if code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu >= WORKER_CPU_LIFE_SECONDS):
            return WorkerLimitHit(f"the video decoder used up its CPU time limit (RLIMIT_CPU) on this video ({cpu:.0f} s)")
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return DecoderDied(f"the decoder process ended with {name} while decoding this video", -code in _CRASH_SIGNALS)
        return DecoderDied(f"the decoder process exited with status {code} while decoding this video", False)

    def retire(self) -> None:
        self.broken = True
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def worn_out(self, deadline: Deadline) -> bool:
        """Whether the next video could take the worker past its life's CPU limit (or it died while idle)."""
        if self.process.poll() is not None:
            return True
        return _cpu_seconds(self.process.pid) + deadline.seconds * (os.cpu_count() or 1) >= WORKER_CPU_LIFE_SECONDS


class DecodePool:
    """Up to ``size`` worker processes, started on demand and reused; at most ``max_waiting`` videos wait for one
    (default ``2 x size``), the others are busy at once."""

    def __init__(self, size: int, memory_bytes: int, worker_module: str = WORKER_MODULE, max_waiting: int = 0):
        if size < 1:
            raise ValueError(f"a decode pool has at least one worker, not {size}")
        self.size = size
        self.memory_bytes = memory_bytes
        self.max_waiting = max_waiting or 2 * size
        self.waiting = 0
        self._module = worker_module
        self._folder = tempfile.mkdtemp(prefix="stgridpool-decode-")
        os.chmod(self._folder, 0o500)  # empty, and not writable: the workers' working directory
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        self._changed = threading.Condition()
        atexit.register(self.shutdown)

    @contextlib.contextmanager
    def worker(self, deadline: Deadline) -> Iterator[_Worker]:
        """A worker for one video, waited for until ``deadline.waiting_ends`` at most (then ``DecoderBusy``)."""
        worker = self._acquire(deadline)
        try:
            yield worker
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
        shutil.rmtree(self._folder, ignore_errors=True)

    def _acquire(self, deadline: Deadline) -> _Worker:
        with self._changed:
            if not self._free() and self.waiting >= self.max_waiting:
                raise deadline.busy(
                    f"all {self.size} video decoder processes are busy and {self.waiting} videos already wait for "
                    "one; try again later"
                )
            self.waiting += 1
            try:
                deadline.wait(
                    self._changed,
                    self._free,
                    lambda: f"all {self.size} video decoder processes stayed busy for the {deadline.waiting_seconds:g} s "
                    f"a video may wait (of its {deadline.seconds:g} s deadline); try again later",
                )
            finally:
                self.waiting -= 1
            while self._idle:
                worker = self._idle.pop()
                if not worker.worn_out(deadline):
                    return worker
                self._all.discard(worker)  # died while idle, or old: no request lost
                worker.stop()
            self._starting += 1
        try:
            worker = _Worker(self._module, self._folder, self.memory_bytes, deadline)
        except BaseException:
            with self._changed:
                self._starting -= 1
                self._changed.notify()
            raise
        with self._changed:
            self._starting -= 1
            self._all.add(worker)
        return worker

    def _free(self) -> bool:
        return bool(self._idle) or len(self._all) + self._starting < self.size

    def _release(self, worker: _Worker) -> None:
        if worker.broken:
            worker.stop()
        with self._changed:
            if worker.broken:
                self._all.discard(worker)
            elif worker in self._all:
                self._idle.append(worker)
            self._changed.notify()


class LocalDecoders:
    """A pool of size 0: each video is decoded in the calling thread (no crash containment, the same deadline)."""

    size = 0

    @contextlib.contextmanager
    def worker(self, deadline: Deadline) -> Iterator[_LocalDecoder]:
        decoder = _LocalDecoder()
        try:
            yield decoder
        finally:
            decoder.close(deadline)

    def worker_pids(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        pass


class _LocalDecoder:
    """:class:`_Worker`'s calls in this process; the deadline is checked after opening and at every frame."""

    def __init__(self) -> None:
        self._video = None

    def open(self, path: str, max_pixels: int, max_packets: int, deadline: Deadline) -> VideoHeader:
        from vllm_stgridpool.video.decoder import open_video

        self.close(deadline)
        started = time.monotonic()
        self._video = open_video(path, max_pixels, max_packets)  # bounded by max_packets, not interruptible
        if time.monotonic() > deadline.at:
            raise deadline.overrun(started, "opening it")
        return self._video.header

    def decode(self, indices: list[int], header: VideoHeader, nbytes: int, deadline: Deadline) -> np.ndarray:
        from vllm_stgridpool.video.decoder import decode_frames

        started = time.monotonic()

        def checkpoint() -> None:
            if time.monotonic() > deadline.at:
                raise deadline.overrun(started, "decoding it")

        self._video.checkpoint = checkpoint
        frames = np.empty((len(indices), header.height, header.width, 3), np.uint8)
        try:
            decode_frames(self._video, indices, frames)
        finally:
            self.close(deadline)
        return frames

    def close(self, deadline: Deadline) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None

    def retire(self) -> None:
        self.close(None)


_isolation_said: set[bool] = set()


def _say_isolation_once(isolated: bool) -> None:
    """Log, once per process and outcome, whether workers run without network (see decode_worker)."""
    if isolated not in _isolation_said:
        _isolation_said.add(isolated)
        logger.info(
            "video decode workers run in a network namespace of their own (no network)" if isolated else
            "video decode workers share the server's network: this kernel does not let them unshare it"
        )


def worker_environment() -> dict[str, str]:
    """What a worker gets of the server's environment: nothing but how to find Python packages.

    Tokens, keys and proxies in the server's environment stay there.
    """
    env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _frames_memory(nbytes: int) -> int:
    """A fresh memfd of ``nbytes``, sealed against shrinking and growing (the worker may write it, not resize it)."""
    handle = os.memfd_create("stgridpool-frames", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(handle, nbytes)
        fcntl.fcntl(handle, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(handle)
        raise
    return handle


def _still_holds(pid: int, handle: int) -> bool:
    """Whether process ``pid`` still has the memfd ``handle`` open or mapped."""
    identity = os.fstat(handle)
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                entry = os.stat(f"/proc/{pid}/fd/{name}")
                if (entry.st_dev, entry.st_ino) == (identity.st_dev, identity.st_ino):
                    return True
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[4] == str(identity.st_ino) and "stgridpool-frames" in line:
                return True
    return False


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
