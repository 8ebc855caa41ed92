"""The plugin inside a real vLLM engine (offline ``LLM.generate``), on tiny local checkpoints.

Every expected token count comes from the tokenizer (text tokens) plus the
spec's formula ``T * H' * W'`` (+1 newline for LLaVA-OneVision), computed
here from the grid, not from the plugin.
"""

from __future__ import annotations

import functools
import json

import pytest
from transformers import AutoTokenizer

from tests.support.engine_runner import NEXT_VIDEO_PROMPT, PROMPT
from tests.support.engines import run_engine, two_at_a_time

pytestmark = pytest.mark.engine

FRAME_COUNTS = (1, 7, 16, 33)
# vLLM against transformers (both float32 on the CPU; measured 2.2e-7 and 2.3e-7), a batch against
# one request at a time and tensor parallelism against one worker (4.8e-7 each). Each test that uses
# one shows it rejects wrong stages with ST-GridPool's token count (measured distances are printed):
# no pyramid (7e-3 to 1e-2), frames shifted by one (7e-3 to 2.4e-2), and plain averaging in place of
# NSP's weights (9.3e-5 to 1.2e-4: on the tiny random model those weights are nearly uniform at
# temperature 1, which is why the tolerances are this tight).
PARITY = 1e-5
BATCHING = 1e-5
TENSOR_PARALLEL = 1e-5
PLAIN_AVERAGING = {"plain averaging (temperature 0)": ({"temperature": 0.0}, False)}


def same_answer(a: dict, b: dict, tol: float = BATCHING) -> bool:
    """Equal prompt length and greedy tokens, first-step logprobs equal up to batching's rounding."""
    if (a["prompt_len"], a["tokens"]) != (b["prompt_len"], b["tokens"]):
        return False
    if a["first_logprobs"].keys() != b["first_logprobs"].keys():
        return False
    return all(abs(a["first_logprobs"][t] - b["first_logprobs"][t]) <= tol for t in a["first_logprobs"])


