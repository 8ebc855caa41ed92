"""ST-GridPool configuration: the operator's parameters and the server's settings.

Both arrive as plain JSON objects (``--hf-overrides '{"stgridpool": {...}}'``,
per-request ``mm_processor_kwargs``), so they are msgspec Structs: strict
types, frozen, unknown keys rejected, and every error is a ``ValueError``
that names the field and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

# Caps keep a hostile request from asking for work or memory out of all
# proportion; the paper's settings sit far inside them.
MAX_LEVELS = 8
MAX_GRID_SIZE = 64
MAX_GRID_STRIDE = 1024
MAX_KERNEL_SIZE = 32
# Numeric ranges, from the maths of the score (see torch_ops._scores). Any finite
# value would give finite outputs; these bounds keep only values that mean
# something and that float32 computes accurately.
# - norm_p: the p-mean of a token's |x_i| tends to their geometric mean as
#   p -> 0 and to the largest |x_i| as p -> inf; below 0.01 it is within ~1%
#   of the first (Gaussian features), above 1000 within 1% of the second
#   (ln(D) / p for D <= 22026). In float32 its relative error grows like
#   1e-7 / p: 2e-5 at p = 0.01, against float64.
# - temperature: float32's exp underflows to 0 below -103, so at |t| = 1e4
#   any score gap above 0.01 already gives a hard argmax; beyond that only
#   rounding changes. Subnormal and zero temperatures are uniform weights.
MAX_ABS_TEMPERATURE = 1e4
MIN_NORM_P = 1e-2
MAX_NORM_P = 1e3
MAX_FRAMES_CAP = 1024
MAX_VIDEO_TOKENS = 1 << 24
VIDEO_NEWLINE_LAYOUTS = ("video", "grid")


class STGridPoolConfigError(ValueError):
    """A configuration value that ST-GridPool cannot use."""


class STGridPoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of the ST-GridPool operator (defaults: the paper's setting)."""

    grid_sizes: tuple[int, ...] = (4, 4, 4)
    grid_strides: tuple[int, ...] = (2, 4, 8)
    kernel_size: int = 2
    temperature: float = 1.0
    norm_p: float = 2.0

    def __post_init__(self) -> None:
        # Direct construction skips msgspec's type checks: normalise lists to
        # tuples (the config is hashed as a cache key) and check types here.
        for name in ("grid_sizes", "grid_strides"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise STGridPoolConfigError(f"{name} must be a list of whole numbers, got {value!r}")
            msgspec.structs.force_setattr(self, name, tuple(value))
        if isinstance(self.temperature, int) and not isinstance(self.temperature, bool):
            msgspec.structs.force_setattr(self, "temperature", float(self.temperature))
        if isinstance(self.norm_p, int) and not isinstance(self.norm_p, bool):
            msgspec.structs.force_setattr(self, "norm_p", float(self.norm_p))
        if len(self.grid_sizes) != len(self.grid_strides):
            raise STGridPoolConfigError(
                f"grid_sizes and grid_strides must have the same length (one entry "
                f"per pyramid level), got {len(self.grid_sizes)} and {len(self.grid_strides)}"
            )
        if len(self.grid_sizes) > MAX_LEVELS:
            raise STGridPoolConfigError(
                f"grid_sizes/grid_strides: at most {MAX_LEVELS} pyramid levels, "
                f"got {len(self.grid_sizes)}"
            )
        _check_ints("grid_sizes", self.grid_sizes, MAX_GRID_SIZE)
        _check_ints("grid_strides", self.grid_strides, MAX_GRID_STRIDE)
        _check_ints("kernel_size", (self.kernel_size,), MAX_KERNEL_SIZE)
        for name in ("temperature", "norm_p"):
            if not isinstance(getattr(self, name), float):
                raise STGridPoolConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not math.isfinite(self.temperature) or abs(self.temperature) > MAX_ABS_TEMPERATURE:
            raise STGridPoolConfigError(
                f"temperature must be a number from {-MAX_ABS_TEMPERATURE:g} to "
                f"{MAX_ABS_TEMPERATURE:g}, got {self.temperature!r}"
            )
        if not (math.isfinite(self.norm_p) and MIN_NORM_P <= self.norm_p <= MAX_NORM_P):
            raise STGridPoolConfigError(
                f"norm_p must be a number from {MIN_NORM_P:g} to {MAX_NORM_P:g}, got {self.norm_p!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> STGridPoolConfig:
        """Build from a plain dict; missing keys keep the paper's defaults."""
        return _convert(values or {}, cls, "stgridpool")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in msgspec.structs.asdict(self).items()}

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """(grid size, stride) per pyramid level, in the order they run."""
        return tuple(zip(self.grid_sizes, self.grid_strides))

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of one frame after NSP: floor windows of side ``kernel_size``."""
        k = self.kernel_size
        if height < k or width < k:
            raise STGridPoolConfigError(
                f"kernel_size {k} does not fit a {height} x {width} token grid; "
                f"use kernel_size <= {min(height, width)}"
            )
        return (height - k) // k + 1, (width - k) // k + 1

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Visual tokens of a ``num_frames`` video (PTG never changes the frame count)."""
        out_h, out_w = self.output_grid(height, width)
        return num_frames * out_h * out_w


class STGridPoolSettings(msgspec.Struct, frozen=True):
    """How a served model uses ST-GridPool: the ``stgridpool`` object of ``--hf-overrides``.

    Its keys are those of :class:`STGridPoolConfig` plus ``enabled``,
    ``max_frames`` (frames per video the server profiles for and samples down
    to), ``allow_request_overrides`` (whether ``mm_processor_kwargs`` may
    change the operator's parameters per request) and the video-token budget
    (``max_video_tokens``, ``min_frames``, ``max_kernel_size``; see
    :mod:`vllm_stgridpool.serving.budget`).
    """

    pool: STGridPoolConfig = msgspec.field(default_factory=STGridPoolConfig)
    enabled: bool = True
    max_frames: int = 64
    allow_request_overrides: bool = True
    max_video_tokens: int | None = None  # the per-video token budget (None: no budget)
    min_frames: int = 16  # frames a budget keeps before it raises the kernel
    max_kernel_size: int = 4  # a budget raises the kernel up to this (never below kernel_size)
    # Where LLaVA-OneVision-format models put image_newline in a video: "video" (one
    # per video, vLLM's and transformers' layout) or "grid" (after every row of every
    # frame, LLaVA-Video's training layout); None: the checkpoint's own (see
    # models/llava_onevision.py). Any is checked in __post_init__, whose message lists the values.
    video_newline: Any = None

    def __post_init__(self) -> None:
        _check_ints("max_frames", (self.max_frames,), MAX_FRAMES_CAP)
        _check_ints("min_frames", (self.min_frames,), MAX_FRAMES_CAP)
        _check_ints("max_kernel_size", (self.max_kernel_size,), MAX_KERNEL_SIZE)
        if self.max_video_tokens is not None:
            _check_ints("max_video_tokens", (self.max_video_tokens,), MAX_VIDEO_TOKENS)
        if self.video_newline is not None and self.video_newline not in VIDEO_NEWLINE_LAYOUTS:
            raise STGridPoolConfigError(
                f"video_newline must be \"video\" or \"grid\" (or null for the checkpoint's own "
                f"layout), got {self.video_newline!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> STGridPoolSettings:
        values = _require_dict(values or {}, "stgridpool")
        own = {k: values[k] for k in _SETTING_KEYS if k in values}
        rest = {k: v for k, v in values.items() if k not in _SETTING_KEYS}
        pool = _convert(rest, STGridPoolConfig, "stgridpool", allowed=_ALL_KEYS)
        return msgspec.structs.replace(_convert(own, cls, "stgridpool"), pool=pool)


_SETTING_KEYS = (
    "enabled",
    "max_frames",
    "allow_request_overrides",
    "max_video_tokens",
    "min_frames",
    "max_kernel_size",
    "video_newline",
)
_ALL_KEYS = STGridPoolConfig.__struct_fields__ + _SETTING_KEYS


def _check_ints(field: str, values: tuple[int, ...], cap: int) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
            raise STGridPoolConfigError(
                f"{field} must hold whole numbers from 1 to {cap}, got {value!r}"
            )


def _require_dict(values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise STGridPoolConfigError(
            f"{where} must be a JSON object such as {{\"kernel_size\": 2}}, "
            f"got {type(values).__name__}"
        )
    return values


def _convert(values: Any, cls: type, where: str, allowed: tuple[str, ...] | None = None):
    values = _require_dict(values, where)
    try:
        return msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if "Object contains unknown field" in message:
            keys = ", ".join(allowed or cls.__struct_fields__)
            message = f"{message}; allowed keys: {keys}"
        raise STGridPoolConfigError(f"invalid {where} config: {message}") from None

