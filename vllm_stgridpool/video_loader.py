"""A ``decord`` video loader for vLLM's video loader registry.

vLLM 0.32's default ``opencv`` loader returns no frames for a valid one-frame
mp4, so the request fails. ``decord`` decodes such files, and fetches the
sampled frames with one batched, seeking call. Select it with
``VLLM_VIDEO_LOADER_BACKEND=decord`` or
``--media-io-kwargs '{"video": {"video_backend": "decord"}}'``.

decord reads the upload from a temporary file, never from memory: its
in-memory reader trusts the container's offsets, and a seek past the end
makes it copy from beyond its buffer, a segfault that ends the API server
for every client. Its file reader goes through FFmpeg's own I/O, which
answers such a seek with an error.
"""

import contextlib
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy.typing as npt
import torch

from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoBackend, VideoLoader
from vllm.multimodal.video_decoders import (
    VideoSourceMetadata,
    VideoTargetMetadata,
    check_frame_pixel_limit,
)

__all__ = ["DECORD_LOADER_NAME", "DecordVideoLoader", "register_decord_loader"]

DECORD_LOADER_NAME = "decord"

# decord prefixes its messages with "[hh:mm:ss] /build/path/file.cc:123: ".
_DECORD_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


class DecordVideoLoader(VideoLoader):
    """Drop-in replacement for the ``opencv`` loader that decodes with decord.

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
        """Reuse vLLM's uniform sampling so decord and opencv pick the same frames."""
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
        decord counterpart: a sampled frame decord cannot decode rejects the
        whole video instead of being skipped or replaced.

        Returns ``(frames, metadata)``: ``frames`` is a uint8 RGB array of
        shape (T, H, W, 3); ``metadata`` has the keys of
        ``VideoLoader.create_hf_metadata``.

        Raises:
            ValueError: the bytes are not a decodable video (the API server
                answers it with HTTP 400), or a frame exceeds
                ``VLLM_MAX_IMAGE_PIXELS``.
        """
        with _video_file(data) as path:
            return cls._load_file(path, num_frames, fps, max_duration, **kwargs)

    @classmethod
    def _load_file(
        cls, path: str, num_frames: int, fps: float, max_duration: float, **kwargs: Any
    ) -> tuple[npt.NDArray, dict[str, Any]]:
        """:meth:`load_bytes` on the upload written to ``path``."""
        reader = _open_reader(path)
        if len(reader) == 0:
            raise ValueError("Could not decode video: it has no frames.")
        # Frame 0 is always sampled, so probing it costs one extra frame decode.
        first_frame = _decode(reader.next)
        height, width = first_frame.shape[:2]
        check_frame_pixel_limit(width, height)

        total_frames_num = len(reader)
        original_fps = float(reader.get_avg_fps())
        source = cls._prepare_source(
            VideoSourceMetadata(
                total_frames_num=total_frames_num,
                original_fps=original_fps,
                # Same arithmetic as vLLM's opencv metadata reader.
                duration=total_frames_num / original_fps if original_fps > 0 else 0,
            )
        )
        target = VideoTargetMetadata(
            num_frames=num_frames, fps=fps, max_duration=max_duration
        )
        frame_indices = cls.compute_frames_index_to_sample(source, target, **kwargs)
        try:
            frames = _decode(lambda: reader.get_batch(frame_indices))
            if frames.shape[-1] != 3:
                raise ValueError(f"decord returned {frames.shape[-1]} channels instead of 3")
        except ValueError as decord_error:
            # decord 0.6 mis-sizes frames of some narrow widths (1, 2, 3, 4, 6,
            # 8, 12, 16, ...); PyAV decodes those. Truly broken input fails both.
            try:
                frames = _decode_with_pyav(path, frame_indices)
            except ValueError:
                raise decord_error from None
        return frames, cls.create_hf_metadata(
            source=source,
            valid_frame_indices=frame_indices,
            video_backend=DECORD_LOADER_NAME,
        )


def register_decord_loader() -> type[DecordVideoLoader]:
    """Register ``DecordVideoLoader`` as ``"decord"``; repeated calls are no-ops.

    The plugin's ``register()`` runs in every vLLM process, so this only
    touches the registry; decord itself is imported on the first decode.
    """
    VIDEO_LOADER_REGISTRY.register(DECORD_LOADER_NAME)(DecordVideoLoader)
    return DecordVideoLoader


@contextlib.contextmanager
def _video_file(data: bytes) -> Iterator[str]:
    """The upload as a temporary file (in ``TMPDIR``), removed when the block ends (see the module's note)."""
    if not data:
        raise ValueError("Could not decode video: the video data is empty.")
    with tempfile.NamedTemporaryFile(prefix="stgridpool-video-") as file:
        file.write(data)
        file.flush()
        yield file.name


def _open_reader(path: str):
    """A decord reader of the video file at ``path``."""
    import decord

    # decord raises RuntimeError, decord.DECORDError or AssertionError for
    # input it cannot parse; each means the client sent a broken video.
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0))
    except Exception as error:
        raise _undecodable(error) from error


def _decode(read) -> npt.NDArray:
    """Run a decord read and return its frames as a numpy array.

    Turns decord's errors into ``ValueError`` so a broken upload becomes a
    client error instead of an internal server error. The frames reach numpy
    through DLPack, which hands over decord's buffer instead of copying it
    (``asnumpy()`` would double the peak memory of the frames).
    """
    try:
        batch = read()
    except Exception as error:
        raise _undecodable(error) from error
    return torch.utils.dlpack.from_dlpack(batch.to_dlpack()).numpy()


def _decode_with_pyav(path: str, frame_indices: list[int]) -> npt.NDArray:
    """The frames at ``frame_indices`` (in decode order) of the video file at ``path``, decoded by PyAV."""
    import av
    import numpy as np

    wanted = set(frame_indices)
    picked = {}
    try:
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    picked[index] = frame.to_ndarray(format="rgb24")
                if len(picked) == len(wanted):
                    break
    except av.FFmpegError as error:
        raise ValueError(f"Could not decode video with PyAV: {error}") from error
    missing = wanted - picked.keys()
    if missing:
        raise ValueError(f"Could not decode video: frames {sorted(missing)[:5]} are unreadable")
    return np.stack([picked[i] for i in frame_indices])


def _undecodable(error: Exception) -> ValueError:
    """Build the client-facing error, without decord's build paths."""
    reason = _DECORD_LOG_PREFIX.sub("", str(error)).strip()
    if "cannot find video stream" in reason:
        return ValueError("Could not decode video: the data holds no video stream (0 frames).")
    return ValueError(f"Could not decode video with decord: {reason}")
