"""``stgridpool_openai``: lmms-eval's ``openai`` chat model with an ST-GridPool object per request.

Everything lmms-eval's model does stays: each video goes as one ``video_url``
part (``pass_video_url`` defaults to true here) and the server decodes and
samples it. Two model arguments are added:

- ``stgridpool``: a JSON object sent as ``mm_processor_kwargs.stgridpool``
  with every request (``{"kernel_size": 3}``, ``{"grid_sizes": [],
  "grid_strides": []}``, ``{"max_video_tokens": 4096}``, ...), so that
  settings a request may carry run against one server;
- ``num_frames_per_request`` (default true): false drops the
  ``media_io_kwargs`` frame count lmms-eval adds, for a server whose frame
  count is set by ``--media-io-kwargs`` and that does not accept one per
  request (a stock-pooling server without ``--trust-request-mm-kwargs``).
"""

from __future__ import annotations

import json

from lmms_eval.models.chat.openai import OpenAICompatible


class STGridPoolOpenAI(OpenAICompatible):
    is_simple = False

    def __init__(self, *args, stgridpool=None, num_frames_per_request=True, pass_video_url=True, **kwargs):
        super().__init__(*args, pass_video_url=pass_video_url, **kwargs)
        settings = json.loads(stgridpool) if isinstance(stgridpool, str) else stgridpool
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"stgridpool must be a JSON object such as {{\"kernel_size\": 3}}, got {stgridpool!r}")
        if isinstance(num_frames_per_request, str):
            num_frames_per_request = num_frames_per_request.lower() == "true"
        # The parent builds each request's body inside generate_until and hands it to
        # client.chat.completions.create: the one place every request passes.
        self.client = _RequestExtras(self.client, settings, bool(num_frames_per_request))


class _RequestExtras:
    """An OpenAI client whose chat completions carry the ST-GridPool object (and maybe no frame count)."""

    def __init__(self, client, settings: dict | None, num_frames_per_request: bool):
        self._client = client
        self._settings = settings
        self._num_frames_per_request = num_frames_per_request
        self.chat = self
        self.completions = self

    def create(self, **payload):
        extra_body = dict(payload.pop("extra_body", None) or {})
        if self._settings is not None:
            mm_processor_kwargs = dict(extra_body.get("mm_processor_kwargs") or {})
            mm_processor_kwargs["stgridpool"] = self._settings
            extra_body["mm_processor_kwargs"] = mm_processor_kwargs
        if not self._num_frames_per_request:
            extra_body.pop("media_io_kwargs", None)
        return self._client.chat.completions.create(**payload, extra_body=extra_body or None)

    def __getattr__(self, name):
        return getattr(self._client, name)
