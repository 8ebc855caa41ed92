"""The plugin's loader keeps the opencv loader's contract, fixes its gaps, and refuses size bombs from the header.

Videos are real mp4 (mp4v) files written with OpenCV, so both loaders decode
the same bytes through the same ``load_bytes`` interface vLLM calls. The
loader decodes in its pool of worker processes here as in a server.
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
from vllm_stgridpool.video.loader import LOADER_NAME, PyAVVideoLoader, register_video_loader, sampled_frame_count

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
def loader_registered():
    register_video_loader()


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


def test_the_loader_answers_to_its_own_name_only():
    """``pyav``, idempotently; ``decord`` means a real decord loader or none (vLLM 0.32 has none)."""
    for _ in range(3):
        assert register_video_loader()
    assert VIDEO_LOADER_REGISTRY.name2class[LOADER_NAME] is PyAVVideoLoader
    assert isinstance(VIDEO_LOADER_REGISTRY.load(LOADER_NAME), PyAVVideoLoader)
    assert "decord" not in VIDEO_LOADER_REGISTRY.name2class


def test_the_loader_never_replaces_another_registration(monkeypatch, caplog):
    class SomeoneElsesLoader:
        pass

    monkeypatch.setitem(VIDEO_LOADER_REGISTRY.name2class, LOADER_NAME, SomeoneElsesLoader)
    assert not register_video_loader()
    assert VIDEO_LOADER_REGISTRY.name2class[LOADER_NAME] is SomeoneElsesLoader
    assert "the plugin's loader is not registered" in caplog.text


def test_a_video_loader_the_user_names_must_exist():
    from vllm_stgridpool.plugin import check_video_loader_exists

    check_video_loader_exists("opencv")
    with pytest.raises(ValueError, match="the video loader 'decord' .* is not registered; registered loaders: .*opencv"):
        check_video_loader_exists("decord")


@pytest.mark.parametrize("total, duration, num_frames, fps", [
    (10, 1.0, -1, -1), (300, 30.0, 64, -1), (300, 30.0, -1, 2), (300, 30.0, 64, 1.5), (5, 0.2, 64, 1), (1, 0, 8, -1),
])
def test_sampled_frame_count_is_what_the_sampler_lists(total, duration, num_frames, fps):
    """The count checked before the indices are listed equals the length of the list vLLM's sampler makes."""
    from vllm.multimodal.video_decoders import VideoSourceMetadata, VideoTargetMetadata

    source = VideoSourceMetadata(total_frames_num=total, original_fps=total / duration if duration else 0,
                                 duration=duration)
    target = VideoTargetMetadata(num_frames=num_frames, fps=fps, max_duration=300)
    assert sampled_frame_count(source, target) == len(PyAVVideoLoader.compute_frames_index_to_sample(source, target))


@pytest.mark.parametrize("num_frames,fps", SAMPLING_REQUESTS)
@pytest.mark.parametrize("video_name", VIDEO_SHAPES)
def test_frame_indices_and_pixels_match_opencv(videos, video_name, num_frames, fps):
    data = videos[video_name]
    frames, metadata = PyAVVideoLoader.load_bytes(data, num_frames, fps)
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
    metadata = PyAVVideoLoader.load_bytes(videos[video_name], num_frames=8)[1]
    expected = opencv_loader().load_bytes(videos[video_name], num_frames=8)[1]

    assert metadata.keys() == expected.keys()
    assert {k: type(v) for k, v in metadata.items()} == {
        k: type(v) for k, v in expected.items()
    }
    assert all(type(i) is int for i in metadata["frames_indices"])
    assert metadata["video_backend"] == "pyav"
    assert {k: v for k, v in metadata.items() if k != "video_backend"} == {
        k: v for k, v in expected.items() if k != "video_backend"
    }


def test_frames_are_rgb(videos):
    frames, _ = PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], 4)
    red_half = frames[:, 60:, :40].reshape(-1, 3).mean(axis=0)
    assert red_half[0] > 200 and red_half[2] < 50, red_half