def per_frame(grid: int, kernel: int) -> int:
    return ((grid - kernel) // kernel + 1) ** 2


def text_tokens(checkpoint, prompt: str) -> int:
    """Prompt tokens other than the single ``<video>`` placeholder."""
    return len(AutoTokenizer.from_pretrained(checkpoint)(prompt)["input_ids"]) - 1


ACTIVE_BATCHES = [[{"frames": t}] for t in FRAME_COUNTS] + [
    [{"frames": 16, "seed": 1}, {"frames": 10, "seed": 2}, {"frames": 5, "seed": 3}],  # 4
    [{"frames": 10, "seed": 2}],  # 5
    [{"frames": 5, "seed": 3}],  # 6
    [{"frames": 16, "seed": 1}],  # 7
    [{"frames": 16, "mm": {"stgridpool": {"kernel_size": 3}}}],  # 8
    [{"frames": 16, "mm": {"stgridpool": {"kernel_size": 1}}}],  # 9: costs more: rejected
    [{"frames": 65}],  # 10: more than max_frames
    [{"frames": 16}, {"frames": 16, "mm": {"stgridpool": {"kernel_size": 3}}}],  # 11
    [{"frames": 16, "mm": {"stgridpool": {"kernel_size": 0}}}],  # 12
    [{"image": 5}],  # 13: images keep the stock path
]
# Not --enforce-eager: vLLM's CPU worker then warms the model up (profile_run) with grad enabled, and
# the stage runs there on a dummy video. Dynamo with its "eager" backend keeps the start-up short.
COMPILED_WARM_UP = {"enforce_eager": False, "compilation_config": {"mode": 2, "backend": "eager"}}
STOCK_BATCHES = [[{"frames": 7}], [{"frames": 16, "seed": 4}], [{"image": 5}]]
NEXT_VIDEO_BATCHES = [[{"frames": t}] for t in FRAME_COUNTS] + [
    [{"frames": 16, "mm": {"stgridpool": {"kernel_size": 3}}}]
]


@pytest.fixture(scope="module")
def engine_runs(onevision_checkpoint, next_video_checkpoint) -> dict:
    """Every engine of the module (each in its own process: ``VLLM_PLUGINS`` is read once per process),
    started two at a time; name -> finished future."""
    onevision = functools.partial(run_engine, onevision_checkpoint)
    runs = {
        "active": lambda: onevision(
            ACTIVE_BATCHES,
            plugins="stgridpool",
            hf_overrides={"stgridpool": {}},
            expect_errors={9, 10, 12},
            llm_kwargs={"limit_mm_per_prompt": {"video": 3}},
        ),
        "tensor_parallel_2": lambda: onevision(
            [[{"frames": 16}]],
            plugins="stgridpool",
            hf_overrides={"stgridpool": {}},
            llm_kwargs={"tensor_parallel_size": 2},
            env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        ),
        "stock": lambda: onevision(STOCK_BATCHES, plugins=""),  # VLLM_PLUGINS allows nothing
        "loaded_but_inactive": lambda: onevision(STOCK_BATCHES, plugins=None),
        "disabled": lambda: onevision(
            STOCK_BATCHES, plugins="stgridpool", hf_overrides={"stgridpool": {"enabled": False}}
        ),
        "next_video": lambda: run_engine(
            next_video_checkpoint, NEXT_VIDEO_BATCHES, plugins="stgridpool", prompt=NEXT_VIDEO_PROMPT,
            llm_kwargs=COMPILED_WARM_UP,
        ),
    }
    return dict(zip(runs, two_at_a_time(*runs.values())))


@pytest.fixture(scope="module")
def transformers_answer(onevision_checkpoint):
    """``answer(frames, seed, settings, shifted=False, new_tokens=1)``: transformers' LLaVA-OneVision on
    the engine runner's video, pooled by the plain reference (tests/support/hf_reference.py)."""
    from tests.support import hf_reference
    from tests.support.engine_runner import video

    answers = {}

    def answer(frames: int, seed: int, settings: dict, shifted: bool = False, new_tokens: int = 1) -> dict:
        key = (frames, seed, json.dumps(settings, sort_keys=True), shifted, new_tokens)
        if key not in answers:
            clip = video(frames, seed)
            if shifted:
                clip = hf_reference.shifted(clip)
            answers[key] = hf_reference.greedy_answer(onevision_checkpoint, PROMPT, clip, settings, max_new_tokens=new_tokens)
        return answers[key]

    return answer


def assert_rejects_wrong_stages(served: dict, answer, frames: int, seed: int, settings: dict, tol: float) -> None:
    """``served`` is farther than ``tol`` from transformers' answer with each wrong stage."""
    from tests.support import hf_reference

    def wrong_first(change: dict, frames_shifted: bool):
        return answer(frames, seed, {**settings, **change}, shifted=frames_shifted)["first"]

    label = f"{frames} frames, {settings or 'defaults'}"
    stages = {**hf_reference.WRONG_STAGES, **PLAIN_AVERAGING}
    hf_reference.assert_rejects_wrong_stages(served["first_logprobs"], wrong_first, tol, label, stages)


def largest_difference(a: dict, b: dict) -> float:
    """Largest difference between two served answers' first-step logprobs (same tokens)."""
    assert a["first_logprobs"].keys() == b["first_logprobs"].keys()
    return max(abs(a["first_logprobs"][t] - b["first_logprobs"][t]) for t in a["first_logprobs"])


@pytest.fixture(scope="module")
def onevision_active(engine_runs):
    return engine_runs["active"].result()


@pytest.fixture(scope="module")
def stock_onevision(engine_runs):
    """vLLM without the plugin (``VLLM_PLUGINS`` allows nothing)."""
    return engine_runs["stock"].result()


def test_onevision_prompt_tokens_follow_the_formula(onevision_active, onevision_checkpoint):
    text = text_tokens(onevision_checkpoint, PROMPT)
    for t, result in zip(FRAME_COUNTS, onevision_active):
        assert result[0]["prompt_len"] == text + t * per_frame(27, 2) + 1, t


def test_the_paper_setting_saves_tokens_against_stock(onevision_active, stock_onevision):
    """Same 16-frame prompt: the plugin saves 27 tokens per frame against a real stock engine."""
    saved = stock_onevision[1][0]["prompt_len"] - onevision_active[2][0]["prompt_len"]
    assert saved == 16 * (per_frame(28, 2) - per_frame(27, 2))  # stock pools 27 -> ceil(27/2) = 14


def test_mixed_frame_counts_in_one_batch_equal_one_at_a_time(onevision_active, transformers_answer):
    batch = onevision_active[4]
    singles = [onevision_active[7][0], onevision_active[5][0], onevision_active[6][0]]
    assert all(same_answer(a, b, tol=BATCHING) for a, b in zip(batch, singles, strict=True))
    print(f"\nbatched against one at a time: {max(map(largest_difference, batch, singles)):.2e}")
    assert_rejects_wrong_stages(batch[0], transformers_answer, 16, 1, {}, BATCHING)


def test_request_override_changes_the_count(onevision_active, onevision_checkpoint):
    text = text_tokens(onevision_checkpoint, PROMPT)
    assert onevision_active[8][0]["prompt_len"] == text + 16 * per_frame(27, 3) + 1


def test_override_that_costs_more_is_rejected(onevision_active):
    error = onevision_active[9]["error"]
    assert "kernel_size" in error and "more than this server" in error


def test_bad_override_value_is_rejected(onevision_active):
    assert "kernel_size" in onevision_active[12]["error"]


def test_more_frames_than_max_frames_is_rejected(onevision_active):
    error = onevision_active[10]["error"]
    assert "max_frames" in error and "65" in error


def test_two_settings_in_one_batch(onevision_active, onevision_checkpoint, transformers_answer):
    """Each request's kernel reached the model: the coarse one's answer is transformers' with the
    reference pooled at kernel 3, and no wrong stage at kernel 3 passes for it."""
    from tests.support.hf_reference import distance

    text = text_tokens(onevision_checkpoint, PROMPT)
    default, coarse = onevision_active[11]
    assert default["prompt_len"] == text + 16 * 169 + 1
    assert coarse["prompt_len"] == text + 16 * 81 + 1
    assert same_answer(default, onevision_active[2][0], tol=BATCHING)
    reference = transformers_answer(16, 0, {"kernel_size": 3}, new_tokens=8)
    assert (coarse["prompt_len"], coarse["tokens"]) == (reference["prompt_len"], reference["tokens"])
    measured = distance(coarse["first_logprobs"], reference["first"])
    print(f"\nkernel 3 in a mixed batch: {measured:.2e} from transformers")
    assert measured <= PARITY
    assert_rejects_wrong_stages(coarse, transformers_answer, 16, 0, {"kernel_size": 3}, PARITY)


def test_not_active_is_stock(engine_runs, onevision_checkpoint, stock_onevision):
    text = text_tokens(onevision_checkpoint, PROMPT)
    assert stock_onevision[0][0]["prompt_len"] == text + 7 * 196 + 1
    assert engine_runs["loaded_but_inactive"].result() == stock_onevision
    assert engine_runs["disabled"].result() == stock_onevision


def test_images_are_untouched(onevision_active, stock_onevision):
    assert onevision_active[13] == stock_onevision[2]


def test_next_video_prompt_tokens_follow_the_formula(engine_runs, next_video_checkpoint):
    """Also: the engine starts and serves without --enforce-eager (its warm-up runs the stage with grad enabled)."""
    results = engine_runs["next_video"].result()
    text = text_tokens(next_video_checkpoint, NEXT_VIDEO_PROMPT)
    for t, result in zip(FRAME_COUNTS, results):
        assert result[0]["prompt_len"] == text + t * per_frame(24, 2), t
    assert results[-1][0]["prompt_len"] == text + 16 * per_frame(24, 3)


def test_tensor_parallel_2_gives_the_same_tokens(engine_runs, onevision_active, transformers_answer):
    results = engine_runs["tensor_parallel_2"].result()
    assert same_answer(results[0][0], onevision_active[2][0], tol=TENSOR_PARALLEL)
    print(f"\ntensor parallel 2 against 1: {largest_difference(results[0][0], onevision_active[2][0]):.2e}")
    assert_rejects_wrong_stages(results[0][0], transformers_answer, 16, 0, {}, TENSOR_PARALLEL)


def test_parity_with_transformers(onevision_active, transformers_answer):
    """transformers' own LLaVA-OneVision, its video pooling swapped for the plain reference ST-GridPool
    and its processor's count set by the spec's formula; and no wrong stage within the tolerance."""
    from tests.support.hf_reference import distance

    served = onevision_active[2][0]
    reference = transformers_answer(16, 0, {}, new_tokens=8)
    assert (served["prompt_len"], served["tokens"]) == (reference["prompt_len"], reference["tokens"])
    measured = distance(served["first_logprobs"], reference["first"])
    print(f"\n16 frames defaults: {measured:.2e} from transformers")
    assert measured <= PARITY
    assert_rejects_wrong_stages(served, transformers_answer, 16, 0, {}, PARITY)
