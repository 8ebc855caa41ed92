"""Patches P2, P4 and P5 (patches/README.md): each applies on vLLM 0.32 only and does its one job."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from vllm_stgridpool.compat import media_fetch, model_redirect


def test_p2_torchvision_imports_beside_the_cpu_torch():
    """A fresh interpreter of the venv (start-up hook active) imports the transforms the video processor needs."""
    code = (
        "import torchvision, torchvision.transforms.v2 as v2;"
        "from transformers import LlavaOnevisionVideoProcessor;"
        "from vllm_stgridpool.compat import torchvision_ops;"
        "print(torchvision.__version__, torchvision_ops._library is not None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    version, declared = done.stdout.split()
    # The schemas are declared exactly when torchvision's own ops cannot load (a CUDA build here).
    assert declared == str("+cu" in version)


def test_p4_redirects_before_the_speculators_probe(tmp_path, monkeypatch):
    redirect = tmp_path / "redirect.json"
    redirect.write_text('{"llava-video": "/models/llava-video-7b"}')
    monkeypatch.setenv("VLLM_MODEL_REDIRECT_PATH", str(redirect))
    seen = {}

    def probe(*, model, tokenizer, **kwargs):
        seen.update(model=model, tokenizer=tokenizer)
        return model, tokenizer, None

    wrapped = model_redirect.redirect_first(probe)
    assert wrapped(model="llava-video", tokenizer="llava-video", revision=None)[0] == "/models/llava-video-7b"
    assert seen == {"model": "/models/llava-video-7b", "tokenizer": "/models/llava-video-7b"}
    assert wrapped(model="other", tokenizer=None)[0] == "other"


def test_p4_and_p5_leave_other_vllm_versions_alone():
    from vllm.engine import arg_utils
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    before = arg_utils.maybe_override_with_speculators
    assert model_redirect.apply("0.34.0") is False
    assert media_fetch.apply("0.31.1") is False
    assert arg_utils.maybe_override_with_speculators is before
    assert MEDIA_CONNECTOR_REGISTRY.load("http", media_io_kwargs={}).__class__ is MediaConnector


def test_p5_unreachable_url_is_a_client_error():
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    original = MEDIA_CONNECTOR_REGISTRY.name2class["http"]
    try:
        assert media_fetch.apply("0.32.0") is True
        connector = MEDIA_CONNECTOR_REGISTRY.load("http", media_io_kwargs={})
        assert isinstance(connector, MediaConnector)
        url = "http://127.0.0.1:9/clip.mp4"  # loopback discard port: nothing listens
        with pytest.raises(VLLMUnprocessableEntityError, match="127.0.0.1:9"):
            asyncio.run(connector.fetch_video_async(url))
        with pytest.raises(VLLMUnprocessableEntityError, match="127.0.0.1:9"):
            connector.fetch_video(url)
        with pytest.raises(ValueError, match="video"):  # decode errors keep vLLM's own type
            connector.fetch_video("data:video/mp4;base64,AAAA")
    finally:
        MEDIA_CONNECTOR_REGISTRY.name2class["http"] = original


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"video_backend": "no-such-backend"}, "video_backend 'no-such-backend'.*decord.*opencv"),
        ({"num_frames": "all"}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"fps": "fast"}, "fps"),
    ],
)
def test_p5_video_options_are_checked(options, words):
    from vllm_stgridpool.video_loader import register_decord_loader

    register_decord_loader()
    with pytest.raises(ValueError, match=words):
        media_fetch.check_video_options(options)


def test_p5_valid_video_options_pass():
    for options in ({}, {"num_frames": -1}, {"num_frames": 64, "fps": 2}, {"video_backend": "opencv"}):
        media_fetch.check_video_options(options)
