"""The decord loader keeps the opencv loader's contract and fixes its gaps.

Videos are real mp4 (mp4v) files written with OpenCV, so both loaders decode
the same bytes through the same ``load_bytes`` interface vLLM calls.
"""

import base64
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from vllm import envs
from vllm.multimodal.media import ImageMediaIO, MediaConnector, VideoMediaIO
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
from vllm_stgridpool.video_loader import DecordVideoLoader, register_decord_loader

from tests.support.hostile_videos import offsets_past_the_end

# (frame count, width, height, fps): short, odd-length and longer clips.
VIDEO_SHAPES = {
    "40f_160x120_30fps": (40, 160, 120, 30.0),
    "7f_96x64_10fps": (7, 96, 64, 10.0),
    "150f_128x96_25fps": (150, 128, 96, 25.0),
}
# (num_frames, fps) requests as vLLM passes them; -1 means "no limit".
SAMPLING_REQUESTS = [(-1, -1), (32, -1), (8, -1), (64, -1), (1, -1), (16, 2), (64, 5)]


def write_mp4(path: Path, num_frames: int, width: int, height: int, fps: float):
    """Write frames whose content changes over time, with a fixed red left half.

    The red half (BGR (0, 0, 255) on write) tells RGB from BGR on read; the
    moving square and the frame-dependent grey bar make each frame distinct.
    """
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
    )
    assert writer.isOpened()
    for index in range(num_frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:, : width // 2] = (0, 0, 255)
        frame[: height // 4, width // 2 :] = (index * 5) % 256
        side = height // 4
        left = (index * 3) % (width - side)
        frame[height - side :, left : left + side] = 255
        writer.write(frame)
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        name: write_mp4(folder / f"{name}.mp4", *shape)
        for name, shape in VIDEO_SHAPES.items()
    }


@pytest.fixture(scope="module")
def one_frame_mp4(tmp_path_factory) -> bytes:
    return write_mp4(tmp_path_factory.mktemp("one") / "one.mp4", 1, 160, 120, 30.0)


@pytest.fixture(autouse=True)
def decord_registered():
    register_decord_loader()


def opencv_loader():
    return VIDEO_LOADER_REGISTRY.name2class["opencv"]


BROKEN_KINDS = (
    "empty",
    "not_a_video",
    "truncated_head",
    "truncated_tail",
    "zeroed_header",
    "noise_in_frames",
)


def broken_inputs(valid: bytes) -> dict[str, bytes]:
    """Empty, foreign, cut and damaged variants of a valid mp4."""
    noise = np.random.default_rng(0).integers(0, 256, len(valid) - 4000, np.uint8)
    return {
        "empty": b"",
        "not_a_video": b"this is not a video" * 50,
        "truncated_head": valid[:1000],
        "truncated_tail": valid[: len(valid) * 3 // 4],
        "zeroed_header": bytes(64) + valid[64:],
        "noise_in_frames": valid[:2000] + noise.tobytes() + valid[-2000:],
    }


def test_registry_resolves_decord_idempotently():
    for _ in range(3):
        assert register_decord_loader() is DecordVideoLoader
    assert VIDEO_LOADER_REGISTRY.name2class["decord"] is DecordVideoLoader
    assert isinstance(VIDEO_LOADER_REGISTRY.load("decord"), DecordVideoLoader)


@pytest.mark.parametrize("num_frames,fps", SAMPLING_REQUESTS)
@pytest.mark.parametrize("video_name", VIDEO_SHAPES)
def test_frame_indices_and_pixels_match_opencv(videos, video_name, num_frames, fps):
    data = videos[video_name]
    frames, metadata = DecordVideoLoader.load_bytes(data, num_frames, fps)
    expected_frames, expected_metadata = opencv_loader().load_bytes(
        data, num_frames, fps
    )
    assert len(expected_frames) > 0, "opencv loader must work on these videos"

    assert metadata["frames_indices"] == expected_metadata["frames_indices"]
    assert frames.dtype == np.uint8
    assert frames.shape == expected_frames.shape
    _, width, height, _ = VIDEO_SHAPES[video_name]
    assert frames.shape[1:] == (height, width, 3)
    assert np.abs(frames.astype(int) - expected_frames.astype(int)).mean() < 1.0


@pytest.mark.parametrize("video_name", VIDEO_SHAPES)
def test_metadata_keys_types_and_values_match_opencv(videos, video_name):
    metadata = DecordVideoLoader.load_bytes(videos[video_name], num_frames=8)[1]
    expected = opencv_loader().load_bytes(videos[video_name], num_frames=8)[1]

    assert metadata.keys() == expected.keys()
    assert {k: type(v) for k, v in metadata.items()} == {
        k: type(v) for k, v in expected.items()
    }
    assert all(type(i) is int for i in metadata["frames_indices"])
    assert metadata["video_backend"] == "decord"
    assert {k: v for k, v in metadata.items() if k != "video_backend"} == {
        k: v for k, v in expected.items() if k != "video_backend"
    }


def test_frames_are_rgb(videos):
    frames, _ = DecordVideoLoader.load_bytes(videos["40f_160x120_30fps"], 4)
    red_half = frames[:, 60:, :40].reshape(-1, 3).mean(axis=0)
    assert red_half[0] > 200 and red_half[2] < 50, red_half


def test_consecutive_frames_differ(videos):
    frames, _ = DecordVideoLoader.load_bytes(videos["40f_160x120_30fps"], -1)
    assert all((a != b).any() for a, b in zip(frames, frames[1:]))


def test_one_frame_mp4_decodes_to_one_frame(one_frame_mp4):
    frames, metadata = DecordVideoLoader.load_bytes(one_frame_mp4, num_frames=32)
    assert frames.shape == (1, 120, 160, 3)
    assert metadata["frames_indices"] == [0]
    assert metadata["total_num_frames"] == 1


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_input_raises_value_error(videos, kind):
    data = broken_inputs(videos["40f_160x120_30fps"])[kind]
    with pytest.raises(ValueError, match="Could not decode video") as caught:
        DecordVideoLoader.load_bytes(data, num_frames=32)
    assert "/github/" not in str(caught.value)


def test_offsets_past_the_end_are_a_clear_error_not_a_crash(videos):
    """An mp4 whose chunk offsets point past its end: a ValueError, and the process lives on.

    decord's in-memory reader segfaulted on it, which in a server ends the
    API process; the loader runs in a child here so a crash fails this test
    instead of ending the session.
    """
    data = offsets_past_the_end(videos["40f_160x120_30fps"])
    code = (
        "import sys\n"
        "from vllm_stgridpool.video_loader import DecordVideoLoader\n"
        "try:\n"
        "    DecordVideoLoader.load_bytes(sys.stdin.buffer.read(), num_frames=8)\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=300)
    assert child.returncode == 0, f"the loader's process ended with {child.returncode}: {child.stderr[-2000:]!r}"
    assert b"ValueError: Could not decode video" in child.stdout, child.stdout


def test_accepts_every_opencv_keyword(videos):
    data = videos["40f_160x120_30fps"]
    plain = DecordVideoLoader.load_bytes(data, num_frames=8)
    with_options = DecordVideoLoader.load_bytes(
        data,
        num_frames=8,
        fps=-1,
        max_duration=300,
        frame_recovery=True,
        backend="opencv",
        num_ffmpeg_threads=2,
        an_unknown_sampling_option=1,
    )
    assert plain[1] == with_options[1]
    np.testing.assert_array_equal(plain[0], with_options[0])


def test_frame_pixel_limit_is_enforced(videos, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", str(160 * 120 - 1))
    uncache_envs(monkeypatch)
    with pytest.raises(ValueError, match="exceed the maximum"):
        DecordVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)


def test_no_files_left_in_temp_dir(videos, one_frame_mp4, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    for data in [*videos.values(), one_frame_mp4]:
        DecordVideoLoader.load_bytes(data, num_frames=8)
    for data in broken_inputs(videos["40f_160x120_30fps"]).values():
        with pytest.raises(ValueError):
            DecordVideoLoader.load_bytes(data, num_frames=8)
    assert list(scratch.iterdir()) == []


def uncache_envs(monkeypatch):
    """Read env vars live even if an engine test froze ``vllm.envs`` already."""
    if envs._is_envs_cache_enabled():
        monkeypatch.setattr(envs, "__getattr__", envs.__getattr__.__wrapped__)


def test_video_media_io_selects_decord_by_video_backend(one_frame_mp4):
    video_io = VideoMediaIO(ImageMediaIO(), num_frames=8, video_backend="decord")
    assert isinstance(video_io.video_loader, DecordVideoLoader)
    frames, metadata = video_io.load_bytes(one_frame_mp4).media
    assert frames.shape[0] == 1
    assert metadata["video_backend"] == "decord"


def test_env_var_selects_decord(videos, monkeypatch):
    monkeypatch.setenv("VLLM_VIDEO_LOADER_BACKEND", "decord")
    uncache_envs(monkeypatch)
    assert envs.VLLM_VIDEO_LOADER_BACKEND == "decord"
    video_io = VideoMediaIO(ImageMediaIO(), num_frames=8)
    assert isinstance(video_io.video_loader, DecordVideoLoader)
    frames, metadata = video_io.load_bytes(videos["40f_160x120_30fps"]).media
    assert frames.shape[0] == 8
    assert metadata["video_backend"] == "decord"


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def test_server_media_connector_uses_decord(videos, one_frame_mp4):
    """``MediaConnector`` is what the API server builds from --media-io-kwargs."""
    connector = MediaConnector(
        media_io_kwargs={"video": {"video_backend": "decord", "num_frames": 8}}
    )
    frames, metadata = connector.fetch_video(data_url(one_frame_mp4)).media
    assert frames.shape[0] == 1 and metadata["video_backend"] == "decord"

    truncated = videos["40f_160x120_30fps"][:1000]
    # ValueError is what the server's error handler maps to HTTP 400.
    with pytest.raises(ValueError, match="Could not decode video"):
        connector.fetch_video(data_url(truncated))


@pytest.mark.parametrize(("frames", "width", "height"), [(1, 1, 1), (3, 7, 1000), (2, 4000, 16), (5, 16, 16)])
def test_extreme_frame_sizes_decode(frames, width, height):
    """decord 0.6 mis-sizes some narrow widths; those frames come from PyAV instead."""
    from vllm_stgridpool_testing.sample_videos import mp4_bytes

    decoded, metadata = DecordVideoLoader.load_bytes(mp4_bytes(frames, width=width, height=height))
    assert decoded.shape == (frames, height, width, 3)
    assert decoded.dtype == np.uint8
    assert metadata["total_num_frames"] == frames
