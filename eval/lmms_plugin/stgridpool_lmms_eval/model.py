"""``stgridpool_openai``: lmms-eval's ``openai`` chat model, sending what the authors' harness gave the model.

Each video goes as one ``video_url`` part (``pass_video_url``): the server
decodes and samples it, so ST-GridPool (or stock pooling) sees the whole
video. Model arguments beyond the ``openai`` model's:

- ``fps`` (default 1): sent with the frame count as ``media_io_kwargs.video``
  ``{"num_frames": max_frames_num, "fps": fps}``: one frame per second up to
  ``max_frames_num``, uniform beyond (the authors' ``load_video(..., fps=1)``);
  0 samples ``max_frames_num`` frames uniformly;
- ``system_prompt`` (default ``qwen_1_5``: "You are a helpful assistant.", that
  conversation template's); ``none`` sends none, other text is sent as it is;
- ``frame_folder_fps`` (default 3, TVQA's frames): a visual that is a folder
  of images is sent as a ``video/jpeg`` data URL of the frames the authors'
  rule takes from a video at that rate (``frames.py``);
- ``stgridpool``: a JSON object sent as ``mm_processor_kwargs.stgridpool``
  with every request (``{"kernel_size": 3}``, ...);
- ``media_io_kwargs_per_request`` (default true): false sends no
  ``media_io_kwargs`` (a server that accepts none per request samples by its
  own ``--media-io-kwargs``);
- ``busy_retries`` (default 8): an HTTP 503 (the server's decoders busy) is
  retried after 2, 4, ... 60 s that many times; other errors fail at once;
- ``stats_file``: where the counts of requests, 503 retries, missing videos
  and frame folders are written (JSON) after each batch.

A document whose video is missing (the task's code calls ``sys.exit`` or
raises) or whose request failed gets lmms-eval's failure text
``[LMMS_EVAL_REQUEST_FAILED ...]`` as its reply: the report scores it wrong
without parsing it. Only ``max_retries=1`` attempt is made by lmms-eval
itself; this client does the retrying worth doing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmms_eval.models.chat.openai import OpenAICompatible

from stgridpool_lmms_eval.frames import folder_data_url

SYSTEM_PROMPTS = {"qwen_1_5": "You are a helpful assistant.", "none": ""}
MISSING_VIDEO = "[stgridpool: visual missing] "


class MissingVideo(Exception):
    """The document's video is not there; the request is not sent."""


class STGridPoolOpenAI(OpenAICompatible):
    is_simple = False

    def __init__(
        self,
        *args,
        stgridpool=None,
        fps=1,
        system_prompt="qwen_1_5",
        frame_folder_fps=3,
        media_io_kwargs_per_request=True,
        busy_retries=8,
        stats_file=None,
        pass_video_url=True,
        max_retries=1,
        **kwargs,
    ):
        super().__init__(*args, pass_video_url=pass_video_url, max_retries=max_retries, **kwargs)
        settings = json.loads(stgridpool) if isinstance(stgridpool, str) else stgridpool
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"stgridpool must be a JSON object such as {{\"kernel_size\": 3}}, got {stgridpool!r}")
        video = {"num_frames": int(self.max_frames_num)}
        if float(fps) > 0:
            video["fps"] = float(fps)
        # The openai client's own retries (two, for 5xx and lost connections) would hide 503s from the count.
        self.client = RequestShaper(
            self.client.with_options(max_retries=0),
            settings=settings,
            media_io_kwargs={"video": video} if _true(media_io_kwargs_per_request) else None,
            system_prompt=SYSTEM_PROMPTS.get(str(system_prompt or "none"), str(system_prompt)),
            max_frames=int(self.max_frames_num),
            fps=video.get("fps"),
            frame_folder_fps=float(frame_folder_fps),
            busy_retries=int(busy_retries),
            stats_file=Path(stats_file) if stats_file else None,
        )

    def generate_until(self, requests):
        for request in requests:
            context, doc_to_messages, *rest = request.arguments
            request.arguments = (context, _missing_visual_as_text(doc_to_messages), *rest)
        try:
            return super().generate_until(requests)
        finally:
            self.client.write_stats()


