"""Hold ``video/jpeg`` data URLs to the plugin's video limits before PIL decodes a frame.

vLLM 0.32 (and 0.33) reads ``data:video/jpeg;base64,<frame>,<frame>,...``
itself (``VideoMediaIO.load_base64``): it decodes every frame (up to
``num_frames``) with PIL in the API server, bounded only by
``VLLM_MAX_IMAGE_PIXELS`` (179M pixels, 537 MB a frame), never by the
plugin's loader. Eight 8000x8000 frames, 10 MB of base64, cost the server
3.6 GB. This checks every frame's JPEG header first (its SOF marker:
``video.container_check.jpeg_frame_size``) against the plugin's limits,
exactly as an uploaded video's header is checked: ``max_video_pixels`` per
frame, ``max_video_decode_bytes`` and the decode budget for the frames
together, and one frame size for all (vLLM stacks them). Anything else, or
a frame that is not a JPEG, is HTTP 400 naming the frame and the limit, and
nothing is decoded. Frames within the limits are decoded by vLLM as before.

It wraps the media connector registered as ``http`` (the plugin's P5
connector, or vLLM's own) in a subclass whose ``_load_data_url`` checks
``video/jpeg`` data before handing it on; every other URL is untouched.
Ledger entry: patches/README.md, P12.
"""

from __future__ import annotations

import binascii
import io

import pybase64

from vllm_stgridpool.compat import Feature, Guard

CONNECTOR_NAME = "http"
_CONNECTOR = "vllm.multimodal.media.connector"
MEDIA_TYPE = "video/jpeg"

GUARD = Guard(
    "P12",
    "video/jpeg frames checked against the video limits before they are decoded",
    (
        Feature(_CONNECTOR, "MEDIA_CONNECTOR_REGISTRY.register"),
        Feature(_CONNECTOR, "MediaConnector._load_data_url", ("url", "media_io")),
        Feature("vllm.multimodal.media.video", "VideoMediaIO.load_base64", ("media_type", "data")),
    ),
)


def apply(vllm_version: str) -> bool:
    """Wrap the ``http`` connector where :data:`GUARD` holds; returns whether it did (once per process)."""
    if not GUARD.applies(vllm_version):
        return False
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY

    base = MEDIA_CONNECTOR_REGISTRY.name2class[CONNECTOR_NAME]
    if not getattr(base, "_stgridpool_jpeg_frames", False):
        MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(_checking_connector(base))
    return True


def check_jpeg_frames(data: str, num_frames: int, limits) -> None:
    """Refuse ``video/jpeg`` base64 frames (split as vLLM splits them) over ``limits``, from their headers."""
    from vllm_stgridpool.video.container_check import ContainerRefused

    parts = data.split(",", num_frames)[:num_frames] if num_frames > 0 else data.split(",")
    size = None
    for index, part in enumerate(parts):
        try:
            frame = pybase64.b64decode(part, validate=True)
            width, height = _agreed_frame_size(frame)
        except (binascii.Error, ValueError) as error:
            reason = str(error) if isinstance(error, ContainerRefused) else "is not valid base64"
            raise ValueError(f"Could not decode video: frame {index} of the {MEDIA_TYPE} data {reason}") from None
        if size is None:
            size = (width, height)
            limits.check_header(width, height, len(parts), len(data))  # no picture: refused
            limits.check_frame_size(width, height)
        elif (width, height) != size:
            raise ValueError(
                f"Could not decode video: frame {index} of the {MEDIA_TYPE} data is {width}x{height}, "
                f"frame 0 is {size[0]}x{size[1]}; every frame of a video has one size"
            )
    if size is not None:
        limits.check_decoded_size(len(parts), *size)


def _agreed_frame_size(frame: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG frame as the marker walk reads it and as PIL's own header parse (the size PIL
    decodes at) reads it: a frame whose headers can be read two ways (a small frame marker hidden where one
    parser jumps and the other scans) is refused rather than trusted either way."""
    from PIL import Image

    from vllm_stgridpool.video.container_check import ContainerRefused, jpeg_frame_size

    width, height = jpeg_frame_size(frame)
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG"]) as image:  # headers only: nothing is decoded
            decoded = image.size
    except Exception as error:  # not a JPEG PIL reads, or over PIL's own pixel limit
        raise ContainerRefused(f"is not a JPEG image PIL can read ({type(error).__name__}: {error})") from None
    if decoded != (width, height):
        raise ContainerRefused(
            f"has a frame marker of {width}x{height} but PIL would decode it at {decoded[0]}x{decoded[1]}"
        )
    return width, height


def _checking_connector(base):
    from vllm.multimodal.media.video import VideoMediaIO

    from vllm_stgridpool.video.limits import VideoLimits

    class JpegFramesCheckedConnector(base):
        """``base``, with ``video/jpeg`` data URLs held to the plugin's video limits before they are decoded."""

        _stgridpool_jpeg_frames = True

        def _load_data_url(self, url, media_io, *args, **kwargs):
            if isinstance(media_io, VideoMediaIO):
                spec, _, data = url[5:].partition(",")
                media_type, _, encoding = spec.rpartition(";")  # as vLLM reads the URL
                if encoding == "base64" and media_type.partition(";")[0].lower() == MEDIA_TYPE:
                    check_jpeg_frames(data, getattr(media_io, "num_frames", -1), VideoLimits.from_env())
            return super()._load_data_url(url, media_io, *args, **kwargs)

    JpegFramesCheckedConnector.__qualname__ = f"JpegFramesChecked{base.__name__}"
    return JpegFramesCheckedConnector
