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
