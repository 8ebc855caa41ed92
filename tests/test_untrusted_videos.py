"""A real ``vllm serve --plugins stgridpool`` fed size bombs and a decoder killed mid-decode.

Size bombs are H.264 mp4s made here (libx264, one colour, CRF 51): 64 frames
of 4096 x 4096 are about 50 KB, of 8192 x 8192 about 200 KB, and would
decode to 3.2 GB and 12.9 GB of RGB. The server must refuse them from the
container's header: HTTP 400 naming ``max_video_pixels`` and the video's
size, within 2 s, with the resident memory of its processes (API server,
engine core, decode workers: its process group) rising less than 200 MB.
"""

from __future__ import annotations

import base64
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import hostile_videos as hostile
from tests.support.server_memory import PeakSampler
from tests.support.servers import cpu_server_args, serving
from vllm_stgridpool_testing.sample_videos import mp4_bytes, size_bomb_mp4

pytestmark = pytest.mark.engine

SERVE_ARGS = ("--plugins", "stgridpool", *cpu_server_args())
FRAME_TOKENS = 169  # 27 x 27 patches pooled with kernel 2: 13 x 13
REFUSAL_SECONDS = 2.0
RSS_RISE_BOUND = 200 * 2**20
DECODE_WORKER = "vllm_stgridpool.video.decode_worker"


def data_url(payload: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(payload).decode()


def chat_body(model: str, url: str) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": "Describe the video."},
                ],
            }
        ],
        "max_tokens": 2,
        "temperature": 0,
    }


