"""What is inside an upload: only video containers reach FFmpeg, with counts their bytes can hold, turned upright.

Every hostile file is built here from bytes a real encoder wrote
(``tests/support/hostile_videos.py``). The decoder is the worker's code
(``open_video``/``decode_frames``) run in this process; the reference frames
come from PyAV decoding the same bytes in order, and from opencv.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from tests.support import hostile_videos as hostile
from vllm_stgridpool.video import container_check
from vllm_stgridpool.video.container_check import ContainerRefused
from vllm_stgridpool.video.decoder import UndecodableVideo, decode_frames, open_video
from vllm_stgridpool.video.limits import DEFAULT_MAX_VIDEO_PACKETS, VideoLimits, VideoTooLarge
from vllm_stgridpool_testing.sample_videos import mp4_bytes

MAX_PIXELS = 3840 * 2160
ACCEPTED = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS, MPEG-PS, FLV, Ogg"


@pytest.fixture(scope="module")
def opencv_mp4() -> bytes:
    """10 frames of 160x120 in an mp4 OpenCV wrote (moov after mdat)."""
    return mp4_bytes(10)


def decode(tmp_path, data: bytes, indices=None, max_packets: int = DEFAULT_MAX_VIDEO_PACKETS):
    """``(header, frames)`` through the worker's code, from a file as the server writes it."""
    path = tmp_path / "upload"
    path.write_bytes(data)
    video = open_video(str(path), MAX_PIXELS, max_packets)
    try:
        header = video.header
        indices = list(range(header.total_frames)) if indices is None else indices
        frames = np.zeros((len(indices), header.height, header.width, 3), np.uint8)
        decode_frames(video, indices, frames)
    finally:
        video.close()
    return header, frames


def frames_in_order(tmp_path, data: bytes) -> np.ndarray:
    """Every frame, decoded by PyAV from the start (no seeking, no rotation): the reference."""
    import av

    path = tmp_path / "reference"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def opencv_frames(tmp_path, data: bytes) -> np.ndarray:
    """Every frame as opencv reads it (it turns frames as the display matrix says), in RGB."""
    path = tmp_path / "opencv.mp4"
    path.write_bytes(data)
    capture = cv2.VideoCapture(str(path))
    frames = [frame[:, :, ::-1] for _, frame in iter(capture.read, (False, None))]  # read() ends with (False, None)
    capture.release()
    return np.stack(frames)


# --- only video containers --------------------------------------------------------------------

