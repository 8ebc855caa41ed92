"""What ``stgridpool_openai`` puts on the wire, and how it waits out a busy server (``request_shaper.py``).

The shaper wraps the OpenAI client lmms-eval's ``openai`` model calls; here
it wraps a recording client in place of the network. A real server's HTTP 503
(its video decoders busy) could not be provoked: the stand-ins' VideoMME run
against servers with one decoder, a 1 ms wait for it and three requests in
flight got none.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "eval" / "lmms_plugin"))
from stgridpool_lmms_eval import request_shaper  # noqa: E402
from stgridpool_lmms_eval.request_shaper import MISSING_VIDEO, MissingVideo, RequestShaper  # noqa: E402


class Recorder:
    """An OpenAI client's ``chat.completions.create`` that answers each call with the next of ``outcomes``."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.payloads = []
        self.chat = self.completions = self

    def create(self, **payload):
        self.payloads.append(payload)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def status(code: int, **headers: str) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(code, request=request, headers=headers)
    return openai.APIStatusError(f"HTTP {code}", response=response, body=None)


def shaper(client, tmp_path, **overrides) -> RequestShaper:
    options = dict(settings={"kernel_size": 3}, media_io_kwargs={"video": {"num_frames": 8, "fps": 1.0}},
                   system_prompt="You are a helpful assistant.", max_frames=8, fps=1.0, frame_folder_fps=3,
                   busy_retries=3, stats_file=tmp_path / "stats.json")
    return RequestShaper(client, **{**options, **overrides})


def chat(url: str, text: str = "Which way?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_a_request_as_the_authors_harness_asks(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded here")
    client = Recorder("answer")
    assert shaper(client, tmp_path).chat.completions.create(
        messages=chat(video.as_uri()), model="m", max_tokens=16,
        extra_body={"media_io_kwargs": {"video": {"num_frames": 8}}},
    ) == "answer"
    (sent,) = client.payloads
    assert sent["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert sent["messages"][1] == chat(video.as_uri())[0]
    assert sent["extra_body"] == {"media_io_kwargs": {"video": {"num_frames": 8, "fps": 1.0}},
                                  "mm_processor_kwargs": {"stgridpool": {"kernel_size": 3}}}
    assert (sent["model"], sent["max_tokens"]) == ("m", 16)


def test_nothing_per_request_for_a_stock_server(tmp_path):
    client = Recorder("answer")
    shaper(client, tmp_path, settings=None, media_io_kwargs=None, system_prompt="").chat.completions.create(
        messages=chat("https://example.invalid/v.mp4"), model="m",
        extra_body={"media_io_kwargs": {"video": {"num_frames": 8}}},
    )
    (sent,) = client.payloads
    assert sent["extra_body"] is None and [m["role"] for m in sent["messages"]] == ["user"]


def test_a_frame_folder_goes_as_jpeg_frames(tmp_path):
    folder = tmp_path / "episode"
    folder.mkdir()
    for index in range(12):  # 3 fps: every third frame at 1 fps
        Image.new("RGB", (32, 24), (index * 20, 0, 0)).save(folder / f"{index + 1:05d}.jpg")
    client = Recorder("answer")
    shape = shaper(client, tmp_path)
    shape.chat.completions.create(messages=chat(folder.as_uri()), model="m")
    url = client.payloads[0]["messages"][1]["content"][0]["video_url"]["url"]
    assert url.startswith("data:video/jpeg;base64,")
    parts = url.split(",", 1)[1].split(",")
    assert [base64.b64decode(p) for p in parts] == [(folder / f"{i:05d}.jpg").read_bytes() for i in (1, 4, 7, 10)]
    shape.write_stats()
    assert '"frame_folders": 1' in (tmp_path / "stats.json").read_text()


def test_a_missing_visual_is_never_sent(tmp_path):
    client = Recorder()
    shape = shaper(client, tmp_path)
    with pytest.raises(MissingVideo, match="gone.mp4 does not exist"):
        shape.chat.completions.create(messages=chat((tmp_path / "gone.mp4").as_uri()), model="m")
    messages = [{"role": "user", "content": [{"type": "text", "text": MISSING_VIDEO + "video path:/x.mp4 ..."}]}]
    with pytest.raises(MissingVideo, match="video path:/x.mp4"):
        shape.chat.completions.create(messages=messages, model="m")
    assert client.payloads == [] and shape.stats["missing_visuals"] == 2


def test_503_is_waited_out_and_counted(tmp_path, monkeypatch):
    pauses = []
    monkeypatch.setattr(request_shaper.time, "sleep", pauses.append)
    client = Recorder(status(503), status(503), status(503, **{"Retry-After": "8"}), "answer")
    shape = shaper(client, tmp_path)
    assert shape.chat.completions.create(messages=chat("https://example.invalid/v.mp4"), model="m") == "answer"
    assert (pauses, shape.stats["busy_retries"], len(client.payloads)) == ([2.0, 4.0, 8.0], 3, 4)

    client = Recorder(*[status(503, **{"Retry-After": "120"})] * 4)
    with pytest.raises(openai.APIStatusError):
        shaper(client, tmp_path).chat.completions.create(messages=chat("https://example.invalid/v.mp4"), model="m")
    assert len(client.payloads) == 4  # busy_retries 3, then the 503 is the document's failure
    assert pauses[-3:] == [60.0] * 3  # a Retry-After beyond a minute waits a minute


def test_other_errors_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(request_shaper.time, "sleep", lambda seconds: pytest.fail("no pause expected"))
    client = Recorder(status(400))
    with pytest.raises(openai.APIStatusError):
        shaper(client, tmp_path).chat.completions.create(messages=chat("https://example.invalid/v.mp4"), model="m")
    assert len(client.payloads) == 1
