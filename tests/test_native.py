"""The fused CPU kernels (vllm_stgridpool/stage/cpu_kernels.py, csrc/): NSP, the area resize, and the plan run in one call.

Expected values come from the plain per-window reference in float64 and
from the PyTorch-ops path; the kernel must be built wherever a C++
compiler exists, and the stage must keep serving where it cannot be built.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tests.support.reference_stgridpool import nsp as reference_nsp

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.stage import cpu_kernels
from vllm_stgridpool.stage import backend, torch_ops
from vllm_stgridpool.stage.plan import PoolFrames, PoolMosaics, Resize


def norm_pool(x, kernel_size, temperature, norm_p):
    """NSP of (..., H, W, D) ``x`` by the fused kernel alone, into a fresh output."""
    height, width, dim = x.shape[-3:]
    k = kernel_size
    out = x.new_empty(*x.shape[:-3], (height - k) // k + 1, (width - k) // k + 1, dim)
    cpu_kernels.norm_pool_into(x, out, kernel_size, temperature, norm_p)
    return out


def randn(*shape, seed, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def test_kernel_is_built_where_a_compiler_exists():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the PyTorch-ops path serves")
    assert cpu_kernels.load() is not None
    assert cpu_kernels.applies("cpu", torch.float32) and cpu_kernels.applies("cpu", torch.bfloat16)
    assert not cpu_kernels.applies("meta", torch.float32)
    assert not cpu_kernels.applies("cpu", torch.float16)  # float16 keeps the PyTorch-ops path
    x = torch.zeros(2, 4, 4, 3)
    assert cpu_kernels.takes_call(x[None], 2.0) and not cpu_kernels.takes_call(x[None], 3.0)  # so do norms other than 1 and 2


# Channel counts: a few (the scalar loop only), and blocks of vectors taken two at a time, then one, plus a
# scalar rest (125 = 2 x 32 + 32 + 29 for float32 and bfloat16, 3 x 2 x 16 + 16 + 13 for float64).
CHANNELS = [7, 125]


@pytest.mark.parametrize("dim", CHANNELS)
@pytest.mark.parametrize("kernel_size", [1, 2, 3, 5])
@pytest.mark.parametrize("temperature, norm_p", [(1.0, 2.0), (-2.5, 1.0), (0.0, 2.0), (30.0, 2.0), (-1e6, 1.0)])
def test_float64_equals_the_reference(kernel_size, temperature, norm_p, dim):
    x = randn(3, 11, 13, dim, seed=kernel_size)
    assert cpu_kernels.takes_call(x[None], norm_p)
    got = norm_pool(x, kernel_size, temperature, norm_p)
    want = reference_nsp(x, kernel_size, temperature, norm_p)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype, ulps_allowed", [(torch.float32, 2.0), (torch.bfloat16, 1.0)])
@pytest.mark.parametrize("kernel_size, temperature", [(2, 1.0), (3, -2.0), (2, 0.5)])
def test_reduced_precision_within_its_rounding(dtype, ulps_allowed, kernel_size, temperature):
    """Error against float64 NSP on the same rounded input, in ulps of the window's largest |x|: bfloat16 sums in
    float32 and rounds once (<= 1); float32 rounds at each of the k * k multiply-adds (<= 2, measured 1.07)."""
    x = randn(8, 27, 27, 64, seed=3, dtype=dtype)
    got = norm_pool(x, kernel_size, temperature, 2.0).double()
    want = reference_nsp(x.double(), kernel_size, temperature, 2.0)
    out_h, out_w = want.shape[1:3]
    windows = x.double()[:, : out_h * kernel_size, : out_w * kernel_size].abs()
    largest = windows.unflatten(1, (out_h, kernel_size)).unflatten(3, (out_w, kernel_size)).amax(dim=(2, 4))
    ulps = (got - want).abs() / (torch.finfo(dtype).eps * largest)
    assert ulps.max().item() <= ulps_allowed


def test_strided_views_are_read_and_written_in_place():
    """The stage hands the kernel frame ranges of a video and rows of a larger output: strides are honoured."""
    video = randn(6, 27, 29, 16, seed=4, dtype=torch.float32)
    view = video[1:5, 2:, 1:28]  # (4, 25, 27, 16), D still innermost
    big = torch.full((4, 15, 16, 16), 7.0)
    out = big[:, 1:13, 2:15]  # (4, 12, 13, 16) inside a larger tensor
    assert cpu_kernels.takes_call(view[None], 2.0)
    cpu_kernels.norm_pool_into(view, out, 2, 1.0, 2.0)
    want = torch_ops.norm_pool(view, 2, 1.0, 2.0)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, 1:13, 2:15] = False
    assert (big[untouched] == 7.0).all()  # nothing written outside the view
    assert torch.equal(video, randn(6, 27, 29, 16, seed=4, dtype=torch.float32))  # input unmodified


def test_d_not_innermost_takes_the_ops_path():
    x = randn(2, 8, 8, 6, seed=5, dtype=torch.float32).transpose(-1, -2)  # stride(-1) != 1
    assert backend.for_call(x[None], 2.0) == backend.TORCH
    torch.testing.assert_close(st_gridpool(x, STGridPoolConfig(grid_sizes=(), grid_strides=())),
                               reference_nsp(x.double(), 2, 1.0, 2.0).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extreme_features_stay_finite(dtype):
    """Tokens at the dtype's largest value (norms and sums overflow), NaN and inf in a window, in the vector
    blocks' channels and in the scalar rest: finite outputs."""
    largest = torch.finfo(dtype).max
    x = torch.full((2, 4, 4, 45), largest, dtype=dtype)
    x[0, 0, 1] = -largest
    x[1, 0, 0, [0, 40]] = float("nan")
    x[1, 2, 2, [5, 44]] = float("inf")
    out = norm_pool(x, 2, 1.0, 2.0)
    assert torch.isfinite(out).all()
    assert out[0, 1, 1].eq(largest).all()  # a window of largest values pools to the largest value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_area_resize_of_extreme_features_is_finite(dtype):
    """Area sums that overflow become the dtype's largest value (with their sign), NaN becomes 0."""
    largest = torch.finfo(dtype).max
    x = torch.full((27, 27, 45), largest, dtype=dtype)
    x[:, :, 10] = -largest
    x[0, 0, [3, 41]] = float("nan")
    out = torch.empty(14, 14, 45, dtype=dtype)
    cpu_kernels.area_resize_into(x, [out], 14, 14)
    assert out[0, 0, [3, 41]].eq(0).all()
    assert out[..., 10].eq(-largest).all()
    out[0, 0, [3, 41]] = largest
    out[..., 10] = largest
    assert out.eq(largest).all()


