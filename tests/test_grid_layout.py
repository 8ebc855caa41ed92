"""LLaVA-Video's grid newline layout (``"video_newline": "grid"``), without an engine.

The oracle is LLaVA-NeXT's ``add_token_per_grid``, written out as plain loops
in tests/reference_layout.py: after pooling, frame after frame, row after
row, the row's tokens then one ``image_newline``; no newline for the video
as a whole. Token counts are the formula ``T * h * (w + 1)`` (grid) or
``T * h * w + 1`` (one newline per video) plus the prompt's text tokens from
the checkpoint's own tokenizer, for the processor vLLM builds from the
published checkpoint's replica.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.support.reference_layout import add_token_per_grid
from tests.support.reference_stgridpool import st_gridpool_reference
from vllm_stgridpool.config import STGridPoolConfig, STGridPoolConfigError, STGridPoolSettings
from vllm_stgridpool.models.llava_onevision import (
    STGridPoolLlavaOnevisionForConditionalGeneration as OneVision,
)
from vllm_stgridpool.models.llava_onevision import place_newlines, video_newline_layout

SIDE = 27  # SigLIP 384 / 14
PROMPT = "<|im_start|>user\n<video>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"


def one_newline_per_video(frames: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    return torch.cat((frames.reshape(-1, frames.shape[-1]), newline[None]))


def pooled_side(kernel: int | None) -> int:
    """Side of a 27 x 27 frame after pooling: ST-GridPool's windows, or stock bilinear to ceil(27 / 2)."""
    return math.ceil(SIDE / 2) if kernel is None else (SIDE - kernel) // kernel + 1


def video_tokens(frames: int, kernel: int | None, layout: str) -> int:
    side = pooled_side(kernel)
    return frames * side * (side + 1) if layout == "grid" else frames * side * side + 1


# --- the layout itself ---------------------------------------------------------


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 13, 13), (5, 9, 9), (3, 14, 14), (2, 3, 5)])
def test_grid_layout_is_add_token_per_grid(frames, height, width):
    pooled = torch.randn(frames, height, width, 6, dtype=torch.float64)
    newline = torch.randn(6, dtype=torch.float64)
    placed = place_newlines(pooled.reshape(-1, 6), frames, (height, width), newline, "grid")
    assert placed.shape == (frames * height * (width + 1), 6)
    assert torch.equal(placed, add_token_per_grid(pooled, newline))


def test_video_layout_is_one_newline_at_the_end():
    pooled = torch.randn(4, 13, 13, 6, dtype=torch.float64)
    newline = torch.randn(6, dtype=torch.float64)
    placed = place_newlines(pooled.reshape(-1, 6), 4, (13, 13), newline, "video")
    assert torch.equal(placed, one_newline_per_video(pooled, newline))


def model_stand_in(settings: STGridPoolSettings | None, layout: str, dim: int = 8):
    """The plugin's LLaVA-OneVision video path with an identity tower and projector.

    "Pixels" are already (T, 27 * 27, D) features; stock pooling is vLLM's
    (bilinear to ceil(27 / 2), written out here).
    """
    model = types.SimpleNamespace(
        vision_tower=lambda pixels, feature_select_strategy: pixels,
        multi_modal_projector=lambda features: features,
        config=types.SimpleNamespace(vision_feature_select_strategy="full"),
        stgridpool_settings=settings if settings is None or settings.enabled else None,
        video_newline=layout,
        patch_grid=(SIDE, SIDE),
        image_newline=torch.randn(dim, dtype=torch.float64),
        apply_pooling=lambda x: F.interpolate(
            x.view(-1, SIDE, SIDE, x.shape[-1]).permute(0, 3, 1, 2), size=(14, 14), mode="bilinear"
        ).permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[-1]),
    )
    model._pooled_grid = types.MethodType(OneVision._pooled_grid, model)
    return model


@pytest.mark.parametrize("frames", [1, 8, 17])
@pytest.mark.parametrize("kernel", [2, 3, None])
def test_model_embeds_videos_in_the_grid_layout(frames, kernel):
    """Pooling (reference ST-GridPool, or stock bilinear) then LLaVA-NeXT's grid layout, token for token."""
    settings = STGridPoolSettings.from_dict(
        {"enabled": False} if kernel is None else {"kernel_size": kernel}
    )
    model = model_stand_in(settings, "grid")
    features = torch.randn(frames, SIDE * SIDE, 8, dtype=torch.float64)
    (embedded,) = OneVision._embed_videos(model, {"pixel_values_videos": [features]}, None)

    grid = features.view(frames, SIDE, SIDE, 8)
    if kernel is None:
        pooled = F.interpolate(grid.permute(0, 3, 1, 2), size=(14, 14), mode="bilinear").permute(0, 2, 3, 1)
    else:
        pooled = st_gridpool_reference(grid, kernel_size=kernel)
    expected = add_token_per_grid(pooled, model.image_newline)
    assert embedded.shape == (video_tokens(frames, kernel, "grid"), 8)
    torch.testing.assert_close(embedded, expected, rtol=1e-9, atol=1e-9)


def test_model_keeps_each_videos_own_config_in_one_batch():
    """Two videos, two kernels (per-request settings), one call: each in its own grid."""
    from vllm_stgridpool.serving.config_rows import config_to_row

    model = model_stand_in(STGridPoolSettings(), "grid")
    videos = [torch.randn(t, SIDE * SIDE, 8, dtype=torch.float64) for t in (4, 6)]
    rows = torch.tensor([config_to_row(STGridPoolConfig(kernel_size=k)) for k in (2, 3)], dtype=torch.float64)
    embedded = OneVision._embed_videos(model, {"pixel_values_videos": videos}, rows)
    for video, kernel, out in zip(videos, (2, 3), embedded):
        pooled = st_gridpool_reference(video.view(-1, SIDE, SIDE, 8), kernel_size=kernel)
        torch.testing.assert_close(out, add_token_per_grid(pooled, model.image_newline), rtol=1e-9, atol=1e-9)


