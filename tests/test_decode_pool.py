"""The decode pool against workers taken over by a video, the workers' hard limits, and the admission rules.

A hostile worker (``vllm_stgridpool_testing.hostile_worker``) is started
like the real one and misbehaves as its script says. Each bad reply must fail
that video only, with an error that says what the worker did, and retire the
worker; the next video gets a fresh one. No vLLM here: pool, protocol and
admission import none.
"""

from __future__ import annotations

import gc
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_stgridpool.video.admission import Deadline, DeadlinePassed, DecoderBusy, FrameBudget, Parking, VideoRequest
from vllm_stgridpool.video.decode_pool import DecodePool, DecoderDied, WorkerLimitHit, WorkerMisbehaved
from vllm_stgridpool.video.limits import VideoTooLarge

HOSTILE = "vllm_stgridpool_testing.hostile_worker"
FOUR_BY_FOUR_FRAMES = 2 * 4 * 4 * 3  # the hostile worker's valid video: 2 frames of 4 x 4


def deadline(seconds: float = 20.0) -> Deadline:
    return Deadline.starting_now(seconds)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def hostile():
    pool = DecodePool(1, 1 << 30, worker_module=HOSTILE)
    yield pool
    pool.shutdown()


def serves_a_valid_video(pool: DecodePool) -> int:
    """Decode the hostile worker's valid video (2 frames of 7s); the worker's pid."""
    with pool.worker(deadline()) as worker:
        header = worker.open("valid", 64, 100, deadline())
        frames = worker.decode([0, 1], header, FOUR_BY_FOUR_FRAMES, deadline())
        assert frames.shape == (2, 4, 4, 3) and (frames == 7).all()
        return worker.process.pid


# --- a worker's replies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "says"),
    [
        ("malformed", "sent a malformed reply"),
        ("oversized", "sent a reply of 104,857,600 bytes"),
        ("wrong_type", "answered Decoded where Opened was due"),
        ("unknown_kind", "sent an unknown failure kind 'pwned'"),
        ("long_message", "sent a failure message of 10,000 characters"),
        ("negative_width", "sent a frame size of -4x4"),
        ("nan_fps", "sent a frame rate of nan"),
        ("zero_frames", "sent a frame count of 0"),
        ("bad_rotation", "sent a rotation of 45"),
    ],
)
def test_a_bad_reply_fails_that_video_and_retires_the_worker(hostile, script, says):
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        with pytest.raises(WorkerMisbehaved, match=f"decoder process {says}.* while opening it; it was replaced"):
            worker.open(script, 64, 100, deadline())
    assert not alive(pid) and pid not in hostile.worker_pids()
    assert serves_a_valid_video(hostile) != pid


def test_a_descriptor_sent_with_a_reply_is_dropped(hostile):
    serves_a_valid_video(hostile)  # the worker and the server's socket to it exist
    before = len(os.listdir("/proc/self/fd"))
    with hostile.worker(deadline()) as worker:
        assert worker.open("extra_fd", 64, 100, deadline()).width == 4
        worker.close(deadline())
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("script", ["silent", "trickle"])
def test_a_worker_that_stalls_is_ended_at_the_deadline(hostile, script):
    """No reply, or one byte a second: the read ends at the video's deadline, not the worker's pace."""
    started = time.monotonic()
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        with pytest.raises(DeadlinePassed, match="deadline of 2 s .* opening it stopped after"):
            worker.open(script, 64, 100, deadline(2))
    assert time.monotonic() - started < 4
    assert not alive(pid)
    serves_a_valid_video(hostile)


def test_a_worker_over_its_cpu_limit_is_named(hostile):
    with hostile.worker(deadline()) as worker:
        with pytest.raises(WorkerLimitHit, match=r"CPU time limit \(RLIMIT_CPU\)"):
            worker.open("spin", 64, 100, deadline(30))
    serves_a_valid_video(hostile)


# --- the frames' memory ---------------------------------------------------------------------------


def test_a_worker_cannot_truncate_the_frames_under_the_server(hostile):
    """Shrinking the memfd after the server sized it is refused (sealed): the frames stay readable, no SIGBUS."""
    with hostile.worker(deadline()) as worker:
        header = worker.open("truncate", 64, 100, deadline())
        frames = worker.decode([0, 1], header, FOUR_BY_FOUR_FRAMES, deadline())
    assert frames.nbytes == FOUR_BY_FOUR_FRAMES and (frames == 7).all()


def test_a_worker_that_keeps_the_frames_mapped_is_retired(hostile):
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        header = worker.open("keep_mapping", 64, 100, deadline())
        with pytest.raises(WorkerMisbehaved, match="kept the frames' memory mapped after answering"):
            worker.decode([0, 1], header, FOUR_BY_FOUR_FRAMES, deadline())
    assert not alive(pid)
    serves_a_valid_video(hostile)


def test_a_worker_that_keeps_a_descriptor_is_retired_and_its_frames_are_served(hostile):
    """The frames are sealed, so they are still good; the worker must not keep their pages, so it goes."""
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        header = worker.open("keep_fd", 64, 100, deadline())
        frames = worker.decode([0, 1], header, FOUR_BY_FOUR_FRAMES, deadline())
    assert (frames == 7).all() and not alive(pid)