def test_consecutive_frames_differ(videos):
    frames, _ = PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], -1)
    assert all((a != b).any() for a, b in zip(frames, frames[1:]))


def test_one_frame_mp4_decodes_to_one_frame(one_frame_mp4):
    frames, metadata = PyAVVideoLoader.load_bytes(one_frame_mp4, num_frames=32)
    assert frames.shape == (1, 120, 160, 3)
    assert metadata["frames_indices"] == [0]
    assert metadata["total_num_frames"] == 1


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_input_raises_value_error(videos, kind):
    data = broken_inputs(videos["40f_160x120_30fps"])[kind]
    with pytest.raises(ValueError, match="Could not decode video") as caught:
        PyAVVideoLoader.load_bytes(data, num_frames=32)
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
        "from vllm_stgridpool.video.loader import PyAVVideoLoader\n"
        "try:\n"
        "    PyAVVideoLoader.load_bytes(sys.stdin.buffer.read(), num_frames=8)\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=300)
    assert child.returncode == 0, f"the loader's process ended with {child.returncode}: {child.stderr[-2000:]!r}"
    assert b"ValueError: Could not decode video" in child.stdout, child.stdout


def test_accepts_every_opencv_keyword(videos):
    data = videos["40f_160x120_30fps"]
    plain = PyAVVideoLoader.load_bytes(data, num_frames=8)
    with_options = PyAVVideoLoader.load_bytes(
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
        PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)