# --- which layout a server uses -----------------------------------------------


@pytest.mark.parametrize(
    ("checkpoint", "layout"),
    [
        ("llava-hf/LLaVA-Video-7B-Qwen2-hf", "grid"),
        ("Isotr0py/LLaVA-Video-7B-Qwen2-hf", "grid"),
        ("/models/llava-video-7b", "grid"),
        ("/cache/hub/models--llava-hf--LLaVA-Video-7B-Qwen2-hf/snapshots/abc", "grid"),
        ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "video"),
        ("llava-hf/LLaVA-NeXT-Video-7B-hf", "video"),
        ("/models/onevision", "video"),
    ],
)
def test_llava_video_checkpoints_default_to_the_grid_layout(checkpoint, layout):
    assert video_newline_layout(STGridPoolSettings(), checkpoint) == layout
    assert video_newline_layout(STGridPoolSettings.from_dict({"enabled": False}), checkpoint) == layout


def test_the_server_setting_wins_and_an_inactive_plugin_keeps_vllms_layout():
    grid = STGridPoolSettings.from_dict({"video_newline": "grid"})
    video = STGridPoolSettings.from_dict({"video_newline": "video"})
    assert video_newline_layout(grid, "/models/onevision") == "grid"
    assert video_newline_layout(video, "llava-hf/LLaVA-Video-7B-Qwen2-hf") == "video"
    assert video_newline_layout(None, "llava-hf/LLaVA-Video-7B-Qwen2-hf") == "video"


@pytest.mark.parametrize("value", ["row", "GRID", 1, True, ["grid"], {"grid": 1}])
def test_bad_layout_names_the_field_and_the_values(value):
    with pytest.raises(STGridPoolConfigError, match=r'video_newline must be "video" or "grid"') as error:
        STGridPoolSettings.from_dict({"video_newline": value})
    assert repr(value) in str(error.value)


# --- the processor vLLM builds for the replicas ----------------------------------


@pytest.fixture(scope="module")
def make_processor():
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_stgridpool.plugin import register

    register()

    def make(checkpoint, stgridpool: dict):
        model_config = ModelConfig(
            model=str(checkpoint),
            hf_overrides={"stgridpool": stgridpool},
            dtype="float32",
            limit_mm_per_prompt={"video": 1},
        )
        return MULTIMODAL_REGISTRY.create_processor(model_config)

    return make


def prompt_tokens(processor, frames: int, request: dict | None = None, prompt: str = PROMPT) -> int:
    video = np.random.default_rng(frames).integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8)
    items = processor.info.parse_mm_data({"video": video})
    kwargs = {} if request is None else {"stgridpool": request}
    return len(processor(prompt, items, hf_processor_mm_kwargs=kwargs)["prompt_token_ids"])


def text_tokens(checkpoint, prompt: str = PROMPT) -> int:
    """Prompt tokens other than the one ``<video>`` placeholder, from the checkpoint's tokenizer."""
    return len(AutoTokenizer.from_pretrained(checkpoint)(prompt)["input_ids"]) - 1


FRAMES = (1, 7, 16, 33)


def test_llava_video_counts_its_grid_for_every_frame_count_and_kernel(make_processor, llava_video_replica):
    processor = make_processor(llava_video_replica, {})
    text = text_tokens(llava_video_replica)
    for frames in FRAMES:
        assert prompt_tokens(processor, frames) == text + video_tokens(frames, 2, "grid"), frames
        for kernel in (3, 4):
            counted = prompt_tokens(processor, frames, {"kernel_size": kernel})
            assert counted == text + video_tokens(frames, kernel, "grid"), (frames, kernel)


def test_stock_pooling_in_the_grid_layout(make_processor, llava_video_replica):
    processor = make_processor(llava_video_replica, {"enabled": False})
    text = text_tokens(llava_video_replica)
    for frames in FRAMES:
        assert prompt_tokens(processor, frames) == text + video_tokens(frames, None, "grid"), frames


def test_the_server_setting_switches_either_checkpoint(make_processor, llava_video_replica, onevision_replica):
    as_published = make_processor(llava_video_replica, {"video_newline": "video"})
    as_llava_video = make_processor(onevision_replica, {"video_newline": "grid", "kernel_size": 3})
    onevision = make_processor(onevision_replica, {})
    text = text_tokens(onevision_replica)
    assert text == text_tokens(llava_video_replica)
    for frames in (1, 16):
        assert prompt_tokens(as_published, frames) == text + video_tokens(frames, 2, "video")
        assert prompt_tokens(as_llava_video, frames) == text + video_tokens(frames, 3, "grid")
        assert prompt_tokens(onevision, frames) == text + video_tokens(frames, 2, "video")


def test_a_request_cannot_switch_layouts(make_processor, llava_video_replica):
    processor = make_processor(llava_video_replica, {})
    for layout in ("video", "grid"):
        with pytest.raises(STGridPoolConfigError, match="unknown field `video_newline`"):
            prompt_tokens(processor, 4, {"video_newline": layout})


def test_next_video_has_no_grid_layout(make_processor, next_video_replica):
    processor = make_processor(next_video_replica, {"video_newline": "grid"})
    with pytest.raises(STGridPoolConfigError, match='video_newline "grid"'):
        prompt_tokens(processor, 4, prompt="USER: <video>\nWhat happens? ASSISTANT:")
