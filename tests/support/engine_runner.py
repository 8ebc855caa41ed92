"""Run a real ``vllm.LLM`` in a fresh process and report prompt lengths and greedy tokens.

Each test module that needs an engine sends one JSON job on stdin: the
environment decides which plugins vLLM loads (it reads ``VLLM_PLUGINS`` once
per process), so stock and plugin engines must live in separate processes.
Videos are deterministic noise arrays built from a seed, so two processes see
identical inputs.
"""

from __future__ import annotations

import json
import sys

import numpy as np

PROMPT = "<|im_start|>user\n<video>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n"
TOP_LOGPROBS = 5
NEXT_VIDEO_PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"


def video(num_frames: int, seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_frames, *size, 3), dtype=np.uint8)


def run(job: dict) -> list:
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], **job.get("llm_kwargs", {}))
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0, logprobs=TOP_LOGPROBS)
    results = []
    for batch in job["batches"]:
        prompts = [_prompt(job, item) for item in batch]
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            results.append([_result(output) for output in outputs])
        except Exception as exc:  # reported to the test harness, which decides if it was expected
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    return results


def _result(output) -> dict:
    """Prompt length, greedy tokens and the first step's top logprobs (token id -> logprob)."""
    first = output.outputs[0].logprobs[0]
    return {
        "prompt_len": len(output.prompt_token_ids),
        "tokens": list(output.outputs[0].token_ids),
        "first_logprobs": {str(token): item.logprob for token, item in sorted(first.items())},
    }


def _prompt(job: dict, item: dict) -> dict:
    """A video item ``{"frames": T}``, or an image item ``{"image": seed}``."""
    if "image" in item:
        picture = video(1, item["image"], size=(300, 400))[0]
        return {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": picture}}
    return {
        "prompt": job.get("prompt", PROMPT),
        "multi_modal_data": {"video": video(item["frames"], item.get("seed", 0))},
        **({"mm_processor_kwargs": item["mm"]} if "mm" in item else {}),
    }


if __name__ == "__main__":
    print("ENGINE_RESULT " + json.dumps(run(json.load(sys.stdin))), flush=True)
