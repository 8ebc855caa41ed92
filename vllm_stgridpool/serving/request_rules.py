"""What one request may change, and what it may cost.

A request's ``mm_processor_kwargs={"stgridpool": {...}}`` may change the
operator's parameters, but never so that a video costs more tokens, stage
memory or stage work than the server's own setting, and not at all when the
server says ``allow_request_overrides: false``. Every refusal is a
``STGridPoolConfigError`` (a ``ValueError``: HTTP 400 through the server)
raised in the API-server process, before the engine sees the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import msgspec

from vllm_stgridpool.stage.cost import stage_cost
from vllm_stgridpool.serving.activation import plain_mapping
from vllm_stgridpool.config import MAX_VIDEO_TOKENS, STGridPoolConfig, STGridPoolConfigError, STGridPoolSettings

REQUEST_KEY = "stgridpool"
BUDGET_KEY = "max_video_tokens"  # the one server setting a request may also send (to lower it)


class StageShape(NamedTuple):
    """What the stage's cost depends on besides the config: the profiled video and the model."""

    max_frames: int
    height: int
    width: int
    channels: int  # D where the stage runs (after the projector, or before it for NeXT-Video)
    itemsize: int  # bytes per feature value in the model's dtype


class RequestSettings(NamedTuple):
    """What one request's videos run with: the operator's config and the per-video token budget."""

    config: STGridPoolConfig
    max_video_tokens: int | None = None


def request_settings(
    settings: STGridPoolSettings | None,
    mm_processor_kwargs: Mapping[str, object],
    shape: StageShape,
) -> RequestSettings | None:
    """The settings one request's videos run with (None: stock pooling).

    A request may change the operator's parameters but never make a video
    cost more than the server's own setting: not more tokens per frame, not
    more stage memory or work at ``max_frames`` than what start-up profiled,
    and a ``max_video_tokens`` that lowers the server's budget, never raises
    it. Raises ``STGridPoolConfigError`` (a ValueError, so HTTP 400 through
    the server) naming the field and what is allowed.
    """
    override = mm_processor_kwargs.get(REQUEST_KEY)
    if override is None:
        return None if settings is None else RequestSettings(settings.pool, settings.max_video_tokens)
    if settings is None:
        raise STGridPoolConfigError(
            "mm_processor_kwargs.stgridpool was given, but ST-GridPool is not enabled for "
            "this model; start the server with --plugins stgridpool or "
            "--hf-overrides '{\"stgridpool\": {}}'"
        )
    if not settings.allow_request_overrides:
        raise STGridPoolConfigError(
            "mm_processor_kwargs.stgridpool is not allowed: this server was started with "
            "\"allow_request_overrides\": false; send the request without it"
        )
    if not isinstance(override, Mapping):
        raise STGridPoolConfigError(
            f"mm_processor_kwargs.stgridpool must be a JSON object such as "
            f"{{\"kernel_size\": 3}}, got {type(override).__name__}"
        )
    override = plain_mapping(override)
    budget = request_budget(settings.max_video_tokens, override.pop(BUDGET_KEY, None))
    config = STGridPoolConfig.from_dict({**settings.pool.to_dict(), **override})
    check_request_cost(settings.pool, config, shape)
    return RequestSettings(config, budget)


def request_budget(server: int | None, requested: object) -> int | None:
    """A request's ``max_video_tokens``: a whole number that may lower the server's budget only."""
    if requested is None:
        return server
    limit = MAX_VIDEO_TOKENS if server is None else server
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= limit:
        raise STGridPoolConfigError(
            f"mm_processor_kwargs.stgridpool.max_video_tokens must be a whole number from 1 to "
            f"{limit} (a request may lower this server's budget, never raise it), got {requested!r}"
        )
    return requested


def check_request_cost(server: STGridPoolConfig, request: STGridPoolConfig, shape: StageShape) -> None:
    """Reject a request config that costs more tokens, or a pyramid that costs more stage memory or
    work, than the server's own setting at ``max_frames`` (what start-up profiled)."""
    height, width = shape.height, shape.width
    request.output_grid(height, width)  # a kernel larger than the grid: named error
    server_tokens = server.num_tokens(1, height, width)
    request_tokens = request.num_tokens(1, height, width)
    if request_tokens > server_tokens:
        raise STGridPoolConfigError(
            f"mm_processor_kwargs.stgridpool would cost {request_tokens} tokens per frame, more "
            f"than this server's {server_tokens} (kernel_size {server.kernel_size} on a "
            f"{height} x {width} grid); use kernel_size >= {server.kernel_size}"
        )
    # The pyramid is what can blow the stage's memory and work up (8 levels at stride 1 hold
    # many times the input); compare it with the server's at the request's own kernel and norm,
    # whose costs are bounded by the token check above and by the stage's chunked workspace.
    # No pyramid at all is always allowed: where no frame is replaced, NSP pools a whole segment
    # in one step, which on a narrow model (D = 64) can hold more than the pyramid's shorter runs.
    args = (shape.max_frames, height, width, shape.channels)
    pyramids = ((server.grid_sizes, server.grid_strides), ((), ()))
    allowed = [
        stage_cost(*args, msgspec.structs.replace(request, grid_sizes=g, grid_strides=s), shape.itemsize)
        for g, s in pyramids
    ]
    needed = stage_cost(*args, request, shape.itemsize)
    for what, need, limit in (
        ("bytes of stage memory", needed.peak_bytes, max(cost.peak_bytes for cost in allowed)),
        (
            "bytes of stage memory on CUDA",
            needed.peak_bytes_every_mosaic,
            max(cost.peak_bytes_every_mosaic for cost in allowed),
        ),
        ("units of stage work", needed.work, max(cost.work for cost in allowed)),
    ):
        if need > limit:
            raise STGridPoolConfigError(
                f"mm_processor_kwargs.stgridpool grid_sizes {list(request.grid_sizes)} with "
                f"grid_strides {list(request.grid_strides)} would need {need} {what} for a "
                f"{shape.max_frames}-frame video, more than the {limit} of this server's pyramid "
                f"(grid_sizes {list(server.grid_sizes)}, grid_strides {list(server.grid_strides)}); "
                f"use fewer levels, smaller grids or larger strides"
            )


def check_num_frames(settings: STGridPoolSettings | None, num_frames: int) -> None:
    if num_frames < 1:
        raise STGridPoolConfigError("a video must have at least one frame, got 0")
    if settings is not None and num_frames > settings.max_frames:
        raise STGridPoolConfigError(
            f"video has {num_frames} frames, more than this server's max_frames "
            f"{settings.max_frames}; sample fewer frames (media_io_kwargs num_frames) or "
            f"raise max_frames in the stgridpool object of --hf-overrides"
        )