def test_no_files_left_in_temp_dir(videos, one_frame_mp4, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    for data in [*videos.values(), one_frame_mp4]:
        PyAVVideoLoader.load_bytes(data, num_frames=8)
    for data in broken_inputs(videos["40f_160x120_30fps"]).values():
        with pytest.raises(ValueError):
            PyAVVideoLoader.load_bytes(data, num_frames=8)
    assert list(scratch.iterdir()) == []


def uncache_envs(monkeypatch):
    """Read env vars live even if an engine test froze ``vllm.envs`` already."""
    if envs._is_envs_cache_enabled():
        monkeypatch.setattr(envs, "__getattr__", envs.__getattr__.__wrapped__)


def test_video_media_io_selects_the_loader_by_video_backend(one_frame_mp4):
    video_io = VideoMediaIO(ImageMediaIO(), num_frames=8, video_backend=LOADER_NAME)
    assert isinstance(video_io.video_loader, PyAVVideoLoader)
    frames, metadata = video_io.load_bytes(one_frame_mp4).media
    assert frames.shape[0] == 1
    assert metadata["video_backend"] == LOADER_NAME


def test_env_var_selects_the_loader(videos, monkeypatch):
    monkeypatch.setenv("VLLM_VIDEO_LOADER_BACKEND", LOADER_NAME)
    uncache_envs(monkeypatch)
    assert envs.VLLM_VIDEO_LOADER_BACKEND == LOADER_NAME
    video_io = VideoMediaIO(ImageMediaIO(), num_frames=8)
    assert isinstance(video_io.video_loader, PyAVVideoLoader)
    frames, metadata = video_io.load_bytes(videos["40f_160x120_30fps"]).media
    assert frames.shape[0] == 8
    assert metadata["video_backend"] == LOADER_NAME


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def test_server_media_connector_uses_the_loader(videos, one_frame_mp4):
    """``MediaConnector`` is what the API server builds from --media-io-kwargs."""
    connector = MediaConnector(
        media_io_kwargs={"video": {"video_backend": LOADER_NAME, "num_frames": 8}}
    )
    frames, metadata = connector.fetch_video(data_url(one_frame_mp4)).media
    assert frames.shape[0] == 1 and metadata["video_backend"] == LOADER_NAME

    truncated = videos["40f_160x120_30fps"][:1000]
    # ValueError is what the server's error handler maps to HTTP 400.
    with pytest.raises(ValueError, match="Could not decode video"):
        connector.fetch_video(data_url(truncated))


@pytest.mark.parametrize(("frames", "width", "height"), [(1, 1, 1), (3, 7, 1000), (2, 4000, 16), (5, 16, 16)])
def test_extreme_frame_sizes_decode(frames, width, height):
    """decord mis-sizes some narrow widths (0.6.0 and decord2 3.4.0 alike); PyAV decodes them."""
    from vllm_stgridpool_testing.sample_videos import mp4_bytes

    decoded, metadata = PyAVVideoLoader.load_bytes(mp4_bytes(frames, width=width, height=height))
    assert decoded.shape == (frames, height, width, 3)
    assert decoded.dtype == np.uint8
    assert metadata["total_num_frames"] == frames


# --- decoders and the FFmpeg they link ---------------------------------------------------

LINKED_LIBAVCODEC = r"""
import ctypes, importlib, sys
module = importlib.import_module(sys.argv[1])
paths = {line.split()[-1] for line in open("/proc/self/maps") if "/libavcodec" in line}
for path in sorted(paths):
    version = ctypes.CDLL(path).avcodec_version()
    print(path, version >> 16, (version >> 8) & 0xFF, version & 0xFF)
"""


def linked_libavcodec(module: str) -> list[tuple[str, tuple[int, int, int]]]:
    """Every libavcodec mapped into a fresh process that imported only ``module``, with the
    version that library itself reports (``avcodec_version()``), whatever the package claims."""
    child = subprocess.run(
        [sys.executable, "-c", LINKED_LIBAVCODEC, module], capture_output=True, text=True, timeout=120, check=True
    )
    found = []
    for line in child.stdout.splitlines():
        path, *version = line.split()
        found.append((path, tuple(int(part) for part in version)))
    return found


# The loaders a server may pick: this plugin's (PyAV) and vLLM's opencv; decord stays installed for tools.
SERVER_DECODERS = ["av", "cv2", "decord"]


@pytest.mark.parametrize("module", SERVER_DECODERS)
def test_every_decoder_links_libavcodec_61_or_newer(module):
    """FFmpeg 7 (libavcodec 61) or newer: decord 0.6.0 brought FFmpeg 4.1 (libavcodec 58) of 2018."""
    linked = linked_libavcodec(module)
    assert linked, f"{module} maps no libavcodec"
    for path, version in linked:
        assert version >= (61, 0, 0), f"{module} links {path}, libavcodec {version}"


def test_pyav_reports_the_libavcodec_it_links():
    """In a fresh process: where decord was imported first (another test module), its FFmpeg's symbols
    come first in the process and PyAV reports those."""
    (_, version), = linked_libavcodec("av")
    reported = subprocess.run(
        [sys.executable, "-c", "import av; print(*av.library_versions['libavcodec'])"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()
    assert tuple(map(int, reported)) == version


# --- limits checked from the header ----------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(4096, 4096), (8192, 8192), (3840, 2176)])
def test_frames_over_max_video_pixels_are_refused_from_the_header(width, height):
    from vllm_stgridpool_testing.sample_videos import size_bomb_mp4

    data = size_bomb_mp4(2, width, height)
    with pytest.raises(ValueError, match=f"{width}x{height} \\({width * height:,} pixels\\).*max_video_pixels of 8,294,400"):
        PyAVVideoLoader.load_bytes(data, num_frames=64)


@pytest.mark.parametrize(("width", "height"), [(3840, 2160), (2160, 3840)])
def test_4k_uhd_is_admitted_both_ways(width, height):
    from vllm_stgridpool_testing.sample_videos import size_bomb_mp4

    frames, metadata = PyAVVideoLoader.load_bytes(size_bomb_mp4(2, width, height), num_frames=64)
    assert frames.shape == (2, height, width, 3)
    assert metadata["total_num_frames"] == 2


def test_decoded_bytes_over_max_video_decode_bytes_are_refused(videos, monkeypatch):
    data = videos["40f_160x120_30fps"]
    exact = 8 * 160 * 120 * 3
    monkeypatch.setenv("STGRIDPOOL_MAX_VIDEO_DECODE_BYTES", str(exact))
    assert PyAVVideoLoader.load_bytes(data, num_frames=8)[0].nbytes == exact
    with pytest.raises(ValueError, match=f"9 sampled video frames of 160x120 decode to {9 * 160 * 120 * 3:,} bytes.*"
                       f"max_video_decode_bytes of {exact:,}"):
        PyAVVideoLoader.load_bytes(data, num_frames=9)


def test_frames_larger_than_the_header_stop_decoding_at_the_first():
    """A stream that grows, in an MPEG-TS (a raw stream is no container: refused at the door)."""
    from tests.support.hostile_videos import remuxed
    from vllm_stgridpool_testing.sample_videos import growing_m4v

    growing = remuxed(growing_m4v((160, 120), (640, 480), frames_each=4), "m4v", "mpegts")
    with pytest.raises(ValueError, match="frame 4 decodes to 640x480, not the 160x120 its header declares"):
        PyAVVideoLoader.load_bytes(growing, num_frames=8)


def test_limits_are_not_request_options(monkeypatch):
    """A request's media_io_kwargs reach load_bytes as keywords: they must not lift the server's limits."""
    from vllm_stgridpool_testing.sample_videos import size_bomb_mp4

    with pytest.raises(ValueError, match="max_video_pixels"):
        PyAVVideoLoader.load_bytes(size_bomb_mp4(1, 4096, 4096), num_frames=1, max_video_pixels=10**9)


# --- the decode pool ---------------------------------------------------------------------------


def pool():
    from vllm_stgridpool.video.pipeline import shared_decode_pool

    return shared_decode_pool()


def budget():
    from vllm_stgridpool.video.limits import VideoLimits
    from vllm_stgridpool.video.pipeline import shared_budget

    return shared_budget(VideoLimits.from_env())


def test_frames_come_back_through_shared_memory_from_a_reused_worker(videos):
    import mmap

    frames, _ = PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)
    base = frames
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap), (type(base), base)
    workers = set(pool().worker_pids())
    for _ in range(3):
        PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)
    assert set(pool().worker_pids()) == workers


