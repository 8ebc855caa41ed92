"""transformers' own LLaVA-OneVision with the plain reference pooling: the offline oracle.

Nothing here imports the plugin: the video's placeholder count comes from
the spec's formula and the pooling from ``tests/support/reference_stgridpool.py``.
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


def greedy_answer(checkpoint, text: str, frames, settings: dict, max_new_tokens: int = 1) -> dict:
    """transformers' answer for ``text`` with one video pooled with ``settings`` (the spec's defaults
    for what is left out): prompt length, greedy tokens and the first step's logprobs over the whole
    vocabulary (float64)."""
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
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    return {
        "prompt_len": prompt_len,
        "tokens": out.sequences[0, prompt_len:].tolist(),
        "first": torch.log_softmax(out.scores[0][0].double(), dim=-1),
    }


def first_step_logprobs(checkpoint, text: str, frames, settings: dict, top: int = 5) -> list[float]:
    """The ``top`` largest next-token logprobs for ``text`` with one video, pooled with ``settings``."""
    first = greedy_answer(checkpoint, text, frames, settings)["first"]
    return sorted(first.topk(top).values.tolist(), reverse=True)


def distance(served: dict, reference: torch.Tensor) -> float:
    """Largest difference between served first-step logprobs (token id -> logprob) and a reference's."""
    return max(abs(reference[int(token)].item() - logprob) for token, logprob in served.items())


# Stages a broken plugin could run instead of ST-GridPool, each with ST-GridPool's token count:
# name -> (settings changed, frames shifted by one). A logprob tolerance that claims "equal to
# transformers" must reject each of them in the same test (assert_rejects_wrong_stages).
WRONG_STAGES = {
    "no pyramid (NSP alone)": ({"grid_sizes": (), "grid_strides": ()}, False),
    "frames shifted by one": ({}, True),
}


def shifted(frames):
    """The video with every frame one place later (the last first): a PTG that picks the wrong frames."""
    import numpy as np

    return np.roll(frames, 1, axis=0)


def assert_rejects_wrong_stages(served: dict, wrong_first, tol: float, label: str, stages=WRONG_STAGES) -> None:
    """``served`` first-step logprobs (token id -> logprob) are farther than ``tol`` from each wrong
    stage's; ``wrong_first(settings, shifted)`` gives that stage's full first-step logprobs."""
    for name, (settings, frames_shifted) in stages.items():
        measured = distance(served, wrong_first(settings, frames_shifted))
        print(f"\n{label}: {measured:.2e} from {name} (tolerance {tol:.0e})")
        assert measured > tol, f"{label}: tolerance {tol} does not reject {name} ({measured:.2e})"
