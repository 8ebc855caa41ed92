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
  retried that many times, after its ``Retry-After`` (else 2, 4, ... 60 s);
  other errors fail at once;
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
from pathlib import Path

from lmms_eval.models.chat.openai import OpenAICompatible

from stgridpool_lmms_eval.request_shaper import MISSING_VIDEO, RequestShaper

SYSTEM_PROMPTS = {"qwen_1_5": "You are a helpful assistant.", "none": ""}


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
