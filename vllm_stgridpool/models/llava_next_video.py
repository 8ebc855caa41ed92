"""LLaVA-NeXT-Video with ST-GridPool.

Stock vLLM 0.32 pools each frame's 24 x 24 CLIP features with a stride-2
average (or max) pool *before* the projector (144 tokens per frame), and
appends no newline. ST-GridPool takes the same place: tower -> ST-GridPool
-> projector.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next_video import (
    LlavaNextVideoDummyInputsBuilder,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoMultiModalProcessor,
    LlavaNextVideoProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_stgridpool.models.families import FAMILIES
from vllm_stgridpool.models.common import (
    CONFIG_FIELD,
    STGridPoolProcessingInfo,
    STGridPoolProcessorMixin,
    pool_videos,
    stage_settings,
    video_configs,
)

ARCHITECTURE = "LlavaNextVideoForConditionalGeneration"


class STGridPoolLlavaNextVideoProcessingInfo(STGridPoolProcessingInfo, LlavaNextVideoProcessingInfo):
    video_extra_tokens = FAMILIES[ARCHITECTURE].video_extra_tokens

    def stage_channels(self) -> int:
        return self.get_hf_config().vision_config.hidden_size  # pooled before the projector


class STGridPoolLlavaNextVideoMultiModalProcessor(
    STGridPoolProcessorMixin, LlavaNextVideoMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    STGridPoolLlavaNextVideoMultiModalProcessor,
    info=STGridPoolLlavaNextVideoProcessingInfo,
    dummy_inputs=LlavaNextVideoDummyInputsBuilder,  # its frame count follows the info's max_frames
)
class STGridPoolLlavaNextVideoForConditionalGeneration(LlavaNextVideoForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.stgridpool_settings = stage_settings(self.config, vllm_config)
        self.patch_grid = (self.patch_grid_length, self.patch_grid_length)

    def embed_multimodal(self, **kwargs: object):
        config_rows = kwargs.pop(CONFIG_FIELD, None)
        video_input = self._parse_and_validate_video_input(**kwargs)
        if video_input is None:
            return []
        videos = list(video_input["pixel_values_videos"])
        frames = [video.shape[0] for video in videos]
        features = self.vision_tower(
            torch.cat(videos),
            feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        pooled = pool_videos(
            torch.split(features, frames),
            video_configs(config_rows, self.stgridpool_settings, len(videos)),
            self.patch_grid,
            stock_pool=self.vision_resampler,
        )
        # One projector call over all videos, as stock does.
        projected = self.multi_modal_projector(torch.cat(pooled))
        return list(torch.split(projected, [video.shape[0] for video in pooled]))

    def get_mm_lora_token_counts(self, *, modality, mm_kwargs, num_mm_embeds):
        """LoRA sizes tower and connector tokens from the video's real (pooled) token count."""
        rows = None
        if mm_kwargs is not None and CONFIG_FIELD in mm_kwargs:
            rows = [_field_data(mm_kwargs[CONFIG_FIELD])]
        config = video_configs(rows, self.stgridpool_settings, 1)[0]
        if config is None:
            return super().get_mm_lora_token_counts(
                modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds
            )
        per_frame = config.num_tokens(1, *self.patch_grid)
        if num_mm_embeds <= 0:
            return 0, 0
        num_frames = num_mm_embeds // per_frame
        return num_frames * self.patch_grid_length**2, num_frames * per_frame


def _field_data(element: object) -> torch.Tensor:
    return getattr(element, "data", element)