def test_a_failed_build_warns_once_and_the_stage_serves(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_kernels", None)
    x = randn(8, 27, 27, 4, seed=6)
    cfg = STGridPoolConfig()
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        first = st_gridpool(x, cfg)
        second = st_gridpool(x, cfg)
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert torch.equal(first, second)
    with cpu_kernels.disabled():
        assert torch.equal(first, st_gridpool(x, cfg))


@pytest.mark.parametrize("dim", CHANNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_area_resize_is_area_interpolation_bit_for_bit(dtype, dim):
    """Every shrink up to 30 x 30 (but to 1 x 1, which ATen computes as a mean) equals F.interpolate(mode="area"),
    written into each place cropped to its rows and columns, nothing outside."""
    import torch.nn.functional as F

    checked = 0
    for height in range(1, 31, 3):
        for width in (1, 2, 7, 13, 27, 30):
            x = randn(height, width, dim, seed=height * 31 + width, dtype=dtype, scale=5.0)
            for out_h in sorted({1, 2, (height + 1) // 2, height} - {0}):
                for out_w in sorted({1, 2, (width + 1) // 2, width} - {0}):
                    if (out_h, out_w) == (1, 1) or out_h > height or out_w > width:
                        continue
                    want = F.interpolate(x.permute(2, 0, 1)[None], size=(out_h, out_w), mode="area")[0].permute(1, 2, 0)
                    canvas = torch.full((out_h + 1, 2 * out_w + 1, dim), 7.0, dtype=dtype)
                    whole, cropped = canvas[:out_h, :out_w], canvas[1:, out_w + 1 : 2 * out_w]
                    cpu_kernels.area_resize_into(x, [whole, cropped], out_h, out_w)
                    assert torch.equal(whole, want) and torch.equal(cropped, want[:, : out_w - 1])
                    written = torch.zeros(canvas.shape[:2], dtype=torch.bool)
                    written[:out_h, :out_w] = written[1:, out_w + 1 : 2 * out_w] = True
                    assert (canvas[~written] == 7.0).all()
                    checked += 1
    assert checked > 200


@pytest.mark.parametrize(
    "sizes, strides, kernel_size, dtype, mosaics_only",
    [
        ((4, 4, 4), (2, 4, 8), 2, torch.float32, False),  # the paper's, in segments of 3 frames
        ((4, 4, 4), (2, 4, 8), 2, torch.bfloat16, True),  # the rows torch.compile's stage takes elsewhere
        ((3, 6, 1), (1, 2, 3), 3, torch.float64, False),  # 3 x 1 and 3 x 2 mosaics; one-frame mosaics copied
        ((), (), 2, torch.float32, False),  # NSP only
    ],
)
def test_run_plan_is_the_step_by_step_walk(sizes, strides, kernel_size, dtype, mosaics_only):
    """One run_plan call per video gives, bit for bit, what a walk of the same plan in Python gives calling
    the same kernels step by step (so the program encodes every step, place and buffer)."""
    from vllm_stgridpool.stage.plan import make_plan

    config = STGridPoolConfig(grid_sizes=sizes, grid_strides=strides, kernel_size=kernel_size)
    videos = randn(2, 24, 27, 25, 45, seed=11, dtype=dtype)
    plan = make_plan(24, 27, 25, config, 3)
    assert backend.for_call(videos, config.norm_p) == backend.CPU_KERNELS
    rows = len(plan.replaced) if mosaics_only else 24
    whole = videos.new_empty(2, rows, *plan.out_grid, 45)
    by_step = torch.zeros_like(whole)
    pool = (kernel_size, config.temperature, config.norm_p)
    for frames, pooled, walked in zip(videos, whole, by_step):
        cpu_kernels.run_plan(frames, pooled, frames.new_empty(plan.num_slots, 27, 25, 45), plan, *pool,
                             mosaics_only=mosaics_only)
        _walk_with_kernels(frames, plan, walked, pool, mosaics_only)
    assert whole.shape == (2, len(plan.replaced) if mosaics_only else 24, *plan.out_grid, 45)
    assert torch.equal(whole, by_step)


def _walk_with_kernels(frames, plan, pooled, pool, mosaics_only):
    """``plan``'s steps walked in Python, one kernel call per pooling or tile (what run_plan does in C++)."""
    mosaics = [frames.new_zeros(frames.shape[1:]) for _ in plan.slots]
    for step in plan.steps:
        if isinstance(step, PoolFrames) and not mosaics_only:
            cpu_kernels.norm_pool_into(frames[step.start : step.stop], pooled[step.start : step.stop], *pool)
        elif isinstance(step, Resize):
            for source, places in zip(step.sources, step.places):
                frame = frames[source] if step.from_input else mosaics[source]
                views = [mosaics[p.mosaic][p.top : p.top + p.rows, p.left : p.left + p.cols] for p in places]
                if tuple(frame.shape[:2]) == step.size:  # a one-frame mosaic is the frame itself
                    for view in views:
                        view.copy_(frame[: view.shape[0], : view.shape[1]])
                else:
                    cpu_kernels.area_resize_into(frame, views, *step.size)
        elif isinstance(step, PoolMosaics):
            for mosaic, frame in zip(step.mosaics, step.frames):
                cpu_kernels.norm_pool_into(mosaics[mosaic], pooled[plan.pooled_row(frame, mosaics_only)], *pool)
