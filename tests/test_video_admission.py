"""One deadline per video, frames counted until released, a request's videos admitted together, Retry-After.

The engine tests share one real ``vllm serve --plugins stgridpool`` with a
20 s video deadline, a 2 GiB frame budget and 2 decode workers (set, so that
the figures do not depend on the machine). The crafted videos are built here:
a time bomb (600,000 frames of 16 x 16 MPEG-4 behind one key frame: 7 MB,
about 27 s of decoding to sample 64 frames) and one-colour 4K size bombs
(64 frames, 28 KB, 1.59 GB decoded). The unit tests check the two vLLM
patches this relies on (P10, P11) without a server.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import pytest

from tests.support.server_memory import PeakSampler
from tests.support.servers import cpu_server_args, serving
from vllm_stgridpool.compat import retry_after, video_requests
from vllm_stgridpool.video.admission import CURRENT_MEMBER
from vllm_stgridpool_testing.sample_videos import mp4_bytes, size_bomb_mp4, time_bomb_mp4

DEADLINE_SECONDS = 20
BUDGET_BYTES = 2 * 2**30
UHD_64_FRAMES_BYTES = 64 * 3840 * 2160 * 3
SERVER_ENV = {
    "STGRIDPOOL_VIDEO_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
    "STGRIDPOOL_VIDEO_DECODE_BUDGET_BYTES": str(BUDGET_BYTES),
    "STGRIDPOOL_VIDEO_DECODE_WORKERS": "2",
}


def data_url(payload: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(payload).decode()


# --- P10 and P11 without a server ---------------------------------------------------------------


class Tracker:
    """What P10 relies on in vLLM's tracker: items by modality, resolved concurrently by one gather."""

    def __init__(self, videos):
        self._items_by_modality = {"video": videos, "image": []}

    async def resolve_items(self):
        items = [item for group in self._items_by_modality.values() for item in group]
        return await asyncio.gather(*(item() for item in items), return_exceptions=True)


def test_each_video_of_a_request_reaches_the_media_thread_as_a_member_of_one_request():
    pool = video_requests.ContextThreadPool(2)
    resolve = video_requests._as_one_video_request(Tracker.resolve_items)

    def in_thread():
        member = CURRENT_MEMBER.get()
        return member.index, member.request, len(member.request.members)

    async def load():
        return await asyncio.get_running_loop().run_in_executor(pool, in_thread)

    tracker = Tracker([load, load, load])
    started = time.monotonic()
    seen = asyncio.run(resolve(tracker))
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert len({id(request) for _, request, _ in seen}) == 1 and {count for _, _, count in seen} == {3}
    request = seen[0][1]
    assert started <= request.arrival <= time.monotonic() and all(m.settled for m in request.members)
    assert tracker._items_by_modality["video"] == [load, load, load]  # vLLM's items are put back
    assert CURRENT_MEMBER.get() is None
    pool.shutdown()


def test_retry_after_is_added_only_to_errors_that_carry_it():
    from starlette.responses import JSONResponse

    from vllm_stgridpool.video.loader import busy_error

    async def handler(req, exc):
        return JSONResponse({}, status_code=503)

    wrapped = retry_after.with_retry_after(handler)
    assert asyncio.run(wrapped(None, busy_error("busy", 3))).headers["retry-after"] == "3"
    assert "retry-after" not in asyncio.run(wrapped(None, ValueError("no hint"))).headers


# --- against a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(onevision_checkpoint, tmp_path_factory):
    args = ("--plugins", "stgridpool", *cpu_server_args())
    yield from serving(onevision_checkpoint, tmp_path_factory, "admission", *args, timeout=420, env=SERVER_ENV)


@pytest.fixture(scope="module")
def post(server, onevision_checkpoint):
    """``post(*video_payloads) -> (response, seconds)``: a 2-token chat completion about the videos."""

    def send(*payloads: bytes):
        content = [{"type": "video_url", "video_url": {"url": data_url(p)}} for p in payloads]
        body = {
            "model": str(onevision_checkpoint),
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}],
            "max_tokens": 2,
            "temperature": 0,
        }
        started = time.monotonic()
        response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
        return response, time.monotonic() - started

    return send


def message(response) -> str:
    return response.json()["error"]["message"]


