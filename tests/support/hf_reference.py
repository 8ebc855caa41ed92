"""transformers' own LLaVA-OneVision with the plain reference pooling: the offline oracle.

Nothing here imports the plugin: the video's placeholder count comes from
the spec's formula and the pooling from ``tests/reference_stgridpool.py``.
"""

from __future__ import annotations

import functools

import torch

from tests.support.reference_stgridpool import st_gridpool_reference

DEFAULTS = {"grid_sizes": (4, 4, 4), "grid_strides": (2, 4, 8), "kernel_size": 2, "temperature": 1.0, "norm_p": 2.0}


@functools.lru_cache(maxsize=2)
def load(checkpoint: str):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return processor, model


def first_step_logprobs(checkpoint, text: str, frames, settings: dict, top: int = 5) -> list[float]:
    """The ``top`` largest next-token logprobs for ``text`` with one video, pooled with ``settings``."""
    processor, model = load(str(checkpoint))
    config = {**DEFAULTS, **settings}
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    k = config["kernel_size"]
    out_side = (side - k) // k + 1

    def pool(features: torch.Tensor) -> torch.Tensor:  # (T, side*side, D) of one video
        video = features.reshape(features.shape[0], side, side, -1).double()
        pooled = st_gridpool_reference(video, **config)
        return pooled.reshape(features.shape[0], -1, features.shape[-1]).to(features.dtype)

    processor.replace_video_token = lambda inputs, video_idx, **_: processor.video_token * (
        len(inputs["pixel_values_videos"][video_idx]) * out_side * out_side + 1
    )
    model.model.apply_pooling = pool
    inputs = processor(text=text, videos=[frames], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    return sorted(torch.log_softmax(logits, dim=-1).topk(top).values.tolist(), reverse=True)
