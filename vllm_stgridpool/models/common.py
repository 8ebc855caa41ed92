"""The parts of the ST-GridPool integration that every LLaVA video family shares.

- :class:`STGridPoolProcessingInfo`: token counts and profiling sizes that
  follow the server's config (profiling, encoder cache, dummy inputs all
  read them).
- :class:`STGridPoolProcessorMixin`: resolves each request's config, checks
  it, strips it before the HF processor sees it, hands it to the model as a
  per-video field and emits the matching number of placeholders.
- :func:`pool_videos`: the model side, one batched ST-GridPool call per
  group of videos that share a frame count and a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import VideoEmbeddingItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_stgridpool import metrics
from vllm_stgridpool.activation import (
    REQUEST_KEY,
    StageShape,
    check_num_frames,
    config_from_row,
    config_to_row,
    request_config,
    settings_for,
)
from vllm_stgridpool.compat.accepted_metrics import RECORDS_KEY
from vllm_stgridpool.config import STGridPoolConfig, STGridPoolSettings
from vllm_stgridpool.ops import st_gridpool


CONFIG_FIELD = "stgridpool_config"


class STGridPoolProcessingInfo:
    """Mixin for a vLLM ``ProcessingInfo``: ST-GridPool token counts.

    ``video_extra_tokens`` is what the family adds per video beyond its frame
    tokens (LLaVA-OneVision's newline token).
    """

    video_extra_tokens: int  # set per family from activation.VIDEO_EXTRA_TOKENS

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

    def request_video_config(self, mm_kwargs: Mapping[str, object]) -> STGridPoolConfig | None:
        """The config a request asks for, checked against the server's (HTTP 400 with the reason)."""
        if self.stgridpool_settings is None:
            return request_config(None, mm_kwargs, None)
        return request_config(self.stgridpool_settings, mm_kwargs, self.stage_shape())

    def video_config(self, mm_kwargs: Mapping[str, object]) -> STGridPoolConfig | None:
        """The config :meth:`STGridPoolProcessorMixin.apply` resolved for this request (None: stock)."""
        row = mm_kwargs.get(REQUEST_KEY)
        return None if row is None else config_from_row(list(row))

    def _get_num_frame_tokens(self, *, image_width: int, image_height: int) -> int:
        settings = self.stgridpool_settings
        if settings is None:
            return super()._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return settings.pool.num_tokens(1, *self.patch_grid())

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        settings = self.stgridpool_settings
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
        config = self.info.video_config(hf_kwargs)
        videos = _video_items(mm_items)
        if videos is not None:
            for index in range(videos.get_count()):
                check_num_frames(self.info.stgridpool_settings, videos.get_num_frames(index))
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEY}
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if config is not None and videos is not None and videos.get_count():
            row = config_to_row(config)
            processed[CONFIG_FIELD] = torch.tensor([row] * videos.get_count(), dtype=torch.float64)
        return processed

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if CONFIG_FIELD in hf_inputs:
            fields[CONFIG_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.video_config(hf_processor_mm_kwargs)
        if config is None:
            return updates
        video_token_id = self.info.get_hf_config().video_token_index
        grid = self.info.patch_grid()

        def replacement(item_idx: int) -> list[int]:
            videos = mm_items.get_items("video", (VideoEmbeddingItems, VideoProcessorItems))
            if isinstance(videos, VideoEmbeddingItems):
                return [video_token_id] * videos.get_feature_size(item_idx)
            num_frames = videos.get_num_frames(item_idx)
            return [video_token_id] * (config.num_tokens(num_frames, *grid) + self.info.video_extra_tokens)

        return [
            PromptReplacement(modality="video", target=[video_token_id], replacement=replacement)
            if update.modality == "video"
            else update
            for update in updates
        ]


    def apply(self, inputs, timing_ctx):
        """Process one request with its ST-GridPool config in one canonical form.

        The client's ``stgridpool`` object is checked here, in the API
        server, and replaced by the resolved config as a row of floats:
        vLLM's multimodal cache key hashes the processor kwargs, so equal
        settings however written (3 or 3.0, defaults spelled out or left out)
        share cache entries and different settings never do. Each video's
        record for the metrics rides on the result until vLLM accepts the
        request (patch P8).
        """
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        config = self.info.request_video_config(kwargs)
        kwargs.pop(REQUEST_KEY, None)
        if config is not None:
            kwargs[REQUEST_KEY] = tuple(config_to_row(config))
        result = super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        videos = _video_items(inputs.mm_data_items)
        ranges = result["mm_placeholders"].get("video", []) if videos is not None else []
        if config is not None and ranges:
            stock_per_frame = self.info.stock_frame_tokens()
            extra = self.info.video_extra_tokens
            result[RECORDS_KEY] = [
                metrics.VideoRecord(
                    num_frames=videos.get_num_frames(index),
                    tokens=placeholder.length,
                    stock_tokens=stock_per_frame * videos.get_num_frames(index) + extra,
                )
                for index, placeholder in enumerate(ranges)
            ]
        return result


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


def pool_videos(
    features: Sequence[torch.Tensor],
    configs: Sequence[STGridPoolConfig | None],
    grid: tuple[int, int],
    stock_pool: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Pool each video's (T, H*W, D) features into (T*H'*W', D) rows.

    PTG mixes frames within a video only; videos that share a frame count
    and a config run as one batched call. ``None`` configs take the model's
    stock pooling, which maps (T, H*W, D) to (T, tokens, D).
    """
    height, width = grid
    pooled: list[torch.Tensor | None] = [None] * len(features)
    groups: dict[tuple[int, STGridPoolConfig | None], list[int]] = {}
    for index, (video, config) in enumerate(zip(features, configs)):
        groups.setdefault((video.shape[0], config), []).append(index)
    for (num_frames, config), members in groups.items():
        batch = torch.stack([features[i] for i in members])
        if config is None:
            out = stock_pool(batch.flatten(0, 1)).unflatten(0, (len(members), num_frames))
        else:
            out = st_gridpool(batch.unflatten(2, (height, width)), config)
        out = out.reshape(len(members), -1, out.shape[-1])
        for i, video in zip(members, out.unbind(0)):
            pooled[i] = video
    return pooled