def test_frames_are_a_private_mapping_of_a_fresh_sealed_memfd(hostile):
    pid = serves_a_valid_video(hostile)
    with hostile.worker(deadline()) as worker:
        assert worker.process.pid == pid  # reused
        header = worker.open("valid", 64, 100, deadline())
        frames = worker.decode([0, 1], header, FOUR_BY_FOUR_FRAMES, deadline())
    frames[0, 0, 0, 0] = 1  # copy-on-write: the server may write its frames; the file does not change
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "stgridpool-frames" not in maps and not any(
        "stgridpool-frames" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
    )


# --- close is acknowledged ---------------------------------------------------------------------


def test_a_crash_while_closing_is_that_videos_and_the_next_gets_a_fresh_worker(hostile):
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        worker.open("crash_on_close", 64, 100, deadline())
        with pytest.raises(DecoderDied, match="SIGSEGV"):
            worker.close(deadline())
    assert serves_a_valid_video(hostile) != pid


def test_a_worker_that_hangs_on_close_is_ended_at_the_deadline(hostile):
    with hostile.worker(deadline()) as worker:
        pid = worker.process.pid
        worker.open("hang_on_close", 64, 100, deadline())
        with pytest.raises(DeadlinePassed, match="closing it"):
            worker.close(deadline(2))
    assert not alive(pid)
    assert serves_a_valid_video(hostile) != pid


# --- the queue in front of the workers ------------------------------------------------------------


def test_waiting_for_a_worker_is_bounded_in_count_and_time(hostile):
    """One busy worker: two videos may wait (2 x size), a third is refused at once; waiters give up at half
    the deadline with a Retry-After hint."""
    holding = threading.Event()
    release = threading.Event()

    def hold():
        with hostile.worker(deadline()):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    outcomes = []

    def wait_for_one():
        started = time.monotonic()
        try:
            with hostile.worker(deadline(2)):
                outcomes.append("served")
        except DecoderBusy as error:
            outcomes.append((round(time.monotonic() - started, 1), error.retry_after, str(error)))

    waiters = [threading.Thread(target=wait_for_one) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    while hostile.waiting < 2:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(DecoderBusy, match="2 videos already wait"):
        with hostile.worker(deadline()):
            pass
    assert time.monotonic() - started < 0.1
    for waiter in waiters:
        waiter.join(10)
    release.set()
    holder.join(10)
    assert [o[:2] for o in outcomes] == [(1.0, 1), (1.0, 1)], outcomes
    assert "stayed busy for the 1 s a video may wait (of its 2 s deadline)" in outcomes[0][2]


# --- the real worker's limits and surroundings ------------------------------------------------


@pytest.fixture
def real_pool(monkeypatch):
    monkeypatch.setenv("STGRIDPOOL_TEST_SECRET", "hunter2")
    pool = DecodePool(1, 512 * 2**20)
    yield pool
    pool.shutdown()


def test_a_worker_starts_scrubbed_in_an_empty_folder_under_hard_limits(real_pool):
    with real_pool.worker(deadline()) as worker:
        pid = worker.process.pid
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        folder = os.readlink(f"/proc/{pid}/cwd")
        limits = Path(f"/proc/{pid}/limits").read_text()
        isolated = worker.network_isolated
    assert not any(b"hunter2" in entry for entry in environment), environment
    assert {entry.split(b"=")[0] for entry in environment if entry} <= {
        b"PATH", b"LC_ALL", b"PYTHONNOUSERSITE", b"PYTHONDONTWRITEBYTECODE", b"PYTHONPATH"
    }
    assert os.listdir(folder) == [] and stat.S_IMODE(os.stat(folder).st_mode) == 0o500
    rows = {line[:26].strip(): line[26:].split() for line in limits.splitlines()[1:]}
    assert rows["Max data size"][:2] == [str(512 * 2**20)] * 2
    assert rows["Max open files"][:2] == ["64", "64"]
    assert rows["Max core file size"][:2] == ["0", "0"]
    assert rows["Max cpu time"][1] == "3600"
    if isolated:  # where the kernel allows a network namespace: nothing but a loopback
        interfaces = [line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
        assert interfaces == ["lo"]


def test_a_worker_out_of_memory_names_its_limit(tmp_path):
    """A 4K decode needs about 300 MB of heap; under a 256 MiB RLIMIT_DATA the video is refused naming it."""
    from vllm_stgridpool_testing.sample_videos import mp4_bytes

    path = tmp_path / "uhd.mp4"
    path.write_bytes(mp4_bytes(8, 3840, 2160))
    pool = DecodePool(1, 256 * 2**20)
    try:
        with pytest.raises(WorkerLimitHit, match=r"memory limit of 268,435,456 bytes \(RLIMIT_DATA"):
            with pool.worker(deadline(60)) as worker:
                header = worker.open(str(path), 3840 * 2160, 1000, deadline(60))
                worker.decode(list(range(8)), header, 8 * 3840 * 2160 * 3, deadline(60))
    finally:
        pool.shutdown()


# --- admission: the budget, a request's videos, parking ---------------------------------------------


def test_the_budget_waits_its_turn_then_answers_busy():
    budget = FrameBudget(100)
    budget.acquire(60, deadline())
    with pytest.raises(DecoderBusy, match="holds 60 bytes .* needs 41 more, over its video decode budget of 100"):
        budget.acquire(41, deadline(0.4))
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.acquire(41, deadline(30)), admitted.set()))
    waiter.start()
    assert not admitted.wait(0.3)
    budget.release(60)
    waiter.join(10)
    assert admitted.is_set() and budget.in_flight == 41


