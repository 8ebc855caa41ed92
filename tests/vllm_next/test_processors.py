"""The plugin's processors on vLLM 0.33, through vLLM's own multimodal processing API.

A real ``ModelConfig`` of each tiny checkpoint, the processor vLLM's registry
builds for it, and real frames: the prompt token counts must follow the
spec's formula, ``T * ((G - k) // k + 1) ** 2`` video tokens (+1 newline for
LLaVA-OneVision), computed here from the grid; inactive, vLLM's stock counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

ONEVISION = ("onevision_checkpoint", "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n", 27, 1)
NEXT_VIDEO = ("next_video_checkpoint", "USER: <video>\nWhat happens? ASSISTANT:", 24, 0)


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    from vllm_stgridpool import plugin

    plugin.register()


def processor_for(checkpoint, **config):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    model_config = ModelConfig(
        model=str(checkpoint), max_model_len=16384, dtype="float32", limit_mm_per_prompt={"video": 2}, **config
    )
    return model_config, MULTIMODAL_REGISTRY.create_processor(model_config)


def frames(num_frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 96, 128, 3), dtype=np.uint8)


def processed(processor, prompt: str, videos, **mm_kwargs):
    items = processor.info.parse_mm_data({"video": list(videos)})
    return processor(prompt, items, hf_processor_mm_kwargs=mm_kwargs)


def per_frame(grid: int, kernel: int) -> int:
    return ((grid - kernel) // kernel + 1) ** 2


def text_tokens(checkpoint, prompt: str) -> int:
    return len(AutoTokenizer.from_pretrained(checkpoint)(prompt)["input_ids"]) - 1  # less the one <video>


@pytest.mark.parametrize("family", [ONEVISION, NEXT_VIDEO], ids=["onevision", "next_video"])
@pytest.mark.parametrize(("kernel", "num_frames"), [(2, 1), (2, 7), (2, 64), (3, 16)])
def test_active_token_counts_follow_the_formula(request, family, kernel, num_frames):
    fixture, prompt, grid, extra = family
    checkpoint = request.getfixturevalue(fixture)
    _, processor = processor_for(checkpoint, hf_overrides={"stgridpool": {"kernel_size": kernel}})
    out = processed(processor, prompt, [frames(num_frames)])
    video_tokens = num_frames * per_frame(grid, kernel) + extra
    assert [p.length for p in out["mm_placeholders"]["video"]] == [video_tokens]
    assert len(out["prompt_token_ids"]) == text_tokens(checkpoint, prompt) + video_tokens


@pytest.mark.parametrize("family", [ONEVISION, NEXT_VIDEO], ids=["onevision", "next_video"])
def test_inactive_counts_are_vllm_stock(request, family):
    """Stock pooling: OneVision bilinear to ceil(27 / 2) = 14 per side, NeXT-Video stride 2 to 12."""
    fixture, prompt, grid, extra = family
    checkpoint = request.getfixturevalue(fixture)
    _, processor = processor_for(checkpoint)
    stock_side = -(-grid // 2)
    out = processed(processor, prompt, [frames(5)])
    assert [p.length for p in out["mm_placeholders"]["video"]] == [5 * stock_side**2 + extra]


def test_two_videos_of_different_lengths_and_a_cheaper_request_override(onevision_checkpoint):
    fixture, prompt, grid, extra = ONEVISION
    _, processor = processor_for(onevision_checkpoint, hf_overrides={"stgridpool": {}})
    two = prompt.replace("<video>", "<video><video>")
    out = processed(processor, two, [frames(9, 1), frames(4, 2)], stgridpool={"kernel_size": 3})
    assert [p.length for p in out["mm_placeholders"]["video"]] == [9 * per_frame(grid, 3) + 1, 4 * per_frame(grid, 3) + 1]


def test_profiling_and_frame_sampling_defaults_on_0_33(onevision_checkpoint):
    """Stock 0.33 still profiles at most 16 frames per video; with the plugin active it is max_frames
    (64), the sampling default follows, and uploads go to the plugin's loader (header limits, decode pool):
    0.33's opencv reads 1-frame videos but still decodes in the API server with no size limit."""
    model_config, active = processor_for(onevision_checkpoint, hf_overrides={"stgridpool": {}})
    _, stock = processor_for(onevision_checkpoint)
    assert stock.info.get_num_frames_with_most_features(16384, {"video": 1}) == 16
    assert active.info.get_num_frames_with_most_features(16384, {"video": 1}) == 64
    assert model_config.multimodal_config.media_io_kwargs["video"] == {"num_frames": 64, "video_backend": "pyav"}


def test_more_frames_than_max_frames_is_rejected_before_the_model(onevision_checkpoint):
    _, processor = processor_for(onevision_checkpoint, hf_overrides={"stgridpool": {"max_frames": 8}})
    with pytest.raises(ValueError, match="max_frames"):
        processed(processor, ONEVISION[1], [frames(9)])


def test_the_class_override_guard_passes_on_0_33():
    """Every vLLM internal the model classes override or call is there, as on 0.32, with the same
    parameters (compat/model_internals.py; tests/test_model_guard.py, which this environment runs too,
    provokes its refusals)."""
    from vllm_stgridpool import plugin
    from vllm_stgridpool.compat import model_internals, vllm_version

    assert vllm_version().startswith("0.33.")
    assert model_internals.GUARD.why_not(vllm_version()) is None
    assert plugin.refusal(vllm_version()) is None