def _true(value) -> bool:
    return value.lower() == "true" if isinstance(value, str) else bool(value)


def _missing_visual_as_text(doc_to_messages):
    """The task's ``doc_to_messages``, where a missing video (``sys.exit`` in VideoMME's, EgoSchema's and
    TempCompass's code, ``FileNotFoundError`` in NExT-QA's) becomes a message the client refuses to send."""

    def messages(doc, *args, **kwargs):
        try:
            return doc_to_messages(doc, *args, **kwargs)
        except (SystemExit, OSError) as error:
            reason = str(error.code if isinstance(error, SystemExit) else error)
            return [{"role": "user", "content": [{"type": "text", "text": MISSING_VIDEO + reason}]}]

    return messages


class RequestShaper:
    """The OpenAI client, with each chat request shaped as the authors' harness prompts and samples."""

    def __init__(self, client, *, settings, media_io_kwargs, system_prompt, max_frames, fps, frame_folder_fps,
                 busy_retries, stats_file):
        self._client = client
        self._settings = settings
        self._media_io_kwargs = media_io_kwargs
        self._system_prompt = system_prompt
        self._max_frames = max_frames
        self._fps = fps
        self._frame_folder_fps = frame_folder_fps
        self._busy_retries = busy_retries
        self._stats_file = stats_file
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "busy_retries": 0, "missing_visuals": 0, "frame_folders": 0}
        self.chat = self
        self.completions = self

    def create(self, **payload):
        try:
            payload["messages"] = self._messages(payload["messages"])
        except MissingVideo:
            self._count("missing_visuals")
            raise
        extra_body = dict(payload.pop("extra_body", None) or {})
        extra_body.pop("media_io_kwargs", None)
        if self._media_io_kwargs:
            extra_body["media_io_kwargs"] = self._media_io_kwargs
        if self._settings is not None:
            processor_kwargs = extra_body.get("mm_processor_kwargs", {})
            extra_body["mm_processor_kwargs"] = {**processor_kwargs, "stgridpool": self._settings}
        self._count("requests")
        return self._send(dict(payload, extra_body=extra_body or None))

    def _send(self, payload):
        from openai import APIStatusError

        for attempt in range(self._busy_retries + 1):
            try:
                return self._client.chat.completions.create(**payload)
            except APIStatusError as error:
                if error.status_code != 503 or attempt == self._busy_retries:
                    raise
                self._count("busy_retries")
                time.sleep(min(60.0, 2.0 ** (attempt + 1)))

    def _messages(self, messages: list[dict]) -> list[dict]:
        shaped = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                message = {**message, "content": [self._part(part) for part in content]}
            shaped.append(message)
        if self._system_prompt and not any(m.get("role") == "system" for m in shaped):
            shaped.insert(0, {"role": "system", "content": self._system_prompt})
        return shaped

    def _part(self, part: dict) -> dict:
        if part.get("type") == "text" and part.get("text", "").startswith(MISSING_VIDEO):
            raise MissingVideo(part["text"][len(MISSING_VIDEO):])
        if part.get("type") != "video_url":
            return part
        url = part["video_url"]["url"]
        if not url.startswith("file://"):
            return part
        path = Path(unquote(urlparse(url).path))
        if not path.exists():
            raise MissingVideo(f"{path} does not exist")
        if not path.is_dir():
            return part
        data_url, _ = folder_data_url(path, self._max_frames, self._frame_folder_fps, self._fps)
        self._count("frame_folders")
        return {"type": "video_url", "video_url": {"url": data_url}}

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def write_stats(self) -> None:
        if self._stats_file is not None:
            with self._lock:
                self._stats_file.write_text(json.dumps(self.stats) + "\n")

    def __getattr__(self, name):
        return getattr(self._client, name)
