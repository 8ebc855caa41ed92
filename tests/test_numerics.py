"""Numerical safety of the stage for every setting the config accepts, and what reduced precision promises.

- Every accepted (grid_sizes, grid_strides, kernel_size, temperature,
  norm_p) gives finite outputs for any finite features, in float32,
  bfloat16, float16 and float64, and never raises; values outside the
  ranges are refused by the config with a message naming the field.
- float64 results equal the plain reference (its naive formula, where
  that is finite) within 1e-9, up to the ends of the accepted ranges.
- bfloat16 / float16 mosaics are the float32 result rounded once to the
  dtype; pooled outputs are within about one unit in the last place of the
  window's largest feature.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.reference_stgridpool import ptg, ptg_level, st_gridpool_reference

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.stage import cpu_kernels
from vllm_stgridpool.config import (
    MAX_ABS_TEMPERATURE,
    MAX_GRID_SIZE,
    MAX_GRID_STRIDE,
    MAX_LEVELS,
    MAX_NORM_P,
    MIN_NORM_P,
)

REDUCED = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = REDUCED + (torch.float64,)


def adversarial(shape, dtype, seed=0):
    """Features built to break a naive score: zeros, the dtype's extremes, subnormals, mixed scales.

    Every token gets one of these kinds (the mix differs per seed), so
    windows mix them too: zero vectors, vectors at +-max, tokens of 1e-30
    next to tokens of 1e30 (clipped to the dtype's range), subnormals,
    ordinary N(0, 1) features and features spread over 40 decades.
    """
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    *lead, dim = shape
    tokens = math.prod(lead)
    normal = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    kinds = [
        torch.zeros(tokens, dim, dtype=torch.float64),
        torch.sign(normal) * info.max,
        torch.full((tokens, dim), info.max, dtype=torch.float64),
        normal * 1e30,
        normal * 1e-30,
        normal * info.tiny * 0.25,  # subnormal
        normal,
        normal * torch.pow(10.0, torch.randint(-20, 20, (tokens, dim), generator=gen).double()),
    ]
    choice = torch.randint(0, len(kinds), (tokens,), generator=gen)
    values = torch.stack(kinds)[choice, torch.arange(tokens)]
    return values.clamp(-info.max, info.max).to(dtype).reshape(shape)


def assert_finite(config: STGridPoolConfig, x: torch.Tensor) -> None:
    y = st_gridpool(x, config)
    out_h, out_w = config.output_grid(x.shape[-3], x.shape[-2])
    assert y.shape == (*x.shape[:-3], out_h, out_w, x.shape[-1]) and y.dtype == x.dtype
    bad = (~torch.isfinite(y)).sum().item()
    assert bad == 0, f"{bad} non-finite outputs for {config} in {x.dtype}"


# --------------------------------------------------------------------------
# the accepted ranges
# --------------------------------------------------------------------------


NORM_PS = (1e-300, 1e-3, 0.0099, MIN_NORM_P, 0.05, 0.5, 1.0, 2.0, 3.0, 32.0, 100.0, MAX_NORM_P, 1000.5, 1e6, 1e300)


@pytest.mark.parametrize("norm_p", NORM_PS)
def test_norm_p_is_refused_or_finite(norm_p):
    """From 1e-300 to 1e300: a config error naming norm_p and its range, or finite outputs in every dtype."""
    if not MIN_NORM_P <= norm_p <= MAX_NORM_P:
        with pytest.raises(ValueError, match=rf"norm_p must be a number from {MIN_NORM_P:g} to {MAX_NORM_P:g}"):
            STGridPoolConfig.from_dict({"norm_p": norm_p})
        return
    config = STGridPoolConfig.from_dict({"norm_p": norm_p, "grid_sizes": [4, 2], "grid_strides": [1, 3]})
    for seed, dtype in enumerate(ALL_DTYPES):
        assert_finite(config, adversarial((12, 9, 7, 16), dtype, seed))


TEMPERATURES = (
    -2 * MAX_ABS_TEMPERATURE,
    -MAX_ABS_TEMPERATURE,
    -1.0,
    -5e-324,
    -0.0,
    0.0,
    5e-324,
    1e-300,
    1.0,
    MAX_ABS_TEMPERATURE,
    math.nextafter(MAX_ABS_TEMPERATURE, math.inf),
    1e300,
)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_is_refused_or_finite(temperature):
    """Near its bounds, negative, zero and subnormal: refused naming temperature, or finite outputs."""
    if abs(temperature) > MAX_ABS_TEMPERATURE:
        with pytest.raises(ValueError, match="temperature must be a number from -10000 to 10000"):
            STGridPoolConfig.from_dict({"temperature": temperature})
        return
    for norm_p in (2.0, 0.3):
        config = STGridPoolConfig.from_dict({"temperature": temperature, "norm_p": norm_p})
        for seed, dtype in enumerate(ALL_DTYPES):
            assert_finite(config, adversarial((9, 6, 6, 8), dtype, seed))


@pytest.mark.parametrize("values", [{"norm_p": float("nan")}, {"norm_p": float("inf")}, {"temperature": float("-inf")}])
def test_non_finite_numbers_are_refused(values):
    (field,) = values
    with pytest.raises(ValueError, match=field):
        STGridPoolConfig.from_dict(values)


def test_every_kernel_size_is_finite(nsp_path):
    height, width = 7, 9
    for kernel_size in range(1, min(height, width) + 1):
        config = STGridPoolConfig.from_dict({"kernel_size": kernel_size, "norm_p": 2.0})
        for seed, dtype in enumerate(ALL_DTYPES):
            assert_finite(config, adversarial((10, height, width, 8), dtype, seed + kernel_size))


@pytest.mark.parametrize(
    "grid_sizes, grid_strides",
    [
        ([1], [1]),
        ([2] * MAX_LEVELS, [1] * MAX_LEVELS),
        ([MAX_GRID_SIZE], [1]),
        ([61, 3], [1, 1]),  # a prime grid: 61 x 1 layout, tiles 1 row high, most cropped away
        ([4, 4, 4, 4, 4, 4, 4, 4], [1, 2, 3, 4, 5, 6, 7, 8]),
        ([3], [MAX_GRID_STRIDE]),  # stride beyond the video: no mosaic
        ([9, 1, 64, 2, 5, 7, 3, 8], [2, 1, 1, 3, 1, 2, 1, 1]),
    ],
)
def test_pyramids_one_to_eight_levels_are_finite(grid_sizes, grid_strides):
    config = STGridPoolConfig.from_dict({"grid_sizes": grid_sizes, "grid_strides": grid_strides})
    for seed, dtype in enumerate(ALL_DTYPES):
        assert_finite(config, adversarial((70, 6, 5, 4), dtype, seed))


@st.composite
def accepted_settings(draw):
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    levels = draw(st.integers(0, MAX_LEVELS))
    temperature = draw(
        st.one_of(
            st.floats(-MAX_ABS_TEMPERATURE, MAX_ABS_TEMPERATURE),
            st.sampled_from([-MAX_ABS_TEMPERATURE, MAX_ABS_TEMPERATURE, 5e-324, -5e-324, 0.0]),
        )
    )
    log_p = draw(st.floats(math.log(MIN_NORM_P), math.log(MAX_NORM_P)))
    config = STGridPoolConfig(
        grid_sizes=tuple(draw(st.integers(1, MAX_GRID_SIZE)) for _ in range(levels)),
        grid_strides=tuple(draw(st.integers(1, 12)) for _ in range(levels)),
        kernel_size=draw(st.integers(1, min(height, width))),
        temperature=temperature,
        norm_p=draw(st.sampled_from([MIN_NORM_P, 1.0, 2.0, MAX_NORM_P, math.exp(log_p)])),
    )
    shape = (draw(st.integers(1, 40)), height, width, draw(st.integers(1, 12)))
    return config, shape, draw(st.sampled_from(REDUCED)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=accepted_settings())
def test_any_accepted_setting_is_finite(case):
    """Property: over the whole accepted space, adversarial features in float32, bfloat16 and float16 stay finite."""
    config, shape, dtype, seed = case
    assert_finite(config, adversarial(shape, dtype, seed))
    with cpu_kernels.disabled():  # the PyTorch-ops path, every other device's
        assert_finite(config, adversarial(shape, dtype, seed))


# --------------------------------------------------------------------------
# float64: equal to the plain reference up to the ends of the ranges
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm_p, temperature",
    [
        (MIN_NORM_P, 1.0),
        (MIN_NORM_P, -3.0),
        (0.3, 2.0),
        (7.0, 1.0),
        (MAX_NORM_P, 1.0),
        (MAX_NORM_P, -2.0),
        (2.0, MAX_ABS_TEMPERATURE),
        (2.0, -MAX_ABS_TEMPERATURE),
        (1.0, 5e-324),
    ],
)
def test_float64_matches_reference_at_the_range_ends(norm_p, temperature):
    config = STGridPoolConfig.from_dict(
        {"norm_p": norm_p, "temperature": temperature, "grid_sizes": [4, 3], "grid_strides": [2, 3], "kernel_size": 2}
    )
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20, 9, 8, 5, generator=gen, dtype=torch.float64)
    if norm_p > 100:  # x (and so every mosaic's averages) in [0.6, 1.9]: the reference's x ** 1000
        x = 0.6 + 1.3 * torch.rand(x.shape, generator=gen, dtype=torch.float64)  # neither over- nor underflows
    want = st_gridpool_reference(x, config.grid_sizes, config.grid_strides, 2, temperature, norm_p)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(st_gridpool(x, config), want, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------
# reduced precision: mosaics rounded once, outputs within the dtype's rounding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "grid_sizes, grid_strides", [([4], [2]), ([3], [1]), ([9], [1]), ([6, 4], [1, 2]), ([4, 4, 4], [2, 4, 8])]
)
def test_mosaics_are_the_float32_result_rounded(dtype, grid_sizes, grid_strides, nsp_path):
    """kernel_size 1 makes NSP the identity, so the output is the mosaicked video itself.

    Each level must equal the reference level run in float32 on the previous
    level's rounded frames and rounded once to the dtype: bit for bit (area
    weights such as 1/3 rounded to the dtype would be off by up to half a
    percent).
    """
    config = STGridPoolConfig.from_dict({"grid_sizes": grid_sizes, "grid_strides": grid_strides, "kernel_size": 1})
    gen = torch.Generator().manual_seed(len(grid_sizes))
    x = torch.randn(40, 27, 27, 8, generator=gen).to(dtype)
    want = x
    for grid, stride in zip(grid_sizes, grid_strides):
        want = ptg_level(want.float(), grid, stride).to(dtype)
    got = st_gridpool(x, config)
    assert torch.equal(got, want)
    ref64 = ptg(x.double(), grid_sizes, grid_strides)
    levels_rounding = len(grid_sizes) * torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref64, rtol=levels_rounding, atol=levels_rounding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel_size, temperature", [(2, 1.0), (3, -2.0), (2, 0.5)])
def test_outputs_within_the_dtype_rounding(dtype, kernel_size, temperature, nsp_path):
    """Pooled tokens differ from the float64 reference by at most ~1 ulp of the window's largest |x|.

    The score is rounded to the dtype once (relative error eps / 2, times
    |temperature * score| in the logits), the weights once, and each
    accumulation once; measured, the error stays under 0.85 ulp at
    |temperature| <= 2 for N(0, 1) features.
    """
    config = STGridPoolConfig.from_dict({"kernel_size": kernel_size, "temperature": temperature})
    gen = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(16, 27, 27, 32, generator=gen).to(dtype)
    got = st_gridpool(x, config).double()
    want = st_gridpool_reference(x.double(), config.grid_sizes, config.grid_strides, kernel_size, temperature, 2.0)
    frames = ptg(x.double(), config.grid_sizes, config.grid_strides)
    out_h, out_w = want.shape[1:3]
    windows = frames[:, : out_h * kernel_size, : out_w * kernel_size].abs()
    largest = windows.unflatten(1, (out_h, kernel_size)).unflatten(3, (out_w, kernel_size)).amax(dim=(2, 4))
    ulps = (got - want).abs() / (torch.finfo(dtype).eps * largest)
    assert ulps.max().item() <= 1.0, f"max error {ulps.max().item():.2f} ulp of the window's largest |x|"
