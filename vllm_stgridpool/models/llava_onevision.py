"""LLaVA-OneVision (and LLaVA-Video checkpoints in OneVision format) with ST-GridPool.

Stock vLLM 0.32 runs the vision tower and projector over every frame, then
bilinear-pools each frame to ceil(27/2)^2 = 196 tokens and appends one
``image_newline`` per video. Here the pooling step is ST-GridPool, per video
(PTG never mixes two videos); images keep the stock path. The video path also
returns one 2-D tensor per video in every case, which fixes stock's crash on
a batch of videos with different frame counts (its list path returned 3-D
tensors).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    LlavaOnevisionVideoPixelInputs,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_stgridpool.activation import VIDEO_EXTRA_TOKENS, settings_for
from vllm_stgridpool.models.common import (
    CONFIG_FIELD,
    STGridPoolProcessingInfo,
    STGridPoolProcessorMixin,
    pool_videos,
    video_configs,
)

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"


class STGridPoolLlavaOnevisionProcessingInfo(STGridPoolProcessingInfo, LlavaOnevisionProcessingInfo):
    video_extra_tokens = VIDEO_EXTRA_TOKENS[ARCHITECTURE]  # the image_newline appended to every video


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
        self.stgridpool_settings = settings_for(self.config)
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
        pooled = pool_videos(
            torch.split(features, frames),
            video_configs(config_rows, self.stgridpool_settings, len(videos)),
            self.patch_grid,
            stock_pool=self.apply_pooling,
        )
        newline = self.image_newline[None].to(features.dtype)
        return [torch.cat((video, newline)) for video in pooled]