def test_a_full_budget_is_a_503_with_retry_after_at_half_the_deadline(videos, monkeypatch):
    import time

    from vllm.exceptions import GracefulHTTPError

    from vllm_stgridpool.video.admission import Deadline

    monkeypatch.setenv("STGRIDPOOL_VIDEO_DEADLINE_SECONDS", "2")
    held = budget().capacity - budget().in_flight
    budget().acquire(held, Deadline.starting_now(1))
    try:
        started = time.monotonic()
        with pytest.raises(GracefulHTTPError, match="video decode budget") as caught:
            PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)
        assert 0.9 < time.monotonic() - started < 2
    finally:
        budget().release(held)
    assert caught.value.http_status == 503 and caught.value.retry_after == 1
    assert PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)[0].shape[0] == 8


@pytest.mark.parametrize(("signal_name", "status"), [("SIGKILL", 503), ("SIGSEGV", 422)])
def test_a_worker_ended_mid_decode_fails_that_video_only(signal_name, status):
    """Killed (OOM killer, operator): 503, try again; crashed on the input: 422. Either way the next video decodes."""
    import os
    import signal
    import threading
    import time

    from vllm.exceptions import VLLMError

    from vllm_stgridpool_testing.sample_videos import mp4_bytes

    data = mp4_bytes(64, 1280, 720)
    outcome = {}

    def decode():
        try:
            outcome["frames"] = PyAVVideoLoader.load_bytes(data, num_frames=64)[0]
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=decode)
    thread.start()
    deadline = time.monotonic() + 60
    while budget().in_flight == 0 and time.monotonic() < deadline:  # frames reserved: decoding
        time.sleep(0.005)
    busy = [pid for pid in pool().worker_pids() if worker_is_decoding(pid)] or pool().worker_pids()
    os.kill(busy[0], getattr(signal, signal_name))
    thread.join(120)
    error = outcome.get("error")
    assert isinstance(error, VLLMError), outcome
    assert f"ended with {signal_name}" in str(error) and "video decoder (PyAV" in str(error)
    assert getattr(error, "http_status", 422) == status
    assert busy[0] not in pool().worker_pids()
    assert PyAVVideoLoader.load_bytes(mp4_bytes(2), num_frames=8)[0].shape[0] == 2


