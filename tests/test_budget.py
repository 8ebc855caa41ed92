"""The video-token budget rule (``vllm_stgridpool.serving.budget``), checked against a brute-force reading of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_stgridpool.serving.budget import fit_video, sample_frames
from vllm_stgridpool.config import STGridPoolConfigError


def onevision_tokens(frames: int, kernel: int, side: int = 27) -> int:
    """The spec's count for LLaVA-OneVision: T * H' * W' + 1 newline."""
    out = (side - kernel) // kernel + 1
    return frames * out * out + 1


def grid_tokens(frames: int, kernel: int, side: int = 27) -> int:
    """LLaVA-Video's grid layout: a newline after every row of every frame."""
    out = (side - kernel) // kernel + 1
    return frames * out * (out + 1)


def fit(num_frames, budget, *, kernel=2, min_frames=16, max_kernel=4, tokens=onevision_tokens, side=27):
    return fit_video(
        num_frames, kernel, budget, min_frames=min_frames, max_kernel_size=max_kernel,
        tokens=tokens, kernel_fits=lambda k: k <= side,
    )


def brute_force(num_frames, budget, *, kernel, min_frames, max_kernel, tokens):
    """The README's rule, read literally, by enumeration."""
    if tokens(num_frames, kernel) <= budget:
        return num_frames, kernel
    wanted = min(min_frames, num_frames)
    kernels = range(kernel, max(max_kernel, kernel) + 1)
    most = {k: max((f for f in range(num_frames + 1) if tokens(f, k) <= budget), default=0) for k in kernels}
    for k in kernels:
        if most[k] >= wanted:
            return most[k], k
    frames = most[kernels[-1]]
    if frames == 0:
        return None
    return frames, min(k for k in kernels if tokens(frames, k) <= budget)


@pytest.mark.parametrize(
    "budget, frames, kernel, tokens",
    [
        (None, 64, 2, 64 * 169 + 1),
        (20000, 64, 2, 64 * 169 + 1),
        (8192, 48, 2, 48 * 169 + 1),
        (4096, 24, 2, 24 * 169 + 1),
        (2048, 25, 3, 25 * 81 + 1),
        (1024, 28, 4, 28 * 36 + 1),
        (512, 14, 4, 14 * 36 + 1),
        (37, 1, 4, 37),
    ],
)
def test_the_readme_table_for_a_64_frame_27x27_video(budget, frames, kernel, tokens):
    chosen = fit(64, budget)
    assert (chosen.frames, chosen.kernel_size, chosen.tokens) == (frames, kernel, tokens)
    assert chosen.limited == (budget is not None and budget < 64 * 169 + 1)


def test_nothing_fits_names_the_smallest_budget_that_works():
    with pytest.raises(STGridPoolConfigError, match="use max_video_tokens >= 37"):
        fit(64, 36)
    fit(64, 37)


def test_a_short_video_keeps_all_its_frames_if_they_fit_at_some_kernel():
    # 8 frames at k=2 cost 1353 > 1000 and only 5 fit; min(16, 8) = 8 are wanted, so k=3 (649 tokens)
    assert fit(8, 1000)[:3] == (8, 3, 8 * 81 + 1)


@settings(max_examples=400, deadline=None)
@given(
    num_frames=st.integers(1, 300),
    budget=st.integers(1, 60000),
    kernel=st.integers(1, 5),
    min_frames=st.integers(1, 64),
    max_kernel=st.integers(1, 9),
    layout=st.sampled_from(["video", "grid"]),
)
def test_never_over_budget_maximal_and_idempotent(num_frames, budget, kernel, min_frames, max_kernel, layout):
    tokens = onevision_tokens if layout == "video" else grid_tokens
    expected = brute_force(num_frames, budget, kernel=kernel, min_frames=min_frames, max_kernel=max_kernel, tokens=tokens)
    if expected is None:
        with pytest.raises(STGridPoolConfigError, match="max_video_tokens"):
            fit(num_frames, budget, kernel=kernel, min_frames=min_frames, max_kernel=max_kernel, tokens=tokens)
        return
    chosen = fit(num_frames, budget, kernel=kernel, min_frames=min_frames, max_kernel=max_kernel, tokens=tokens)
    assert (chosen.frames, chosen.kernel_size) == expected
    assert chosen.tokens == tokens(chosen.frames, chosen.kernel_size) <= budget
    again = fit(chosen.frames, budget, kernel=kernel, min_frames=min_frames, max_kernel=max_kernel, tokens=tokens)
    assert (again.frames, again.kernel_size, again.tokens) == (chosen.frames, chosen.kernel_size, chosen.tokens)


@pytest.mark.parametrize("num_frames, keep", [(64, 24), (300, 64), (10, 10), (10, 1), (7, 3)])
def test_frames_are_spread_as_the_loader_spreads_them(num_frames, keep):
    import numpy as np

    picked = sample_frames(num_frames, keep)
    assert len(picked) == keep and picked == sorted(set(picked))
    assert picked == np.linspace(0, num_frames - 1, keep).astype(int).tolist()
