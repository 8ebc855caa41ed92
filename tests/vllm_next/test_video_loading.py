"""Video loading on vLLM 0.33: the opencv 1-frame fix the plugin relies on to drop its decord
default, and 64-frame requests within 0.33's new per-request decode budget (the plugin's ``pyav``
loader's full behaviour is tests/test_video_loader.py, which this environment runs too)."""

from __future__ import annotations

import base64

import pytest

from vllm_stgridpool_testing.sample_videos import write_mp4


def data_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def one_frame(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("v") / "one.mp4", 1, 64, 48, 10)


@pytest.fixture(scope="module")
def eighty_frames(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("v") / "eighty.mp4", 80, 64, 48, 10)


@pytest.mark.parametrize("backend", ["opencv", "pyav"])
def test_both_loaders_read_a_one_frame_video(one_frame, backend):
    """vLLM 0.32's opencv loader returned 0 frames here ("Cannot get size of empty video")."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from vllm_stgridpool.video.loader import register_video_loader

    register_video_loader()
    loaded, metadata = VIDEO_LOADER_REGISTRY.load(backend).load_bytes(one_frame.read_bytes(), num_frames=64)
    assert loaded.shape == (1, 48, 64, 3)
    assert metadata["total_num_frames"] == 1


def fetch(url: str, backend: str, limit: int | None, monkeypatch):
    """A request's video through 0.33's connector (the plugin's P5 subclass) with a decode budget."""
    from vllm.multimodal.media.base import MediaDecodedBudget

    from vllm_stgridpool.compat import media_fetch
    from vllm_stgridpool.video.loader import register_video_loader

    register_video_loader()
    if limit is not None:
        monkeypatch.setenv("VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES", str(limit))
    connector = media_fetch._connector_class()(
        media_io_kwargs={"video": {"num_frames": 64, "video_backend": backend}}, decoded_budget=MediaDecodedBudget()
    )
    return connector.fetch_video(url).media


@pytest.mark.parametrize("backend", ["opencv", "pyav"])
def test_sixty_four_frames_fit_a_budget_of_exactly_their_bytes(eighty_frames, backend, monkeypatch):
    exact = 64 * 48 * 64 * 3
    loaded, metadata = fetch(data_url(eighty_frames), backend, exact, monkeypatch)
    assert loaded.shape == (64, 48, 64, 3) and len(metadata["frames_indices"]) == 64
    with pytest.raises(ValueError, match="VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES"):
        fetch(data_url(eighty_frames), backend, exact - 1, monkeypatch)


def test_default_budget_holds_64_frames_up_to_1440p(monkeypatch):
    """0.33's default (715,827,880 bytes) against 64 decoded RGB frames at common sizes."""
    import vllm.envs as envs
    from vllm.multimodal.media.base import MediaDecodedBudget

    monkeypatch.delenv("VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES", raising=False)
    assert envs.VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES == 715_827_880
    for width, height in [(1920, 1080), (2560, 1440)]:
        MediaDecodedBudget().charge(64 * width * height * 3)
    with pytest.raises(ValueError, match="VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES"):
        MediaDecodedBudget().charge(64 * 3840 * 2160 * 3)