@pytest.mark.engine
def test_time_bombs_end_at_the_deadline_a_busy_server_says_when_to_retry_and_recovers_at_once(server, post, capsys):
    """Two time bombs hold both workers: each is a 422 naming the deadline, within it; a small video sent
    meanwhile waits half the deadline, then gets 503 with Retry-After; the next one is served at once."""
    bomb = time_bomb_mp4(600_000)
    small = mp4_bytes(2)
    assert post(small)[0].status_code == 200  # workers started
    outcomes = {}

    def send(name: str, payload: bytes) -> None:
        outcomes[name] = post(payload)

    with PeakSampler(server.process.pid) as memory:
        bombs = [threading.Thread(target=send, args=(f"bomb {i}", bomb)) for i in range(2)]
        for thread in bombs:
            thread.start()
        time.sleep(2)
        send("while busy", small)
        for thread in bombs:
            thread.join(120)
    (busy, busy_seconds), next_served = outcomes["while busy"], post(small)
    with capsys.disabled():
        for name, (response, seconds) in sorted(outcomes.items()):
            print(f"\n{name}: HTTP {response.status_code} in {seconds:.1f} s "
                  f"(Retry-After {response.headers.get('retry-after')})", end="")
        print(f"\nnext: HTTP {next_served[0].status_code} in {next_served[1]:.2f} s; "
              f"server group peak RSS {memory.rise / 2**20:+.0f} MiB")
    for name in ("bomb 0", "bomb 1"):
        response, seconds = outcomes[name]
        assert response.status_code == 422, response.text
        assert f"video deadline of {DEADLINE_SECONDS} s (STGRIDPOOL_VIDEO_DEADLINE_SECONDS)" in message(response)
        assert seconds < DEADLINE_SECONDS + 3
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == str(-(-DEADLINE_SECONDS // 8))
    assert f"stayed busy for the {DEADLINE_SECONDS // 2} s a video may wait" in message(busy)
    assert DEADLINE_SECONDS / 2 - 1 < busy_seconds < DEADLINE_SECONDS / 2 + 3
    assert next_served[0].status_code == 200 and next_served[1] < 3
    assert memory.rise < 512 * 2**20  # two replacement workers and the uploads (measured +299 to +317 MiB)


@pytest.mark.engine
def test_a_request_that_can_never_fit_is_refused_at_once_naming_both_figures(server, post, capsys):
    """Six 4K 64-frame videos (28 KB each, 9.6 GB decoded) against a 2 GiB budget: headers only, then 400."""
    uhd = size_bomb_mp4(64, 3840, 2160)
    with PeakSampler(server.process.pid) as memory:
        response, seconds = post(*[uhd] * 6)
    with capsys.disabled():
        print(f"\nsix 4K x 64-frame videos: HTTP {response.status_code} in {seconds:.2f} s, "
              f"server group peak RSS {memory.rise / 2**20:+.0f} MiB")
    assert response.status_code == 400, response.text
    assert (
        f"this request's 6 videos decode to {6 * UHD_64_FRAMES_BYTES:,} bytes of frames in all, over the server's "
        f"video decode budget of {BUDGET_BYTES:,} bytes"
    ) in message(response)
    assert seconds < 3
    assert memory.rise < 300 * 2**20
    assert post(mp4_bytes(2))[0].status_code == 200


@pytest.mark.engine
def test_the_budget_holds_until_vllm_has_processed_the_frames(server, post, capsys):
    """Two 4K 64-frame requests at once, each 1.59 GB of frames, a 2 GiB budget: the second is decoded only
    once vLLM's processor let go of the first's frames, so the server never holds both (about 3.1 GB more)."""
    videos = [size_bomb_mp4(64, 3840, 2160 - 16 * i) for i in range(2)]  # distinct: no cache hit
    outcomes = {}

    def send(i):
        """As a client does: a busy answer (the wait for the budget is half this server's 20 s deadline, which
        a loaded machine can outlast while vLLM processes the first video) is sent again after Retry-After."""
        response, seconds = post(videos[i])
        if response.status_code == 503:
            time.sleep(float(response.headers["Retry-After"]))
            response, seconds = post(videos[i])
        outcomes[i] = (response, seconds)

    with PeakSampler(server.process.pid) as memory:
        senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(180)
    with capsys.disabled():
        print(f"\ntwo 4K x 64-frame requests at once: HTTP {[outcomes[i][0].status_code for i in range(2)]} in "
              f"{[round(outcomes[i][1], 1) for i in range(2)]} s, server group peak RSS {memory.rise / 2**20:+.0f} MiB")
    assert [outcomes[i][0].status_code for i in range(2)] == [200, 200], [outcomes[i][0].text for i in range(2)]
    # One video's frames (1.48 GiB) and what vLLM's processor makes of them (1.95 GiB for one such request
    # alone: +3.4 GiB in all); measured +3.2 to +3.9 GiB. Both videos' frames at once would be 5 GiB or more.
    assert memory.rise < 4.5 * 2**30


@pytest.mark.engine
def test_with_no_limit_given_a_prompt_holds_one_video_per_media_thread(post):
    """No --limit-mm-per-prompt: 8 videos (vLLM's 8 media threads; its own default is 999) are admitted
    together and served, a ninth is vLLM's 400."""
    small = mp4_bytes(2)
    response, _ = post(*[small] * 9)
    assert response.status_code == 400 and "At most 8 video(s)" in message(response), response.text
    response, seconds = post(*[small] * 8)
    assert response.status_code == 200, response.text
