"""Who may decode now: one deadline per video, the decoded-frame budget, and a request's videos admitted together.

* :class:`Deadline`: a video has ``STGRIDPOOL_VIDEO_DEADLINE_SECONDS`` from
  its request's arrival for everything: waiting (for a media thread, a
  decode worker, the budget, the request's other videos) and its own
  opening, seeking and decoding. Waiting may use half of it (or less:
  ``STGRIDPOOL_VIDEO_DECODE_WAIT_SECONDS``); a video still waiting then gets
  :class:`DecoderBusy` (HTTP 503 with Retry-After), so its own work always
  has at least the other half. Work that overruns the deadline is
  :class:`DeadlinePassed` (HTTP 422): the input is deterministic, a retry
  would fail again.
* :class:`FrameBudget`: the bytes of decoded frames alive at once. A
  video's bytes are held from before it is decoded until its frames are
  garbage, not only while it decodes: frames wait in vLLM's processor long
  after the decoder is done.
* :class:`VideoRequest`: one request's videos. Each reads its header and
  waits for the others; their total is refused at once when it cannot fit
  the budget (HTTP 400 naming both), else reserved in one piece, so that two
  requests never each hold part of what they need.

This module imports no vLLM.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vllm_stgridpool.video.limits import VideoTooLarge

__all__ = [
    "CURRENT_MEMBER",
    "Deadline",
    "DeadlinePassed",
    "DecoderBusy",
    "FrameBudget",
    "Member",
    "Parking",
    "VideoRequest",
]

# The video a loader call belongs to, set by the request's media loading (compat/video_requests.py); None
# where nothing set it (offline use, or a vLLM the patch does not apply to): the video is then alone.
CURRENT_MEMBER: contextvars.ContextVar[Member | None] = contextvars.ContextVar("stgridpool_member", default=None)

# Waiting may use this share of the deadline; the video's own work always has the rest.
WAITING_SHARE = 0.5


class DecoderBusy(Exception):
    """The server could not start this video in time (HTTP 503); ``retry_after`` is a hint in whole seconds."""

    def __init__(self, message: str, retry_after: float = 1):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class DeadlinePassed(Exception):
    """Opening and decoding this video did not end within its deadline (HTTP 422: it never will)."""


@dataclass(frozen=True)
class Deadline:
    """``seconds`` from ``arrival`` (``time.monotonic()``), for one video; waiting at most ``max_wait`` of it
    (0: half)."""

    arrival: float
    seconds: float
    max_wait: float = 0.0

    @classmethod
    def starting_now(cls, seconds: float, max_wait: float = 0.0) -> Deadline:
        return cls(time.monotonic(), seconds, max_wait)

    @property
    def waiting_seconds(self) -> float:
        """How long a video may wait to start: half the deadline, or ``max_wait`` if shorter."""
        half = self.seconds * WAITING_SHARE
        return min(self.max_wait, half) if self.max_wait > 0 else half

    @property
    def at(self) -> float:
        return self.arrival + self.seconds

    @property
    def waiting_ends(self) -> float:
        """When a video still waiting to start gets :class:`DecoderBusy`."""
        return self.arrival + self.waiting_seconds

    @property
    def retry_after(self) -> float:
        """The Retry-After hint of a busy answer: an eighth of the deadline."""
        return self.seconds / 8

    def busy(self, message: str) -> DecoderBusy:
        return DecoderBusy(message, self.retry_after)

    def check_not_late(self) -> None:
        """:class:`DecoderBusy` if the video reaches the loader after it should have stopped waiting (it sat
        in vLLM's media queue): its own work would not have the half of the deadline it is owed."""
        waited = time.monotonic() - self.arrival
        if waited > self.waiting_seconds:
            raise self.busy(
                f"the video waited {waited:.1f} s for one of vLLM's media threads, past the "
                f"{self.waiting_seconds:g} s a video may wait (the server is busy); try again later"
            )

    def wait(self, changed: threading.Condition, ready, why_busy) -> None:
        """Wait on ``changed`` (held) until ``ready()``; still not ready at :attr:`waiting_ends`:
        :class:`DecoderBusy` saying ``why_busy()``."""
        while not ready():
            remaining = self.waiting_ends - time.monotonic()
            if remaining <= 0:
                raise self.busy(why_busy())
            changed.wait(remaining)

    def overrun(self, work_started: float, what: str) -> DeadlinePassed:
        worked = time.monotonic() - work_started
        return DeadlinePassed(
            f"the video was not decoded within the server's video deadline of {self.seconds:g} s "
            f"(STGRIDPOOL_VIDEO_DEADLINE_SECONDS): {what} stopped after {worked:.1f} s of work; the same video "
            "will not decode in time on a retry (sample fewer frames, or send a shorter video or one with more "
            "key frames)"
        )


class FrameBudget:
    """Bytes of decoded frames that may be alive at once; reservations wait their turn."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._changed = threading.Condition()

    def acquire(self, nbytes: int, deadline: Deadline) -> None:
        """Reserve ``nbytes``, waiting until ``deadline.waiting_ends`` at most, then :class:`DecoderBusy`."""
        if nbytes <= 0:
            raise ValueError(f"a reservation is a positive number of bytes, not {nbytes}")
        with self._changed:
            deadline.wait(
                self._changed,
                lambda: self.in_flight + nbytes <= self.capacity,
                lambda: f"the server holds {self.in_flight:,} bytes of decoded video frames and this request needs "
                f"{nbytes:,} more, over its video decode budget of {self.capacity:,} bytes; try again later",
            )
            self.in_flight += nbytes

    def try_acquire(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit now."""
        with self._changed:
            if nbytes <= 0 or self.in_flight + nbytes > self.capacity:
                return False
            self.in_flight += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._changed:
            self.in_flight -= nbytes
            self._changed.notify_all()

    def hold_until_released(self, frames: np.ndarray, nbytes: int) -> None:
        """Keep ``nbytes`` reserved until the memory under ``frames`` is garbage (every view of it too)."""
        weakref.finalize(_memory_owner(frames), self.release, nbytes)


def _memory_owner(array: np.ndarray) -> object:
    """What owns ``array``'s memory: the array itself, or the object its buffer came from (an mmap)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    base = array.base
    if isinstance(base, memoryview):
        return base.obj
    return array if base is None else base


class Parking:
    """Loader threads waiting for their request's other videos, bounded so that vLLM's media threads never all wait.

    vLLM runs loaders on a fixed pool of media threads (8 by default) with an
    unbounded queue: a video waiting for its siblings holds a thread, and a
    sibling still queued needs one. At most ``threads - 1`` wait at once, so
    one thread always drains the queue and every sibling arrives. A video
    that cannot park is :class:`DecoderBusy`.
    """

    def __init__(self, threads: int):
        self.limit = max(0, threads - 1)
        self.parked = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, deadline: Deadline) -> Iterator[None]:
        with self._lock:
            if self.parked >= self.limit:
                raise deadline.busy(
                    f"{self.parked} videos already wait for the other videos of their requests, the most the "
                    f"server's {self.limit + 1} media threads allow; try again later"
                )
            self.parked += 1
        try:
            yield
        finally:
            with self._lock:
                self.parked -= 1


@dataclass(eq=False)
class Member:
    """One video of a :class:`VideoRequest`."""

    request: VideoRequest
    index: int  # 0-based, in the order of the request's content parts
    nbytes: int | None = None  # decoded bytes, once admitted
    settled: bool = False  # header read, failed, or ended without reaching the loader
    error: BaseException | None = None

    def admit(self, nbytes: int, budget: FrameBudget, deadline: Deadline, parking: Parking) -> None:
        """Wait for the request's other headers, then hold ``nbytes`` of the budget; or raise why not."""
        self.request.admit(self, nbytes, budget, deadline, parking)

    def check_outcome(self) -> None:
        """Raise the request's refusal, if another video already caused one (before doing any work)."""
        self.request.raise_refusal()

    def fail(self, error: BaseException) -> None:
        self.request.settle(self, error)

    def done(self) -> None:
        """The video's load ended, any way: the others stop waiting for it."""
        self.request.settle(self, None)


@dataclass(eq=False)
class VideoRequest:
    """The videos of one request: all headers first, then one reservation for their total."""

    arrival: float = field(default_factory=time.monotonic)
    members: list[Member] = field(default_factory=list)
    refusal: BaseException | None = None  # set once: what every video still waiting raises
    admitted: bool = False
    _deciding: bool = False
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def add_member(self) -> Member:
        with self._changed:
            member = Member(self, len(self.members))
            self.members.append(member)
            return member

    def settle(self, member: Member, error: BaseException | None) -> None:
        with self._changed:
            if not member.settled:
                member.settled, member.error = True, error
                self._changed.notify_all()

    def admit(self, member: Member, nbytes: int, budget: FrameBudget, deadline: Deadline, parking: Parking) -> None:
        if len(self.members) == 1:
            budget.acquire(nbytes, deadline)
            member.nbytes, member.settled = nbytes, True
            return
        with self._changed:
            member.nbytes, member.settled = nbytes, True
            self._changed.notify_all()
            decider = self._take_decision()
        if not decider and self.refusal is None and not self.admitted:
            with parking.slot(deadline):  # (the last video in never waits, so never needs a slot)
                decider = self._wait_for_the_others(deadline)
        if decider:
            self._decide(budget, deadline)
        self.raise_refusal()

    def _take_decision(self) -> bool:
        """Whether this thread decides for all: every video is in (or one failed) and nobody decides yet."""
        ready = all(m.settled for m in self.members) or any(m.error for m in self.members)
        if ready and not self._deciding and self.refusal is None and not self.admitted:
            self._deciding = True
            return True
        return False

    def _wait_for_the_others(self, deadline: Deadline) -> bool:
        with self._changed:
            while self.refusal is None and not self.admitted:
                if self._take_decision():
                    return True
                remaining = deadline.waiting_ends - time.monotonic()
                if remaining <= 0 and not self._deciding:
                    read = sum(1 for m in self.members if m.settled)
                    self._refuse(deadline.busy(
                        f"only {read} of this request's {len(self.members)} videos were read within the "
                        f"{deadline.waiting_seconds:g} s a video may wait (the server is busy); try again later"
                    ))
                    break
                self._changed.wait(max(remaining, 0.05))
        return False

    def raise_refusal(self) -> None:
        """Raise (a copy of) the request's refusal, if there is one."""
        with self._changed:
            error = self.refusal
        if error is not None:
            raise _copy(error)

    def _decide(self, budget: FrameBudget, deadline: Deadline) -> None:
        failed = next((m for m in self.members if m.error is not None), None)
        sizes = [m.nbytes for m in self.members if m.nbytes is not None]
        try:
            if failed is not None:
                raise _copy(failed.error, f"video {failed.index + 1} of {len(self.members)} in this request: ")
            if sum(sizes) > budget.capacity:
                raise VideoTooLarge(
                    f"this request's {len(sizes)} videos decode to {sum(sizes):,} bytes of frames in all, over the "
                    f"server's video decode budget of {budget.capacity:,} bytes "
                    "(STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES); send fewer or smaller videos, or sample fewer frames"
                )
            budget.acquire(sum(sizes), deadline)
        except Exception as error:  # noqa: BLE001 - every waiting video raises it
            with self._changed:
                self._refuse(error)
            return
        with self._changed:
            self.admitted = True
            self._changed.notify_all()

    def _refuse(self, error: BaseException) -> None:
        if self.refusal is None:
            self.refusal = error
        self._changed.notify_all()


def _copy(error: BaseException, prefix: str = "") -> BaseException:
    """An error of ``error``'s class and message (each video raises its own object), optionally prefixed."""
    if isinstance(error, DecoderBusy):
        return DecoderBusy(prefix + str(error), error.retry_after)
    try:
        copy = type(error)(prefix + str(error))
    except Exception:  # noqa: BLE001 - a class that takes other arguments: the original, unprefixed
        return error
    copy.__cause__ = error.__cause__
    return copy
