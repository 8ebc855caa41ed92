"""LLaVA-OneVision (and LLaVA-Video checkpoints in OneVision format) with ST-GridPool.

Stock vLLM 0.32 runs the vision tower and projector over every frame, then
bilinear-pools each frame to ceil(27/2)^2 = 196 tokens and appends one
``image_newline`` per video. Here the pooling step is ST-GridPool, per video
(PTG never mixes two videos); images keep the stock path. The video path also
returns one 2-D tensor per video in every case, which fixes stock's crash on
a batch of videos with different frame counts (its list path returned 3-D
tensors).

Where ``image_newline`` goes is the ``video_newline`` setting: ``"video"``
(one per video, as vLLM and transformers serve these checkpoints) or
``"grid"``, LLaVA-Video's training layout (LLaVA-NeXT's
``mm_newline_position: "grid"``, its ``add_token_per_grid``): after every
row of every pooled frame, so a video of T frames pooled to h x w costs
T * h * (w + 1) tokens and has no newline of its own. It applies to stock
pooling too (``"enabled": false``).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    LlavaOnevisionVideoPixelInputs,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_stgridpool.serving.activation import plugin_settings
from vllm_stgridpool.models.families import FAMILIES
from vllm_stgridpool.config import STGridPoolConfig, STGridPoolSettings
from vllm_stgridpool.models.common import (
    CONFIG_FIELD,
    STGridPoolProcessingInfo,
    STGridPoolProcessorMixin,
    pool_videos,
    stage_settings,
    video_configs,
)

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
LLAVA_VIDEO_NAME = "llava-video"  # in the name of every LLaVA-Video checkpoint (LLaVA-Video-7B-Qwen2-hf, ...)


def video_newline_layout(settings: STGridPoolSettings | None, checkpoint: str) -> str:
    """``"video"`` or ``"grid"``: the server's ``video_newline``, else the checkpoint's training layout.

    LLaVA-Video was trained (and is evaluated) with the grid layout, but its
    published files do not record it, so the checkpoint's name decides: a
    hub id or local path that contains ``llava-video`` (any case; the
    ``llava-video`` alias resolves to one) is LLaVA-Video. With the plugin
    not active for the model (``settings`` None) it is vLLM's own layout.
    """
    if settings is None:
        return "video"
    if settings.video_newline is not None:
        return settings.video_newline
    return "grid" if LLAVA_VIDEO_NAME in str(checkpoint).lower() else "video"


def stock_pooled_grid(patch_grid: tuple[int, int]) -> tuple[int, int]:
    """The frame grid after vLLM's stock pooling (bilinear to ceil(side / 2), ``apply_pooling``)."""
    return math.ceil(patch_grid[0] / 2), math.ceil(patch_grid[1] / 2)


def place_newlines(
    video: torch.Tensor, num_frames: int, grid: tuple[int, int], newline: torch.Tensor, layout: str
) -> torch.Tensor:
    """A pooled video's (T*h*w, D) rows with ``newline`` (D,) placed as ``layout`` says."""
    if layout == "video":
        return torch.cat((video, newline[None]))
    height, width = grid
    rows = video.reshape(num_frames * height, width, -1)
    return torch.cat((rows, newline.expand(num_frames * height, 1, -1)), dim=1).flatten(0, 1)


class STGridPoolLlavaOnevisionProcessingInfo(STGridPoolProcessingInfo, LlavaOnevisionProcessingInfo):
    video_extra_tokens = FAMILIES[ARCHITECTURE].video_extra_tokens  # the image_newline appended to every video

    @cached_property
    def video_newline(self) -> str:
        return video_newline_layout(plugin_settings(self.get_hf_config()), self.ctx.model_config.model)


class STGridPoolLlavaOnevisionMultiModalProcessor(
    STGridPoolProcessorMixin, LlavaOnevisionMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    STGridPoolLlavaOnevisionMultiModalProcessor,
    info=STGridPoolLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,  # its frame count follows the info's max_frames
)
class STGridPoolLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.stgridpool_settings = stage_settings(self.config, vllm_config)
        self.video_newline = video_newline_layout(plugin_settings(self.config), vllm_config.model_config.model)
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)

    def embed_multimodal(self, **kwargs: object):
        config_rows = kwargs.pop(CONFIG_FIELD, None)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, modality_input in inputs.items():  # keeps the prompt's modality order
            if modality == "image":
                embeddings += tuple(self._process_image_input(modality_input))
            elif modality == "video":
                embeddings += tuple(self._embed_videos(modality_input, config_rows))
        return embeddings

    def _embed_videos(
        self, inputs: LlavaOnevisionVideoPixelInputs, config_rows: object
    ) -> list[torch.Tensor]:
        videos = list(inputs["pixel_values_videos"])
        frames = [video.shape[0] for video in videos]
        features = self.vision_tower(
            torch.cat(videos),
            feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        features = self.multi_modal_projector(features)
        configs = video_configs(config_rows, self.stgridpool_settings, len(videos))
        pooled = pool_videos(torch.split(features, frames), configs, self.patch_grid, stock_pool=self.apply_pooling)
        newline = self.image_newline.to(features.dtype)
        return [
            place_newlines(video, num_frames, self._pooled_grid(config), newline, self.video_newline)
            for video, num_frames, config in zip(pooled, frames, configs)
        ]

    def _pooled_grid(self, config: STGridPoolConfig | None) -> tuple[int, int]:
        return stock_pooled_grid(self.patch_grid) if config is None else config.output_grid(*self.patch_grid)
