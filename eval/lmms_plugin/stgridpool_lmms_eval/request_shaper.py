"""Each chat request shaped as the authors' harness asked, on its way to the server; 503s waited out.

Wraps an OpenAI client (``client.chat.completions.create``, where
lmms-eval's ``openai`` model sends every request): adds the system prompt,
the ``media_io_kwargs`` (frame count and rate) and the ``stgridpool``
object, sends a folder of frames as a ``video/jpeg`` data URL
(``frames.py``), refuses a document whose visual is missing
(``MissingVideo``: lmms-eval records the failure), and retries HTTP 503
(the server's video decoders busy) after the server's ``Retry-After``, or a
growing pause without one, counting each retry. Nothing here imports
lmms-eval.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from stgridpool_lmms_eval.frames import folder_data_url

MISSING_VIDEO = "[stgridpool: visual missing] "


class MissingVideo(Exception):
    """The document's video is not there; the request is not sent."""


def pause(error, attempt: int) -> float:
    """Seconds before retrying a 503: its ``Retry-After`` (whole seconds), else 2, 4, 8 ...; at most 60."""
    hint = error.response.headers.get("retry-after", "") if error.response is not None else ""
    seconds = float(hint) if hint.strip().isdigit() else 2.0 ** (attempt + 1)
    return min(60.0, max(1.0, seconds))


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
                time.sleep(pause(error, attempt))

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