def worker_is_decoding(pid: int) -> bool:
    """Whether the worker holds a frames memfd mapping (only while it decodes)."""
    try:
        return "stgridpool-frames" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_a_worker_that_died_idle_costs_no_request(videos):
    import os
    import signal
    import time

    PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)
    idle = pool().worker_pids()
    for pid in idle:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    frames, _ = PyAVVideoLoader.load_bytes(videos["40f_160x120_30fps"], num_frames=8)
    assert frames.shape[0] == 8
    assert not set(idle) & set(pool().worker_pids())


def h264_with_b_frames(num_frames: int, width: int = 160, height: int = 120) -> bytes:
    """H.264 with B-frames and a key frame every 30 frames: decode order differs from display order."""
    import io

    import av

    from vllm_stgridpool_testing.sample_videos import synthetic_frame

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"bf": "3", "g": "30", "preset": "medium", "crf": "18"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.mark.parametrize("num_frames", [7, 16, 64])
def test_seeking_across_key_frames_and_b_frames_returns_opencvs_frames(num_frames):
    """Sampling 7 or 16 of 300 frames seeks between key frames; 64 decodes on through most of them."""
    data = h264_with_b_frames(300)
    frames, metadata = PyAVVideoLoader.load_bytes(data, num_frames=num_frames)
    expected, expected_metadata = opencv_loader().load_bytes(data, num_frames=num_frames)
    assert metadata["frames_indices"] == expected_metadata["frames_indices"]
    assert frames.shape == expected.shape
    for slot in range(len(frames)):  # each frame its own: a neighbour differs by far more than 1
        assert np.abs(frames[slot].astype(int) - expected[slot].astype(int)).mean() < 1.0, slot


def test_frames_hold_the_budget_until_released_and_are_never_shared(videos):
    """Each video gets fresh sealed memory: a later video never writes into frames someone still holds,
    and their bytes stay in the budget until the last view of them is gone."""
    import gc

    gc.collect()
    idle = budget().in_flight
    data = videos["40f_160x120_30fps"]
    first, _ = PyAVVideoLoader.load_bytes(data, num_frames=8)
    kept = first[2:5]  # a view alone keeps the frames' memory
    expected = kept.copy()
    del first
    gc.collect()
    assert budget().in_flight == idle + 8 * 160 * 120 * 3
    second, _ = PyAVVideoLoader.load_bytes(videos["150f_128x96_25fps"], num_frames=8)
    np.testing.assert_array_equal(kept, expected)
    del second, kept
    gc.collect()
    assert budget().in_flight == idle


def test_zero_workers_decode_in_process_under_the_same_deadline(monkeypatch):
    """300,000 frames behind one key frame: 1.3 s to index, 3 s to sample; a deadline of 2 s stops the decoding
    at its next frame (HTTP 422). (Opening is not interrupted: the packet cap bounds it.)"""
    import re

    from vllm.exceptions import VLLMUnprocessableEntityError

    from vllm_stgridpool_testing.sample_videos import time_bomb_mp4

    bomb = time_bomb_mp4(300_000)
    monkeypatch.setenv("STGRIDPOOL_VIDEO_DECODE_WORKERS", "0")
    monkeypatch.setenv("STGRIDPOOL_VIDEO_DEADLINE_SECONDS", "2")
    with pytest.raises(VLLMUnprocessableEntityError, match="deadline of 2 s .* it stopped after") as late:
        PyAVVideoLoader.load_bytes(bomb, num_frames=64)
    # Decoding stopped at the deadline, not after the whole sample: it reports at most the deadline plus one
    # frame's decoding. (On a loaded machine the opening alone can pass the deadline: then that is reported.)
    step, worked = re.search(r"(opening|decoding) it stopped after ([0-9.]+) s", str(late.value)).groups()
    if step == "decoding":
        assert float(worked) < 2 + 1
    assert pool().worker_pids() == []
    assert budget().in_flight == 0
