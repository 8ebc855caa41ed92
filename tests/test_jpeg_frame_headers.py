"""P12 reads a ``video/jpeg`` frame's size twice, by its own marker walk and by PIL's header parse (the size
PIL decodes at), and refuses a frame the two read differently: a small frame marker hidden where one parser
jumps and the other scans must not let a large frame through."""

import base64
import io
import struct

import pytest
from PIL import Image

from vllm_stgridpool.compat.jpeg_frames import check_jpeg_frames
from vllm_stgridpool.video.limits import VideoLimits

LIMITS = VideoLimits(max_video_pixels=64 * 64, max_video_decode_bytes=10**9, decode_budget_bytes=10**9)


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(out, format="JPEG", quality=50)
    return out.getvalue()


def hidden_marker_frame(real: bytes, width: int, height: int) -> bytes:
    """``real`` behind ``FF 00`` + two bytes that read as a segment length, then an APP1 segment whose payload
    holds a baseline frame marker of width x height where a parser that took ``FF 00`` for a marker lands."""
    small_sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes(9)
    app_payload = b"\0\0" + small_sof
    return (b"\xff\xd8" + b"\xff\x00" + struct.pack(">H", 8) + b"\xff\xe1"
            + struct.pack(">H", 2 + len(app_payload)) + app_payload + real[2:])


def data(*frames: bytes) -> str:
    return ",".join(base64.b64encode(frame).decode() for frame in frames)


def test_pil_decodes_the_crafted_frame_at_its_real_size():
    crafted = hidden_marker_frame(jpeg(640, 480), 16, 16)
    with Image.open(io.BytesIO(crafted)) as image:
        image.load()
        assert image.size == (640, 480)


def test_a_frame_marker_hidden_from_pil_is_refused():
    crafted = hidden_marker_frame(jpeg(640, 480), 16, 16)
    with pytest.raises(ValueError, match="640x480"):  # read at its real size, over max_video_pixels
        check_jpeg_frames(data(crafted, crafted), 2, LIMITS)


def test_frames_whose_headers_agree_pass():
    frame = jpeg(48, 32)
    check_jpeg_frames(data(frame, frame, frame), 3, LIMITS)


def test_pil_refuses_what_a_fooled_marker_walk_would_pass(monkeypatch):
    """The two reads are independent: were the marker walk fooled into a small size, PIL's parse still
    refuses the frame, naming the size it would decode at."""
    from vllm_stgridpool.video import container_check

    monkeypatch.setattr(container_check, "jpeg_frame_size", lambda frame: (16, 16))
    with pytest.raises(ValueError, match="PIL would decode it at 640x480"):
        check_jpeg_frames(data(jpeg(640, 480)), 1, LIMITS)


def test_a_truncated_frame_is_refused_naming_it():
    frame = jpeg(48, 32)
    with pytest.raises(ValueError, match="frame 1 of the video/jpeg data"):
        check_jpeg_frames(data(frame, frame[:40]), 2, LIMITS)
