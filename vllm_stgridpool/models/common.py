"""The parts of the ST-GridPool integration that every LLaVA video family shares.

- :class:`STGridPoolProcessingInfo`: token counts and profiling sizes that
  follow the server's config (profiling, encoder cache, dummy inputs all
  read them).
- :class:`STGridPoolProcessorMixin`: resolves each request's config, checks
  it, strips it before the HF processor sees it, hands it to the model as a
  per-video field and emits the matching number of placeholders.
- :func:`pool_videos`: the model side, one ST-GridPool call per video, on
  a view of its features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property

import msgspec
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import VideoEmbeddingItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_stgridpool.serving import metrics
from vllm_stgridpool.stage import backend, cpu_kernels, st_gridpool, triton_stage
from vllm_stgridpool.serving.activation import plugin_settings, settings_for
from vllm_stgridpool.serving.budget import VideoFit, fit_video, sample_frames
from vllm_stgridpool.config import STGridPoolConfig, STGridPoolConfigError, STGridPoolSettings
from vllm_stgridpool.serving.config_rows import config_from_row, config_to_row
from vllm_stgridpool.serving.request_rules import (
    REQUEST_KEY,
    RequestSettings,
    StageShape,
    check_num_frames,
    request_settings,
)


CONFIG_FIELD = "stgridpool_config"


class STGridPoolProcessingInfo:
    """Mixin for a vLLM ``ProcessingInfo``: ST-GridPool token counts.

    ``video_extra_tokens`` is what the family adds per video beyond its frame
    tokens (LLaVA-OneVision's newline token).
    """

    video_extra_tokens: int  # set per family from families.FAMILIES

    @cached_property
    def stgridpool_settings(self) -> STGridPoolSettings | None:
        return settings_for(self.get_hf_config())

    def patch_grid(self) -> tuple[int, int]:
        side = self.get_vision_encoder_info().get_patch_grid_length()
        return side, side

    def stage_channels(self) -> int:
        """D of the features the stage pools (the family decides where it runs)."""
        return self.get_hf_config().text_config.hidden_size

    def stage_shape(self) -> StageShape:
        settings = self.stgridpool_settings
        dtype = self.ctx.model_config.dtype
        return StageShape(settings.max_frames, *self.patch_grid(), self.stage_channels(), dtype.itemsize)

    def request_video_settings(self, mm_kwargs: Mapping[str, object]) -> RequestSettings | None:
        """What a request asks for, checked against the server's setting (HTTP 400 with the reason)."""
        if self.stgridpool_settings is None:
            return request_settings(None, mm_kwargs, None)
        return request_settings(self.stgridpool_settings, mm_kwargs, self.stage_shape())

    def video_settings(self, mm_kwargs: Mapping[str, object]) -> RequestSettings | None:
        """The settings :meth:`STGridPoolProcessorMixin.apply` resolved for this request (None: stock)."""
        canonical = mm_kwargs.get(REQUEST_KEY)
        if canonical is None:
            return None
        return RequestSettings(config_from_row(list(canonical["config"])), canonical["max_video_tokens"])

    @cached_property
    def video_newline(self) -> str:
        """``"video"`` or ``"grid"`` (see models/llava_onevision.py); families without a choice keep this."""
        settings = plugin_settings(self.get_hf_config())
        if settings is not None and settings.video_newline == "grid":
            raise STGridPoolConfigError(
                'video_newline "grid" is LLaVA-Video\'s layout, for LLaVA-OneVision-format checkpoints; '
                'this model puts no newline in its videos: use "video" or leave video_newline out'
            )
        return "video"

    def pooled_grid(self, config: STGridPoolConfig | None) -> tuple[int, int]:
        """A frame's token grid after pooling with ``config`` (None: the family's stock pooling)."""
        if config is None:
            side = math.isqrt(self.stock_frame_tokens())  # stock pools a square grid to a square grid
            return side, side
        return config.output_grid(*self.patch_grid())

    def video_token_count(self, num_frames: int, config: STGridPoolConfig | None) -> int:
        """Placeholder tokens of one ``num_frames`` video pooled with ``config`` (None: stock pooling).

        The one count behind the prompt's placeholders, profiling, the token
        budget and the savings metric.
        """
        height, width = self.pooled_grid(config)
        if self.video_newline == "grid":  # a newline ends every row of every frame; none for the video
            return num_frames * height * (width + 1)
        return num_frames * height * width + self.video_extra_tokens

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        """vLLM's own count (profiling, stock prompts): the same as every request's."""
        settings = self.stgridpool_settings
        return self.video_token_count(num_frames, None if settings is None else settings.pool)

    def fit_video(self, num_frames: int, request: RequestSettings) -> VideoFit:
        """Frames and kernel of one video under the request's token budget (see :mod:`budget`)."""
        settings = self.stgridpool_settings
        config = request.config
        height, width = self.patch_grid()
        return fit_video(
            num_frames,
            config.kernel_size,
            request.max_video_tokens,
            min_frames=settings.min_frames,
            max_kernel_size=settings.max_kernel_size,
            tokens=lambda frames, kernel: self.video_token_count(frames, with_kernel(config, kernel)),
            kernel_fits=lambda kernel: kernel <= min(height, width),
        )

    def _get_num_frame_tokens(self, *, image_width: int, image_height: int) -> int:
        settings = self.stgridpool_settings
        if settings is None:
            return super()._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return settings.pool.num_tokens(1, *self.patch_grid())

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        # The plugin active with "enabled": false too: a stock-pooling baseline sees max_frames frames.
        settings = plugin_settings(self.get_hf_config())
        if settings is None:
            return super().get_num_frames_with_most_features(seq_len, mm_counts)
        fitting = self._get_max_video_frames(seq_len) // max(mm_counts.get("video", 0), 1)
        return max(min(fitting, settings.max_frames), 1)

    def stock_frame_tokens(self) -> int:
        """Tokens per frame of the family's stock pooling (for the savings metric)."""
        size = self.get_image_size_with_most_features()
        return super()._get_num_frame_tokens(image_width=size.width, image_height=size.height)


class STGridPoolProcessorMixin:
    """Mixin for a vLLM multimodal processor whose ``info`` is an :class:`STGridPoolProcessingInfo`."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        request = self.info.video_settings(hf_kwargs)
        videos = _video_items(mm_items)
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEY}
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if request is not None and videos is not None and videos.get_count():
            rows = []
            for index in range(videos.get_count()):
                fit = self.info.fit_video(videos.get_num_frames(index), request)
                rows.append(config_to_row(with_kernel(request.config, fit.kernel_size)))
            processed[CONFIG_FIELD] = torch.tensor(rows, dtype=torch.float64)
        return processed

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if CONFIG_FIELD in hf_inputs:
            fields[CONFIG_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        request = self.info.video_settings(hf_processor_mm_kwargs)
        if request is None:
            return updates
        video_token_id = self.info.get_hf_config().video_token_index

        def replacement(item_idx: int) -> list[int]:
            videos = mm_items.get_items("video", (VideoEmbeddingItems, VideoProcessorItems))
            if isinstance(videos, VideoEmbeddingItems):
                return [video_token_id] * videos.get_feature_size(item_idx)
            return [video_token_id] * self.info.fit_video(videos.get_num_frames(item_idx), request).tokens

        return [
            PromptReplacement(modality="video", target=[video_token_id], replacement=replacement)
            if update.modality == "video"
            else update
            for update in updates
        ]

    def apply(self, inputs, timing_ctx):
        """Process one request with its ST-GridPool settings in one canonical form.

        The client's ``stgridpool`` object is checked here, in the API
        server, and replaced by the resolved settings (the config as a row of
        floats, the budget as an int): vLLM's multimodal cache key hashes the
        processor kwargs, so equal settings however written (3 or 3.0,
        defaults spelled out or left out) share cache entries and different
        settings never do. Videos over the token budget are sampled down to
        the frames the budget keeps before anything else sees them. Each
        video's record for the metrics rides on the result until vLLM
        accepts the request (patch P8).
        """
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        request = self.info.request_video_settings(kwargs)
        kwargs.pop(REQUEST_KEY, None)
        videos = _video_items(inputs.mm_data_items)
        fits = []
        if request is not None:
            kwargs[REQUEST_KEY] = {
                "config": tuple(config_to_row(request.config)),
                "max_video_tokens": request.max_video_tokens,
            }
            if videos is not None:
                for index in range(videos.get_count()):
                    check_num_frames(self.info.stgridpool_settings, videos.get_num_frames(index))
                fits = [self.info.fit_video(videos.get_num_frames(i), request) for i in range(videos.get_count())]
                inputs = dataclasses.replace(inputs, mm_data_items=_keep_fitted_frames(inputs.mm_data_items, fits))
        result = super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        if fits:
            result[metrics.RECORDS_KEY] = self._video_records(videos, fits, result["mm_placeholders"].get("video", []))
        return result

    def _video_records(self, videos, fits, placeholders) -> list[metrics.VideoRecord]:
        records = []
        for index, (fit, placeholder) in enumerate(zip(fits, placeholders)):
            num_frames = videos.get_num_frames(index)
            records.append(
                metrics.VideoRecord(
                    num_frames=num_frames,
                    tokens=placeholder.length,
                    stock_tokens=self.info.video_token_count(num_frames, None),
                    frames_kept=fit.frames,
                    kernel_size=fit.kernel_size,
                    budget_limited=fit.limited,
                )
            )
        return records


def _keep_fitted_frames(mm_items, fits: list[VideoFit]):
    """``mm_items`` with each budget-limited video sampled down to the frames its fit keeps."""
    videos = mm_items["video"]
    if not any(fit.limited for fit in fits):
        return mm_items
    data = []
    for index, fit in enumerate(fits):
        frames = videos.get(index)
        keep = sample_frames(len(frames), fit.frames)
        if len(keep) < len(frames):
            frames = frames[keep] if hasattr(frames, "shape") else [frames[i] for i in keep]
        data.append(frames)
    items = type(mm_items)(mm_items)
    items["video"] = VideoProcessorItems(data, getattr(videos, "metadata", None))
    return items


def with_kernel(config: STGridPoolConfig, kernel_size: int) -> STGridPoolConfig:
    return config if config.kernel_size == kernel_size else msgspec.structs.replace(config, kernel_size=kernel_size)


def _video_items(mm_items) -> VideoProcessorItems | None:
    if "video" not in mm_items:
        return None
    items = mm_items["video"]
    return items if isinstance(items, VideoProcessorItems) else None


def video_configs(
    rows: object, settings: STGridPoolSettings | None, num_videos: int
) -> list[STGridPoolConfig | None]:
    """Each video's config: the per-video field if the processor sent one, else the server's."""
    if rows is None:
        default = None if settings is None else settings.pool
        return [default] * num_videos
    rows = list(rows) if not isinstance(rows, torch.Tensor) else list(rows.unbind(0))
    return [config_from_row(row.reshape(-1).tolist()) for row in rows]


def stage_settings(hf_config, vllm_config) -> STGridPoolSettings | None:
    """The model's ST-GridPool settings (None: stock); on a CPU engine, the fused kernels are built or loaded
    here, while the engine starts, rather than on the first video (a build takes about 20 s, once per machine).
    The Triton stage compiles every variant the settings let a request reach here (triton_stage.warm_up),
    at the features' width, which is the vision tower's or the language model's as the family pools.
    The stage's backend is logged here once, and a STGRIDPOOL_STAGE_BACKEND the device cannot run stops the
    start with the reason."""
    settings = settings_for(hf_config)
    if settings is not None:
        device_type = vllm_config.device_config.device_type
        chosen = backend.announce(device_type)
        if chosen == backend.CPU_KERNELS and device_type == "cpu":
            cpu_kernels.load()
        elif chosen == backend.TRITON:
            vision = hf_config.vision_config
            side = vision.image_size // vision.patch_size
            widths = sorted({vision.hidden_size, hf_config.text_config.hidden_size})
            triton_stage.warm_up(settings, side, side, widths, vllm_config.model_config.dtype,
                                 vllm_config.device_config.device)
    return settings


def pool_videos(
    features: Sequence[torch.Tensor],
    configs: Sequence[STGridPoolConfig | None],
    grid: tuple[int, int],
    stock_pool: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Pool each video's (T, H*W, D) features into (T*H'*W', D) rows.

    One call per video, on a view of its features: PTG mixes frames within
    a video only and the stage runs video by video even in a batched call,
    so a batch would only add the copy that stacks the videos (167 MB per
    64-frame video at D=896 in float32). ``None`` configs take the model's
    stock pooling, which maps (T, H*W, D) to (T, tokens, D).
    """
    height, width = grid
    pooled = []
    for video, config in zip(features, configs):
        if config is None:
            out = stock_pool(video)
        else:
            out = st_gridpool(video.unflatten(1, (height, width)), config)
        pooled.append(out.reshape(-1, out.shape[-1]))
    return pooled
