"""The plugin's video loader for vLLM's video loader registry: limits first, decoding in worker processes.

vLLM decodes uploads inside its API server. This loader, registered as
``pyav`` (unless another loader has that name: it never replaces one),
makes that safe for untrusted videos:

* the container's header is read first, and a video over the server's
  limits (``video_limits``) is refused with HTTP 400 before any frame is
  decoded;
* frames are decoded with PyAV (FFmpeg 8; ``video_decoder``) in a pool of
  worker processes (``decode_pool``): a decoder crash fails one request,
  and decoding in flight stays under a memory budget (HTTP 503 when it
  stays full);
* the upload is read from a temporary file, so the demuxer's seeks go
  through FFmpeg's own file I/O (decord's in-memory reader once copied
  from past its buffer on an mp4 whose offsets point past the end).

vLLM 0.32's own ``opencv`` loader returns no frame for a valid one-frame
mp4; this one reads it. Select it with ``VLLM_VIDEO_LOADER_BACKEND=pyav``
or ``--media-io-kwargs '{"video": {"video_backend": "pyav"}}'``; with
ST-GridPool active on 0.32 it is the default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import numpy.typing as npt

from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoBackend, VideoLoader
from vllm.multimodal.video_decoders import (
    VideoSourceMetadata,
    VideoTargetMetadata,
    check_frame_pixel_limit,
)
from vllm_stgridpool import envs
from vllm_stgridpool.video.admission import CURRENT_MEMBER, Deadline, DeadlinePassed, DecoderBusy
from vllm_stgridpool.video.decode_pool import DecoderDied, WorkerFailure, WorkerLimitHit, WorkerMisbehaved
from vllm_stgridpool.video.pipeline import decode_video, shared_decode_pool
from vllm_stgridpool.video import container_check
from vllm_stgridpool.video.limits import VideoLimits

__all__ = [
    "LOADER_NAME",
    "PyAVVideoLoader",
    "decoder_description",
    "register_video_loader",
    "sampled_frame_count",
    "shared_decode_pool",
]

logger = logging.getLogger("vllm.stgridpool")

LOADER_NAME = "pyav"


class PyAVVideoLoader(VideoLoader):
    """Drop-in replacement for the ``opencv`` loader, for untrusted uploads.

    Frame selection is delegated to the ``opencv`` loader, so both return the
    same frame indices and the same metadata keys for the same request.
    """

    @classmethod
    def compute_frames_index_to_sample(
        cls,
        source: VideoSourceMetadata,
        target: VideoTargetMetadata,
        **kwargs,
    ) -> list[int]:
        """Reuse vLLM's uniform sampling so this loader and opencv pick the same frames."""
        return VideoBackend.compute_frames_index_to_sample(source, target, **kwargs)

    @classmethod
    def load_bytes(
        cls,
        data: bytes,
        num_frames: int = -1,
        fps: float = -1,
        max_duration: float = 300,
        frame_recovery: bool = False,
        **kwargs: Any,
    ) -> tuple[npt.NDArray, dict[str, Any]]:
        """Decode the sampled frames of an encoded video held in memory.

        Takes the ``opencv`` loader's arguments. ``max_duration`` is ignored
        there too. ``frame_recovery`` and the codec options (``backend``,
        ``num_ffmpeg_threads``, ...) steer vLLM's own decoders and have no
        counterpart here: a sampled frame that cannot be decoded rejects the
        whole video instead of being skipped or replaced. The limits are the
        server's (``vllm_stgridpool.envs``); no keyword changes them.

        Returns ``(frames, metadata)``: ``frames`` is a uint8 RGB array of
        shape (T, H, W, 3); ``metadata`` has the keys of
        ``VideoLoader.create_hf_metadata``.

        Raises:
            ValueError: the bytes are not a decodable video, or the video is
                over a limit (the API server answers HTTP 400).
            vllm.exceptions.GracefulHTTPError: no decoder or budget came
                free in time (HTTP 503), or the decoder was killed.
            vllm.exceptions.VLLMUnprocessableEntityError: the decoder
                crashed on this video (HTTP 422).
        """
        limits = VideoLimits.from_env()
        target = VideoTargetMetadata(num_frames=num_frames, fps=fps, max_duration=max_duration)
        container_check.inspect(data, limits.max_video_packets)  # not a video container: 400 before any worker

        def plan(header):
            """The server's checks of the header, and the frames to decode (see ``pipeline.Plan``)."""
            limits.check_header(header.width, header.height, header.total_frames, len(data))
            limits.check_frame_size(header.width, header.height)
            check_frame_pixel_limit(header.width, header.height)  # vLLM's VLLM_MAX_IMAGE_PIXELS
            source = cls._prepare_source(
                VideoSourceMetadata(
                    total_frames_num=header.total_frames,
                    original_fps=header.fps,
                    # Same arithmetic as vLLM's opencv metadata reader.
                    duration=header.total_frames / header.fps if header.fps > 0 else 0,
                )
            )
            # Checked before the indices are listed: with num_frames -1 that is one per frame.
            limits.check_decoded_size(sampled_frame_count(source, target), header.width, header.height)
            frame_indices = cls.compute_frames_index_to_sample(source, target, **kwargs)
            nbytes = limits.check_decoded_size(len(frame_indices), header.width, header.height)
            return frame_indices, nbytes, (source, frame_indices)

        # One deadline from the request's arrival (its media loading started; see compat/video_requests.py).
        member = CURRENT_MEMBER.get()
        arrival = member.request.arrival if member is not None else time.monotonic()
        deadline = Deadline(arrival, envs.STGRIDPOOL_VIDEO_DEADLINE_SECONDS, envs.STGRIDPOOL_VIDEO_DECODE_WAIT_SECONDS)
        try:
            with _video_file(data) as path:
                frames, (source, frame_indices) = decode_video(path, limits, plan, deadline, member)
        except _DECODER_ERRORS as error:
            raise _http_error(error) from error
        return frames, cls.create_hf_metadata(
            source=source,
            valid_frame_indices=frame_indices,
            video_backend=LOADER_NAME,
        )


