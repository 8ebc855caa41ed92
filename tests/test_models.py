"""Model-side pieces that need no engine: LoRA token accounting and per-video pooling groups."""

from __future__ import annotations

import types

import torch

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.serving.config_rows import config_to_row
from vllm_stgridpool.config import STGridPoolSettings
from vllm_stgridpool.models.common import pool_videos, video_configs
from vllm_stgridpool.models.llava_next_video import STGridPoolLlavaNextVideoForConditionalGeneration as NextVideo


def next_video_stand_in(settings):
    return types.SimpleNamespace(stgridpool_settings=settings, patch_grid=(24, 24), patch_grid_length=24)


def test_lora_token_counts_follow_the_server_config():
    model = next_video_stand_in(STGridPoolSettings.from_dict({"kernel_size": 3}))
    counts = NextVideo.get_mm_lora_token_counts(model, modality="video", mm_kwargs=None, num_mm_embeds=16 * 64)
    assert counts == (16 * 24 * 24, 16 * 8 * 8)


def test_lora_token_counts_follow_the_request_config():
    model = next_video_stand_in(STGridPoolSettings())
    row = torch.tensor(config_to_row(STGridPoolConfig(kernel_size=3)), dtype=torch.float64)
    counts = NextVideo.get_mm_lora_token_counts(
        model, modality="video", mm_kwargs={"stgridpool_config": row}, num_mm_embeds=5 * 64
    )
    assert counts == (5 * 24 * 24, 5 * 64)


def test_pool_videos_pools_each_video_on_its_own():
    """Each video pooled on its own, as a view of its features (no stacked copy); stock videos keep stock pooling."""
    grid = (6, 6)
    videos = [torch.randn(t, 36, 4, dtype=torch.float64) for t in (8, 5, 8, 3)]
    configs = [STGridPoolConfig(grid_sizes=(2,), grid_strides=(2,)), None, STGridPoolConfig(grid_sizes=(2,), grid_strides=(2,)), STGridPoolConfig(kernel_size=3)]

    def stock(frames):  # (T, H*W, D) -> (T, 1, D): a stand-in for the model's own pooling
        return frames.mean(dim=1, keepdim=True)

    pooled = pool_videos(videos, configs, grid, stock)
    for video, config, out in zip(videos, configs, pooled):
        if config is None:
            expected = stock(video).reshape(-1, 4)
        else:
            expected = st_gridpool(video.view(-1, 6, 6, 4), config).reshape(-1, 4)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_video_configs_fall_back_to_the_server_setting():
    settings = STGridPoolSettings()
    assert video_configs(None, settings, 2) == [settings.pool, settings.pool]
    assert video_configs(None, None, 1) == [None]
    rows = torch.tensor([config_to_row(STGridPoolConfig(kernel_size=3))] * 2, dtype=torch.float64)
    assert video_configs(rows, settings, 2) == [STGridPoolConfig(kernel_size=3)] * 2