def decode_workers(pgid: int) -> list[int]:
    """Pids of the server's decode worker processes."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) == pgid and DECODE_WORKER in Path(f"/proc/{name}/cmdline").read_text():
                pids.append(int(name))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(onevision_checkpoint, tmp_path_factory):
    yield from serving(onevision_checkpoint, tmp_path_factory, "untrusted", *SERVE_ARGS, timeout=420)


@pytest.fixture(scope="module")
def post(server, onevision_checkpoint):
    """``post(url) -> httpx.Response`` of a 2-token chat completion about the video at ``url``."""
    model = str(onevision_checkpoint)
    return lambda url: httpx.post(
        server.base_url + "/v1/chat/completions", json=chat_body(model, url), timeout=300
    )


@pytest.fixture(scope="module")
def text_tokens(post, mp4_factory) -> int:
    """Prompt tokens that are not the video's: a 1-frame video's prompt minus ``169 + 1``."""
    response = post(data_url(mp4_factory(1).read_bytes()))
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"] - (FRAME_TOKENS + 1)


@pytest.fixture(scope="module")
def expect_served(post, mp4_factory, text_tokens, server):
    """The server is up and a 2-frame video is served and counted right."""

    def check() -> None:
        assert server.alive(), server.log()[-3000:]
        response = post(data_url(mp4_factory(2).read_bytes()))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == text_tokens + 2 * FRAME_TOKENS + 1

    return check


@pytest.mark.parametrize("side", [4096, 8192])
def test_size_bomb_is_refused_from_its_header(server, post, expect_served, side, capsys):
    bomb = size_bomb_mp4(64, side, side)
    assert len(bomb) < 300_000, len(bomb)
    expect_served()  # decode workers started, caches warm: what is measured is the bomb alone
    with PeakSampler(server.process.pid) as memory:
        before = memory.peak
        started = time.monotonic()
        response = post(data_url(bomb))
        seconds = time.monotonic() - started
    rise = memory.peak - before
    with capsys.disabled():
        print(
            f"\n{side}x{side} x 64 frames ({len(bomb):,} bytes of mp4, {64 * side * side * 3 / 1e9:.1f} GB decoded): "
            f"HTTP {response.status_code} in {seconds:.3f} s, server group peak RSS {rise / 2**20:+.1f} MiB"
        )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert f"{side}x{side} ({side * side:,} pixels)" in message and "max_video_pixels of 8,294,400" in message, message
    assert seconds < REFUSAL_SECONDS
    assert rise < RSS_RISE_BOUND
    expect_served()


def test_1080p_64_frames_are_served(post, mp4_factory, text_tokens, expect_served):
    response = post(data_url(mp4_factory(64, 1920, 1080).read_bytes()))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == text_tokens + 64 * FRAME_TOKENS + 1
    expect_served()


def test_a_decoder_killed_mid_decode_fails_that_request_only(server, post, mp4_factory, expect_served):
    """SIGKILL to the worker decoding a 1080p video: that request is a 503 naming the decoder; the next is served."""
    url = data_url(mp4_factory(64, 1920, 1080).read_bytes())
    expect_served()
    pgid = server.process.pid
    workers = decode_workers(pgid)
    assert workers, "no decode worker in the server's process group"
    busy_before = {pid: cpu_seconds(pid) for pid in workers}
    outcome = {}
    sender = threading.Thread(target=lambda: outcome.update(response=post(url)))
    sender.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and sender.is_alive() and time.monotonic() < deadline:
        for pid in workers:
            if cpu_seconds(pid) - busy_before[pid] > 0.05:  # this one is decoding
                victim = pid
                break
        time.sleep(0.01)
    assert victim is not None, "no worker started decoding"
    os.kill(victim, signal.SIGKILL)
    sender.join(300)
    response = outcome["response"]
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "video decoder (PyAV" in message and "SIGKILL" in message, message
    expect_served()
    assert victim not in decode_workers(pgid)


# --- what is inside a file: only video containers, counts the bytes hold, rotation, loader names ------------

# Refusals happen in the API server from the upload's bytes, before a decode worker is asked.
CONTENT_REFUSAL_SECONDS = 2.0
CONTENT_RSS_RISE_BOUND = 64 * 2**20


def _content_cases() -> dict:
    """name -> (payload, media type, words the 400's message must hold)."""
    mp4 = mp4_bytes(10)
    cases = {
        "ffconcat": (hostile.ffconcat_script("secretclip.mp4"), "video/mp4", "an ffconcat script"),
        "ffconcat_subfolder": (hostile.ffconcat_script("sub/x.mp4"), "video/mp4", "an ffconcat script"),
        "hls": (hostile.hls_playlist("secretclip.mp4"), "video/mp4", "an HLS playlist"),
        "avi_claiming_20M_frames": (
            hostile.lying_avi(hostile.clip("avi"), 20_000_000), "video/mp4", "declares 20,000,000 video frames"
        ),
        "animated_webp_0x0": (hostile.zero_size_animated_webp(), "video/webp", "a WebP image"),
        "mp4_0x0": (hostile.no_picture_mp4(mp4), "video/mp4", "frame size of 0x0"),
        "jpeg_frames_8000x8000": (None, "video/jpeg", "max_video_pixels of 8,294,400"),
    }
    for samples in (20_000_000, 50_000_000, 178_000_000):
        cases[f"index_bomb_{samples // 10**6}M"] = (
            hostile.index_bomb_mp4(mp4, samples), "video/mp4", f"declares {samples:,} samples in one track"
        )
    return cases


CONTENT_CASES = _content_cases()


def _jpeg_frames_url(count: int, side: int) -> str:
    """A video/jpeg data URL of ``count`` copies of one ``side`` x ``side`` JPEG (1 MB at 8000)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 140)).save(buffer, format="JPEG", quality=5)
    frame = base64.b64encode(buffer.getvalue()).decode()
    return "data:video/jpeg;base64," + ",".join([frame] * count)


@pytest.fixture(scope="module")
def planted_files():
    """A clip planted where the server writes uploads (``TMPDIR``), as a playlist would name it."""
    folder = Path(tempfile.gettempdir())
    planted = [folder / "secretclip.mp4", folder / "sub" / "x.mp4"]
    planted[1].parent.mkdir(exist_ok=True)
    for path in planted:
        path.write_bytes(mp4_bytes(4))
    yield planted
    for path in planted:
        path.unlink(missing_ok=True)


def _measured(server, send, capsys, label: str):
    """``send()``'s response, with its time and the server group's peak RSS rise printed and returned."""
    with PeakSampler(server.process.pid) as memory:
        before = memory.peak
        started = time.monotonic()
        response = send()
        seconds = time.monotonic() - started
    rise = memory.peak - before
    with capsys.disabled():
        print(f"\n{label}: HTTP {response.status_code} in {seconds:.3f} s, server group peak RSS {rise / 2**20:+.1f} MiB")
    return response, seconds, rise


@pytest.mark.parametrize("name", sorted(CONTENT_CASES))
def test_what_is_inside_a_file_is_refused_by_name(server, post, expect_served, planted_files, name, capsys):
    payload, media_type, words = CONTENT_CASES[name]
    if payload is None:
        url = _jpeg_frames_url(8, 8000)
    else:
        url = f"data:{media_type};base64," + base64.b64encode(payload).decode()
    expect_served()
    response, seconds, rise = _measured(server, lambda: post(url), capsys, f"{name} ({len(url):,} bytes of URL)")
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert words in message, message
    assert tempfile.gettempdir() not in message and "stgridpool-video-" not in message, message
    assert seconds < CONTENT_REFUSAL_SECONDS
    assert rise < CONTENT_RSS_RISE_BOUND
    expect_served()


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_videos_are_served(server, post, text_tokens, expect_served, degrees, capsys):
    """(That the frames reach the model upright, equal to opencv's, is tests/test_video_containers.py.)"""
    rotated = hostile.rotated_mp4(mp4_bytes(2), degrees)
    response, _, _ = _measured(server, lambda: post(data_url(rotated)), capsys, f"rotated {degrees}")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == text_tokens + 2 * FRAME_TOKENS + 1
    expect_served()