REFUSED = {
    "ffconcat": (hostile.ffconcat_script("secretclip.mp4"), "an ffconcat script"),
    "ffconcat_subfolder": (hostile.ffconcat_script("sub/x.mp4"), "an ffconcat script"),
    "hls": (hostile.hls_playlist("secretclip.ts"), "an HLS playlist"),
    "png_of_an_image_sequence": (hostile.png_image(), "a PNG image"),
    "zero_size_animated_webp": (hostile.zero_size_animated_webp(), "a WebP image"),
    "unknown_bytes": (b"\x13\x37" * 500, "not a format it recognises"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_is_not_a_video_container_is_refused_by_name(tmp_path, opencv_mp4, name):
    """Files a playlist could name are planted next to the upload: none is read, and the message names the
    format and what is accepted, never a path."""
    data, what = REFUSED[name]
    (tmp_path / "secretclip.mp4").write_bytes(opencv_mp4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.mp4").write_bytes(opencv_mp4)
    with pytest.raises(UndecodableVideo) as refused:
        decode(tmp_path, data)
    message = str(refused.value)
    assert message.startswith(f"Could not decode video: the upload is {what}")
    assert message.endswith(f", not a video container this server accepts ({ACCEPTED})")
    assert str(tmp_path) not in message


@pytest.mark.parametrize("container", sorted(hostile.CONTAINERS))
def test_every_accepted_container_decodes_to_the_frames_pyav_reads_in_order(tmp_path, container):
    data = hostile.clip(container, num_frames=12, gop=4)
    assert container_check.identify(data) in container_check.DEMUXERS
    reference = frames_in_order(tmp_path, data)
    wanted = [11, 0, 5, 6, 6, 2]  # out of order, repeated, across key frames
    header, frames = decode(tmp_path, data, wanted)
    assert (header.width, header.height, header.total_frames, header.rotation) == (64, 48, 12, 0)
    np.testing.assert_array_equal(frames, reference[wanted])


def test_a_demuxer_named_for_the_bytes_cannot_be_talked_into_another(tmp_path, opencv_mp4):
    """An ffconcat script behind an mp4's first box is still refused: the mov demuxer does not read it."""
    data = hostile._box(b"ftyp", b"isom" + bytes(4)) + hostile.ffconcat_script("secretclip.mp4")
    (tmp_path / "secretclip.mp4").write_bytes(opencv_mp4)
    assert container_check.identify(data) == "mov"
    with pytest.raises(UndecodableVideo, match="^Could not decode video") as refused:
        decode(tmp_path, data)
    assert str(tmp_path) not in str(refused.value)


# --- counts the bytes cannot hold ----------------------------------------------------------------


@pytest.mark.parametrize("samples", [20_000_000, 50_000_000, 178_000_000])
def test_mp4_index_bomb_is_refused_before_ffmpeg_reads_it(tmp_path, opencv_mp4, samples):
    bomb = hostile.index_bomb_mp4(opencv_mp4, samples)
    assert len(bomb) < 4096
    with pytest.raises(UndecodableVideo) as refused:
        decode(tmp_path, bomb)
    assert str(refused.value) == (
        f"Could not decode video: the MP4/MOV container declares {samples:,} samples in one track, "
        f"more than its {len(bomb):,} bytes can hold"
    )


def test_mp4_fragment_bomb_is_refused(tmp_path):
    bomb = hostile.fragment_bomb_mp4(hostile.clip("fragmented_mp4"), 20_000_000)
    with pytest.raises(UndecodableVideo, match=r"declares 20,000,000 samples in a fragment, more than its [\d,]+ bytes"):
        decode(tmp_path, bomb)


def test_avi_frame_count_lie_is_refused(tmp_path):
    lie = hostile.lying_avi(hostile.clip("avi"), 20_000_000)
    with pytest.raises(UndecodableVideo, match=r"the AVI container declares 20,000,000 video frames, more than its"):
        decode(tmp_path, lie)


def test_avi_frame_count_within_its_bytes_gives_way_to_the_frames_it_holds(tmp_path):
    """600 frames fit 6 KB of chunk headers, so the header is let through; the video has the 12 it holds."""
    data = hostile.lying_avi(hostile.clip("avi"), 600)
    header, frames = decode(tmp_path, data)
    assert header.total_frames == 12
    np.testing.assert_array_equal(frames, frames_in_order(tmp_path, data))


def test_flv_keyframe_index_bomb_is_refused(tmp_path):
    bomb = hostile.flv_keyframes_bomb(hostile.clip("flv"), 2**28 - 1)
    with pytest.raises(UndecodableVideo, match=r"the FLV container declares 268,435,455 keyframe index entries"):
        decode(tmp_path, bomb)


def test_mp4_over_max_video_packets_is_refused_and_a_higher_cap_admits_it(opencv_mp4):
    """1.5M one-byte samples in 1.5 MB fit the bytes: only the cap refuses them."""
    bomb = hostile.index_bomb_mp4(opencv_mp4, 1_500_000, keep_mdat=1_500_000)
    with pytest.raises(ContainerRefused, match="1,500,000 samples in one track, more than the server's "
                       r"max_video_packets of 1,000,000 \(STGRIDPOOL_MAX_VIDEO_PACKETS\)"):
        container_check.inspect(bomb, 1_000_000)
    assert container_check.inspect(bomb, 2_000_000) == "mov"


def test_refusing_a_bomb_costs_no_memory():
    """In a fresh process: reading the 178M-sample mp4's tables and refusing it raise its peak RSS by < 5 MiB."""
    script = (
        "import resource\n"
        "from vllm_stgridpool.video import container_check\n"
        "from tests.support.hostile_videos import index_bomb_mp4\n"
        "from vllm_stgridpool_testing.sample_videos import mp4_bytes\n"
        "bomb = index_bomb_mp4(mp4_bytes(10), 178_000_000)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    container_check.inspect(bomb, 1_000_000)\nexcept container_check.ContainerRefused:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout.split()[-1]) < 5 * 1024  # KiB


# --- headers that lie ---------------------------------------------------------------------------


def test_a_stream_without_a_frame_size_is_refused(tmp_path, opencv_mp4):
    with pytest.raises(UndecodableVideo, match="its video stream declares a frame size of 0x0"):
        decode(tmp_path, hostile.no_picture_mp4(opencv_mp4))


@pytest.mark.parametrize(
    "width, height, frames, upload, words",
    [
        (0, 0, 10, 10_000, "0x0 hold no picture"),
        (-4, 8, 10, 10_000, "-4x8 hold no picture"),
        (64, 48, 20_000_000, 2_600, "declares 20,000,000 frames, which its 2,600 bytes cannot hold"),
        (64, 48, 2_000_000, 10**9, "over the server's max_video_packets of 1,000,000"),
        (64, 48, 0, 10_000, "declares 0 frames"),
    ],
)
def test_the_api_server_refuses_a_header_that_cannot_be_true(width, height, frames, upload, words):
    limits = VideoLimits(max_video_pixels=MAX_PIXELS, max_video_decode_bytes=10**9, decode_budget_bytes=10**9)
    with pytest.raises(VideoTooLarge, match=words):
        limits.check_header(width, height, frames, upload)


# --- rotation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_mp4_frames_are_upright_like_opencvs(tmp_path, opencv_mp4, degrees):
    """A phone's display matrix (written into the track header here): frames turned like opencv turns them,
    and like turning the unrotated frames ``degrees`` counter-clockwise."""
    rotated = hostile.rotated_mp4(opencv_mp4, degrees)
    header, frames = decode(tmp_path, rotated)
    assert header.rotation == degrees
    assert (header.width, header.height) == ((120, 160) if degrees % 180 else (160, 120))
    np.testing.assert_array_equal(frames, opencv_frames(tmp_path, rotated))
    upright = np.rot90(frames_in_order(tmp_path, opencv_mp4), degrees // 90, axes=(1, 2))
    np.testing.assert_array_equal(frames, upright)


@pytest.mark.parametrize("container", ["mkv", "mov"])
def test_rotation_other_muxers_write_is_honoured(tmp_path, container):
    data = hostile.clip(container, rotation=90)
    header, frames = decode(tmp_path, data)
    assert (header.width, header.height, header.rotation) == (48, 64, 90)
    np.testing.assert_array_equal(frames, np.rot90(frames_in_order(tmp_path, data), 1, axes=(1, 2)))


# --- video/jpeg data URLs (P12) ------------------------------------------------------------------


def jpeg(width: int, height: int, shade: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 120, 30)).save(buffer, format="JPEG", quality=10)
    return buffer.getvalue()


def jpeg_url(*frames: bytes) -> str:
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(frame).decode() for frame in frames)


@pytest.fixture
def connectors():
    """(vLLM's own connector, the one P12 makes of it), each with a default of ``num_frames`` 8."""
    from vllm.multimodal.media import MediaConnector

    from vllm_stgridpool.compat.jpeg_frames import _checking_connector

    options = {"media_io_kwargs": {"video": {"num_frames": 8}}}
    return MediaConnector(**options), _checking_connector(MediaConnector)(**options)


def test_jpeg_frames_within_the_limits_decode_as_vllm_decodes_them(connectors):
    stock, checked = connectors
    url = jpeg_url(*(jpeg(64, 48, shade) for shade in (10, 90, 170)))
    expected, expected_metadata = stock.fetch_video(url).media
    frames, metadata = checked.fetch_video(url).media
    np.testing.assert_array_equal(frames, expected)
    assert frames.shape == (3, 48, 64, 3) and metadata == expected_metadata


@pytest.mark.parametrize(
    "frames, words",
    [
        ([jpeg(8000, 8000)] * 8, r"video frames of 8000x8000 \(64,000,000 pixels\) are over the server's "
                                 r"max_video_pixels of 8,294,400"),
        ([jpeg(64, 48), jpeg(48, 64)], "frame 1 of the video/jpeg data is 48x64, frame 0 is 64x48"),
        ([jpeg(64, 48), hostile.png_image()], "frame 1 of the video/jpeg data is not a JPEG image"),
        ([b"\xff\xd8\xff\xe0\x00\x04JF\xff\xda\x00\x02" + bytes(64)],
         "frame 0 of the video/jpeg data is a JPEG image without a frame header before its image data"),
    ],
)
def test_jpeg_frames_over_a_limit_are_refused_from_their_headers(connectors, frames, words):
    _, checked = connectors
    started = time.monotonic()
    with pytest.raises(ValueError, match=words):
        checked.fetch_video(jpeg_url(*frames))
    assert time.monotonic() - started < 2


def test_jpeg_frames_count_against_max_video_decode_bytes(connectors, monkeypatch):
    _, checked = connectors
    monkeypatch.setenv("STGRIDPOOL_MAX_VIDEO_DECODE_BYTES", str(3 * 64 * 48 * 3))
    checked.fetch_video(jpeg_url(*[jpeg(64, 48)] * 3))
    with pytest.raises(ValueError, match=r"4 sampled video frames of 64x48 decode to 36,864 bytes of RGB, over the "
                                         r"server's max_video_decode_bytes of 27,648"):
        checked.fetch_video(jpeg_url(*[jpeg(64, 48)] * 4))


def test_jpeg_frames_past_num_frames_are_ignored_as_vllm_ignores_them(connectors):
    """vLLM decodes the first ``num_frames`` (8) frames only: a ninth that is not a JPEG changes nothing."""
    _, checked = connectors
    frames, _ = checked.fetch_video(jpeg_url(*[jpeg(64, 48)] * 8, hostile.png_image())).media
    assert frames.shape == (8, 48, 64, 3)


# --- fuzz ------------------------------------------------------------------------------------------


def test_damaged_copies_of_every_container_decode_or_are_refused_cleanly():
    """600 damaged clips (60 per container: header counts overwritten, bytes flipped, cut short) in a process
    under a 2 GiB address-space limit: each decodes or is the decoder's own 400, none raises anything else,
    takes a second, or grows the process by 256 MiB."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.container_fuzz", "60", "7"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert set(report) == set(hostile.CONTAINERS)
    for container, outcome in report.items():
        assert outcome["other"] == [], (container, outcome["other"])
        assert outcome["decoded"] + outcome["refused"] == 60
        assert outcome["slowest_seconds"] < 1.0, (container, outcome)
        assert outcome["peak_growth_kib"] < 256 * 1024, (container, outcome)


# --- counts hidden where FFmpeg still reads them -----------------------------------------------------

FTYP = hostile._box(b"ftyp", b"isom" + bytes(4) + b"isom")


def nested(kind: bytes, depth: int, leaf: bytes = b"") -> bytes:
    for _ in range(depth):
        leaf = hostile._box(kind, leaf)
    return leaf


@pytest.mark.parametrize("data", [
    FTYP + hostile._box(b"moov", nested(b"udta", 2000)),
    FTYP + hostile._box(b"moov", hostile._box(b"trak", nested(b"mdia", 2000))),
    FTYP + hostile._box(b"moov", hostile._box(b"trak", nested(b"mdia", 950, hostile._box(b"free", b"") * 100_000))),
], ids=["udta", "mdia", "mdia_with_100k_leaves"])
def test_boxes_nested_past_the_limit_are_refused(data):
    with pytest.raises(ContainerRefused, match=f"nests boxes deeper than {container_check.MAX_BOX_DEPTH} levels"):
        container_check.inspect(data, DEFAULT_MAX_VIDEO_PACKETS)


def test_whatever_breaks_the_reader_is_a_refusal(monkeypatch):
    def broken(view, max_packets):
        raise IndexError("a bug")

    monkeypatch.setitem(container_check._DECLARED_COUNTS, "mov", broken)
    with pytest.raises(ContainerRefused, match=r"the MP4/MOV container could not be read \(IndexError\)"):
        container_check.inspect(FTYP, DEFAULT_MAX_VIDEO_PACKETS)


def test_a_hoov_is_read_as_the_moov_it_stands_for(opencv_mp4):
    bomb = hostile.index_bomb_mp4(opencv_mp4, 20_000_000).replace(b"moov", b"hoov", 1)
    with pytest.raises(ContainerRefused, match="declares 20,000,000 samples in one track"):
        container_check.inspect(bomb, DEFAULT_MAX_VIDEO_PACKETS)
    compressed = hostile._box(b"cmov", hostile._box(b"dcom", b"zlib"))
    with pytest.raises(ContainerRefused, match=r"has a compressed header \(cmov\)"):
        container_check.inspect(FTYP + hostile._box(b"hoov", compressed), DEFAULT_MAX_VIDEO_PACKETS)


def inserted(data: bytes, parent: bytes, box: bytes) -> bytes:
    """``data`` with ``box`` added at the end of its first ``parent`` box (every enclosing box grown to fit)."""
    _, offset, _, size = next(found for found in hostile.mp4_boxes(data) if found[0][-1] == parent)
    out = bytearray(data)
    out[offset + size : offset + size] = box
    for _, outer, _, outer_size in hostile.mp4_boxes(data):
        if outer <= offset and outer + outer_size >= offset + size:
            struct.pack_into(">I", out, outer, outer_size + len(box))
    return bytes(out)


@pytest.mark.parametrize("parent, wrapper", [(b"minf", b"dinf"), (b"trak", b"edts"), (b"trak", b"udta"),
                                             (b"stbl", None)])
def test_a_sample_table_anywhere_ffmpeg_reads_it_is_checked(opencv_mp4, parent, wrapper):
    """A 12-sample track whose chunk table declares 20M samples, and a ``stsz`` of 20M one-byte samples
    where FFmpeg's mov reader still reads it (it reads each box by its type, wherever it is): in place of
    the real one, inside another box, or after the real one (FFmpeg keeps the last)."""
    chunks = hostile._full_box(b"stsc", struct.pack(">IIII", 1, 1, 20_000_000, 1))
    data = hostile._rebuild(hostile.index_bomb_mp4(opencv_mp4, 12), {
        b"stsc": lambda box: chunks, **({b"stsz": lambda box: None} if wrapper else {})})
    table = hostile._full_box(b"stsz", struct.pack(">II", 1, 20_000_000))
    data = inserted(data, parent, hostile._box(wrapper, table) if wrapper else table)
    with pytest.raises(ContainerRefused, match=r"declares 20,000,000 samples in one track, more than its"):
        container_check.inspect(data, DEFAULT_MAX_VIDEO_PACKETS)


@pytest.mark.parametrize("kind", [b"stco", b"stss", b"ctts", b"stsc", b"sbgp"])
def test_every_table_count_is_checked_against_the_bytes(opencv_mp4, kind):
    count = struct.pack(">I", 50_000_000)
    table = hostile._full_box(kind, b"roll" + count if kind == b"sbgp" else count)
    with pytest.raises(ContainerRefused, match=f"declares 50,000,000 entries in a {kind.decode()} table, more than"):
        container_check.inspect(inserted(opencv_mp4, b"stbl", table), DEFAULT_MAX_VIDEO_PACKETS)


def test_a_fragment_hidden_in_a_box_ffmpeg_reads_is_checked():
    bomb = hostile.fragment_bomb_mp4(hostile.clip("fragmented_mp4"), 20_000_000)
    _, offset, _, size = next(box for box in hostile.mp4_boxes(bomb) if box[0][-1] == b"trun")
    hidden = bytearray(bomb)
    hidden[offset:offset] = struct.pack(">I4s", size + 8, b"dinf")
    for _, outer, _, outer_size in hostile.mp4_boxes(bomb):
        if outer < offset and outer + outer_size >= offset + size:
            struct.pack_into(">I", hidden, outer, outer_size + 8)
    with pytest.raises(ContainerRefused, match="declares 20,000,000 samples in a fragment"):
        container_check.inspect(bytes(hidden), DEFAULT_MAX_VIDEO_PACKETS)


def test_flv_keyframe_arrays_with_nul_padded_names_are_checked():
    """FFmpeg reads an AMF name by its length and compares it as a C string: ``times\\0`` is ``times``."""
    bomb = hostile.flv_keyframes_bomb(hostile.clip("flv"), 200_000_000)
    padded = bomb.replace(b"\x00\x05times\x0a", b"\x00\x07times\x00\x00\x0a")
    padded = padded.replace(b"\x00\x0dfilepositions\x0a", b"\x00\x0efilepositions\x00\x0a")
    assert padded != bomb
    with pytest.raises(ContainerRefused, match="the FLV container declares 200,000,000 keyframe index entries"):
        container_check.inspect(padded, DEFAULT_MAX_VIDEO_PACKETS)


def test_a_jpeg_frame_header_hidden_behind_an_escaped_byte_is_not_the_size(connectors):
    """``FF 00`` is no marker to PIL or libjpeg: a small frame header after it, inside an APP1 segment, is
    skipped with that segment, and the real 5000x5000 frame is the size."""
    small = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app1 = b"\xff\xe1" + struct.pack(">H", 4 + len(small)) + b"\x00\x00" + small
    real = jpeg(5000, 5000)
    crafted = b"\xff\xd8\xff\x00" + struct.pack(">H", 8) + app1 + real[2:]
    from PIL import Image

    assert Image.open(io.BytesIO(crafted)).size == (5000, 5000)
    assert container_check.jpeg_frame_size(crafted) == (5000, 5000)
    _, checked = connectors
    with pytest.raises(ValueError, match="5000x5000"):
        checked.fetch_video(jpeg_url(*[crafted] * 8))


def test_a_jpeg_with_two_frame_headers_is_refused():
    real = jpeg(64, 48)
    second = b"\xff\xc0\x00\x11\x08\x13\x88\x13\x88\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    with pytest.raises(ContainerRefused, match=r"2 frame headers \(64x48, 5000x5000\)"):
        container_check.jpeg_frame_size(real.replace(b"\xff\xda", second + b"\xff\xda", 1))
