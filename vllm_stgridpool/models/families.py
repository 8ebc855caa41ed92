"""The model families the plugin serves, by vLLM architecture name.

One table, read by the plugin's registration (which class replaces vLLM's)
and by the start-up hook that sizes frame sampling (how many placeholder
tokens a video adds beyond its frames), without importing model code.
"""

from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    model_class: str  # "module:Class", registered lazily with vLLM's ModelRegistry
    video_extra_tokens: int  # placeholders per video beyond its frames' tokens


FAMILIES = {
    # One image_newline appended to every video (in the "video" layout).
    "LlavaOnevisionForConditionalGeneration": Family(
        "vllm_stgridpool.models.llava_onevision:STGridPoolLlavaOnevisionForConditionalGeneration", 1
    ),
    # No newline tokens for video.
    "LlavaNextVideoForConditionalGeneration": Family(
        "vllm_stgridpool.models.llava_next_video:STGridPoolLlavaNextVideoForConditionalGeneration", 0
    ),
}
