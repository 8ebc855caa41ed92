"""What the patches hand vLLM and the venv: arguments passed through, the start-up hook's line.

A keyword upstream adds to ``MediaConnector.load_from_url`` (0.32 has
``fetch_timeout``) must reach vLLM's method through P5's connector, not
become a ``TypeError`` on every request with a media URL.
"""

from __future__ import annotations

import asyncio

from vllm_stgridpool.compat import media_fetch


def test_unknown_arguments_reach_vllms_connector(monkeypatch):
    from vllm.multimodal.media.connector import MediaConnector

    seen = []

    def load_from_url(self, url, media_io, *, fetch_timeout=None, added_later=None):
        seen.append(("sync", url, media_io, fetch_timeout, added_later))
        return "media"

    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None, added_later=None):
        seen.append(("async", url, media_io, fetch_timeout, added_later))
        return "media"

    monkeypatch.setattr(MediaConnector, "load_from_url", load_from_url)
    monkeypatch.setattr(MediaConnector, "load_from_url_async", load_from_url_async)
    connector = media_fetch._connector_class()()
    assert connector.load_from_url("http://x/v.mp4", "io", fetch_timeout=3, added_later=True) == "media"
    assert asyncio.run(connector.load_from_url_async("http://x/v.mp4", "io", added_later=1)) == "media"
    assert seen == [("sync", "http://x/v.mp4", "io", 3, True), ("async", "http://x/v.mp4", "io", None, 1)]


def test_the_installed_hook_line_is_the_ledgers_file():
    """``compat.install`` writes its line itself; the file in patches/ documents it and must not drift."""
    from pathlib import Path

    from vllm_stgridpool.compat import install

    shipped = Path(__file__).resolve().parent.parent / "patches" / install.PTH_NAME
    assert shipped.read_text() == install.PTH_LINE


def test_a_malformed_setting_stops_the_plugin_at_start_up():
    """vLLM loads the plugin in every process it starts; a bad STGRIDPOOL_* value must end start-up with
    the variable's name, not fail each request that reads it later."""
    import os
    import subprocess
    import sys

    load = "from vllm.plugins import load_general_plugins; load_general_plugins()"
    for name, value, says in (
        ("STGRIDPOOL_MAX_VIDEO_PIXELS", "4k", "is not a whole number"),
        ("STGRIDPOOL_VIDEO_DECODE_WORKERS", "-1", "must be at least 0"),
        ("STGRIDPOOL_VIDEO_DEADLINE_SECONDS", "0.5", "must be at least 1.0"),
    ):
        env = {**os.environ, "VLLM_PLUGINS": "stgridpool", name: value}
        done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and f"{name}={value!r} {says}" in done.stderr, done.stderr[-2000:]
    env = {**os.environ, "VLLM_PLUGINS": "stgridpool", "STGRIDPOOL_MAX_VIDEO_PIXELS": "1000000"}
    done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