def test_a_video_waits_half_its_deadline_or_the_servers_shorter_wait():
    budget = FrameBudget(100)
    budget.acquire(100, deadline())
    for waiting, seconds, max_wait in ((0.5, 1.0, 0.0), (0.2, 20.0, 0.2), (0.5, 1.0, 5.0)):
        started = time.monotonic()
        with pytest.raises(DecoderBusy):
            budget.acquire(1, Deadline.starting_now(seconds, max_wait))
        assert waiting <= time.monotonic() - started < waiting + 0.3


def test_a_video_that_sat_in_vllms_queue_past_its_wait_is_busy_before_any_work():
    late = Deadline(time.monotonic() - 6, 10.0)  # arrived 6 s ago: more than half of 10 s
    with pytest.raises(DecoderBusy, match=r"waited 6\.\d s for one of vLLM's media threads, past the 5 s"):
        late.check_not_late()
    Deadline(time.monotonic() - 4, 10.0).check_not_late()


def test_the_budget_holds_until_the_last_view_of_the_frames_is_gone():
    budget = FrameBudget(1000)
    frames = np.zeros((4, 5, 5, 3), np.uint8)
    budget.acquire(frames.nbytes, deadline())
    budget.hold_until_released(frames, frames.nbytes)
    view = frames[1:3]
    del frames
    gc.collect()
    assert budget.in_flight == 300  # a view still holds the memory
    del view
    gc.collect()
    assert budget.in_flight == 0


def admit_all(request: VideoRequest, sizes: list[int], budget: FrameBudget, seconds: float = 20.0):
    """Admit each member with its size on a thread of its own; each one's error (or None)."""
    outcomes = [None] * len(sizes)
    members = request.members

    def admit(index: int) -> None:
        try:
            members[index].admit(sizes[index], budget, Deadline(request.arrival, seconds), Parking(8))
        except Exception as error:  # noqa: BLE001 - the test reads it
            outcomes[index] = error

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(len(sizes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_a_request_that_can_never_fit_is_refused_whole_naming_both_figures():
    request, budget = VideoRequest(), FrameBudget(1000)
    for _ in range(3):
        request.add_member()
    outcomes = admit_all(request, [400, 400, 400], budget)
    assert all(isinstance(o, VideoTooLarge) for o in outcomes), outcomes
    assert "3 videos decode to 1,200 bytes of frames in all, over the server's video decode budget of 1,000" in str(
        outcomes[0]
    )
    assert budget.in_flight == 0


def test_a_request_is_reserved_in_one_piece():
    request, budget = VideoRequest(), FrameBudget(1000)
    for _ in range(3):
        request.add_member()
    assert admit_all(request, [300, 300, 300], budget) == [None, None, None]
    assert budget.in_flight == 900 and request.admitted


def test_one_failed_video_fails_its_siblings_with_its_own_error():
    request, budget = VideoRequest(), FrameBudget(1000)
    first, second = request.add_member(), request.add_member()
    second.fail(VideoTooLarge("frames of 9000x9000 are over max_video_pixels"))
    with pytest.raises(VideoTooLarge, match="video 2 of 2 in this request: frames of 9000x9000"):
        first.admit(10, budget, deadline(), Parking(8))
    assert budget.in_flight == 0


def test_a_video_that_never_reaches_the_loader_does_not_hold_the_others():
    request, budget = VideoRequest(), FrameBudget(1000)
    first, second = request.add_member(), request.add_member()
    threading.Timer(0.2, second.done).start()  # e.g. a uuid-only item: nothing to load
    first.admit(10, budget, deadline(), Parking(8))
    assert budget.in_flight == 10


def test_videos_whose_siblings_never_come_are_busy_at_half_the_deadline():
    request, budget = VideoRequest(), FrameBudget(1000)
    first, _ = request.add_member(), request.add_member()
    started = time.monotonic()
    with pytest.raises(DecoderBusy, match="only 1 of this request's 2 videos were read"):
        first.admit(10, budget, Deadline(request.arrival, 1.0), Parking(8))
    assert 0.4 < time.monotonic() - started < 1.0


def test_parking_always_leaves_one_media_thread_free():
    parking = Parking(2)
    with parking.slot(deadline()):
        with pytest.raises(DecoderBusy, match="1 videos already wait .* 2 media threads allow"):
            with parking.slot(deadline()):
                pass
    with parking.slot(deadline()):
        pass