def sampled_frame_count(source: VideoSourceMetadata, target: VideoTargetMetadata) -> int:
    """How many frames vLLM's uniform sampler (``VideoBackend.compute_frames_index_to_sample``) picks, counted
    without listing them."""
    count = source.total_frames_num
    if target.num_frames > 0:
        count = min(target.num_frames, count)
    if target.fps > 0:
        count = min(count, math.floor(source.duration * target.fps))
    return max(1, count)


def register_video_loader() -> bool:
    """Register ``PyAVVideoLoader`` as :data:`LOADER_NAME` unless another loader has that name; whether it is.

    A loader registered under the name before (vLLM's or another plugin's)
    stays: a user who names it gets it. Repeated calls are no-ops. The
    plugin's ``register()`` runs in every vLLM process, so this only touches
    the registry; the decode pool starts with the first video.
    """
    holder = VIDEO_LOADER_REGISTRY.name2class.get(LOADER_NAME)
    if holder is not None and holder is not PyAVVideoLoader:
        logger.warning(
            "vllm-stgridpool: a video loader named %r is already registered (%s.%s); the plugin's loader is not "
            "registered and uploads are not decoded with its limits",
            LOADER_NAME, holder.__module__, holder.__qualname__,
        )
        return False
    VIDEO_LOADER_REGISTRY.register(LOADER_NAME)(PyAVVideoLoader)
    return True


def decoder_description() -> str:
    """The decoder and the FFmpeg it links, as error messages name it."""
    import av

    major, minor, micro = av.library_versions["libavcodec"]
    return f"PyAV {av.__version__}, libavcodec {major}.{minor}.{micro}"


_DECODER_ERRORS = (DecoderBusy, DeadlinePassed, DecoderDied, WorkerLimitHit, WorkerMisbehaved, WorkerFailure)


def _http_error(error: Exception) -> Exception:
    """The vLLM error the API server answers for a decoding failure that is not a limit of the header (400)."""
    from vllm.exceptions import VLLMServerError, VLLMUnprocessableEntityError

    if isinstance(error, DecoderBusy):
        return busy_error(f"Could not decode video now: {error}", error.retry_after)
    message = f"Could not decode video: the video decoder ({decoder_description()}): {error}"
    if isinstance(error, DecoderDied) and not error.crashed:  # killed from outside (OOM killer, operator)
        return busy_error(message + "; try again", 1)
    if isinstance(error, (DeadlinePassed, DecoderDied, WorkerLimitHit, WorkerMisbehaved)):
        return VLLMUnprocessableEntityError(message)  # the video's own doing: it would fail again
    return VLLMServerError(message)


def busy_error(message: str, retry_after: int):
    """HTTP 503 with a ``Retry-After`` of ``retry_after`` seconds (the header is added by compat/retry_after.py)."""
    from vllm.exceptions import GracefulHTTPError

    error = GracefulHTTPError(message, HTTPStatus.SERVICE_UNAVAILABLE)
    error.retry_after = retry_after
    return error


@contextlib.contextmanager
def _video_file(data: bytes) -> Iterator[str]:
    """The upload as a temporary file (in ``TMPDIR``), removed when the block ends (see the module's note)."""
    if not data:
        raise ValueError("Could not decode video: the video data is empty.")
    with tempfile.NamedTemporaryFile(prefix="stgridpool-video-") as file:
        file.write(data)
        file.flush()
        yield file.name
