"""Per-request settings through vLLM's own multimodal processing API (no engine).

The processor runs in the API server: this is where a request's
``stgridpool`` object is checked, priced and put in its canonical form (the
cache key). The processor here is the one vLLM builds for the tiny
checkpoint, through ``MULTIMODAL_REGISTRY.create_processor``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage.cost import stage_cost

PROMPT = "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"


def build_processor(checkpoint, settings: dict):
    """The multimodal processor vLLM builds for ``checkpoint`` served with ``settings``."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_stgridpool.plugin import register

    register()
    model_config = ModelConfig(
        model=str(checkpoint),
        hf_overrides={"stgridpool": settings},
        dtype="float32",
        max_model_len=16384,
        limit_mm_per_prompt={"video": 1},
    )
    return MULTIMODAL_REGISTRY.create_processor(model_config)


@pytest.fixture(scope="module")
def processor(onevision_checkpoint):
    return build_processor(onevision_checkpoint, {"max_frames": 64})


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (8, 64, 80, 3), dtype=np.uint8)


def process(processor, frames, override=None):
    kwargs = {} if override is None else {"stgridpool": override}
    items = processor.info.parse_mm_data({"video": frames})
    return processor(PROMPT, items, hf_processor_mm_kwargs=kwargs)


def video_hash(processor, frames, override=None) -> str:
    return process(processor, frames, override)["mm_hashes"]["video"][0]


@pytest.mark.parametrize(
    "left, right",
    [
        ({"temperature": 3}, {"temperature": 3.0}),
        (None, {}),
        (None, {"kernel_size": 2, "temperature": 1.0, "norm_p": 2, "grid_sizes": [4, 4, 4]}),
        ({"kernel_size": 3, "norm_p": 1}, {"norm_p": 1.0, "kernel_size": 3}),
    ],
)
def test_equal_settings_share_a_cache_key(processor, frames, left, right):
    assert video_hash(processor, frames, left) == video_hash(processor, frames, right)


@pytest.mark.parametrize(
    "left, right",
    [
        ({"temperature": 3}, {"temperature": 1.5e-323}),  # the same 8 raw bytes as int64 3
        ({"temperature": 2.0}, {"temperature": 2.0000000000000004}),
        (None, {"kernel_size": 3}),
        ({"grid_sizes": [4], "grid_strides": [2]}, {"grid_sizes": [4], "grid_strides": [4]}),
        ({"grid_sizes": [], "grid_strides": []}, None),
    ],
)
def test_different_settings_never_share_a_cache_key(processor, frames, left, right):
    assert video_hash(processor, frames, left) != video_hash(processor, frames, right)


def test_the_canonical_form_carries_the_request_config_to_the_model(processor, frames):
    """The per-video field the model reads holds the resolved config."""
    from vllm_stgridpool.serving.config_rows import config_from_row

    result = process(processor, frames, {"temperature": 3, "kernel_size": 3})
    row = result["mm_kwargs"]["video"][0]["stgridpool_config"].data
    assert config_from_row(row.tolist()) == STGridPoolConfig(temperature=3.0, kernel_size=3)
    assert len(result["mm_placeholders"]["video"]) == 1
    assert result["mm_placeholders"]["video"][0].length == 8 * 9 * 9 + 1


@pytest.mark.parametrize(
    "override, field",
    [
        ({"kernel_size": 1}, "kernel_size"),  # more tokens per frame
        ({"kernel_size": 28}, "kernel_size"),  # larger than the 27 x 27 grid
        ({"grid_sizes": [4] * 8, "grid_strides": [1] * 8}, "stage memory"),
        ({"grid_sizes": [2] * 8, "grid_strides": [1] * 8}, "stage"),
        ({"norm_p": 0.0}, "norm_p"),
        ({"norm_p": -1}, "norm_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"video_newline": "grid"}, "video_newline"),
        ({"max_frames": 1000}, "max_frames"),
        ({"enabled": False}, "enabled"),
        ("k3", "JSON object"),
    ],
)
def test_settings_beyond_the_server_are_refused_in_the_processor(processor, frames, override, field):
    with pytest.raises(ValueError, match=field):
        process(processor, frames, override)


def test_the_stage_cost_cap_is_what_the_server_profiled(processor):
    """The default setting at max_frames passes its own cap; a denser pyramid at the same kernel does not."""
    from vllm_stgridpool.serving.request_rules import check_request_cost

    shape = processor.info.stage_shape()
    assert shape.max_frames == 64 and (shape.height, shape.width) == (27, 27)
    server = STGridPoolConfig()
    check_request_cost(server, server, shape)
    denser = STGridPoolConfig(grid_sizes=(4, 4, 4, 4), grid_strides=(1, 1, 1, 1))
    server_cost = stage_cost(64, 27, 27, shape.channels, server, shape.itemsize)
    denser_cost = stage_cost(64, 27, 27, shape.channels, denser, shape.itemsize)
    assert denser_cost.peak_bytes > server_cost.peak_bytes or denser_cost.work > server_cost.work
    with pytest.raises(ValueError, match="stage"):
        check_request_cost(server, denser, shape)


@pytest.mark.parametrize("norm_p", [1.0, 2.0, 3.0, 127.0])
def test_no_pyramid_is_never_refused_as_costlier(processor, norm_p):
    """NSP alone is cheaper than any pyramid, whatever the cost model says of its longer pooling steps.

    On the tiny checkpoint (D = 64) a norm other than 1 or 2 pools a 44-frame
    segment in one step, whose scaled copy passes the pyramid's peak.
    """
    from vllm_stgridpool.serving.request_rules import check_request_cost

    shape = processor.info.stage_shape()
    server = STGridPoolConfig()
    nsp_only = STGridPoolConfig(grid_sizes=(), grid_strides=(), norm_p=norm_p)
    check_request_cost(server, nsp_only, shape)
    check_request_cost(server, STGridPoolConfig(norm_p=norm_p), shape)  # the server's pyramid at this norm


@pytest.mark.parametrize(
    "mm_processor_kwargs, media_io_kwargs, own",
    [
        ({"stgridpool": {"kernel_size": 3}}, None, True),
        ({"stgridpool": {}}, {}, True),
        ({"stgridpool": {}, "num_frames": 4}, None, False),
        ({"num_frames": 4}, None, False),
        ({"stgridpool": {}}, {"video": {"num_frames": 4}}, True),
        (None, {"video": {"num_frames": 1}}, True),
        ({}, {"video": {"num_frames": 8}}, True),  # 8: the max_frames set below
        (None, {"video": {"num_frames": 9}}, False),
        (None, {"video": {"num_frames": 0}}, False),
        (None, {"video": {"num_frames": 4.0}}, False),
        (None, {"video": {"num_frames": True}}, False),
        (None, {"video": {"num_frames": "4"}}, False),
        (None, {"video": {"num_frames": 4, "fps": 1}}, True),  # fps only lowers the count
        (None, {"video": {"num_frames": 4, "fps": 0}}, False),
        (None, {"video": {"fps": 1}}, False),
        (None, {"video": {"video_backend": "opencv"}}, False),
        (None, {"video": {"num_frames": 4}, "image": {}}, False),
        (None, {"image": {"num_frames": 4}}, False),
        (None, {"video": [4]}, False),
        ({"num_frames": 4}, {"video": {"num_frames": 4}}, False),
        ({}, None, False),
        (None, None, False),
    ],
)
def test_p6_trusts_the_own_key_and_nothing_else(monkeypatch, mm_processor_kwargs, media_io_kwargs, own):
    """vLLM's own check, wrapped: only a lone ``stgridpool`` object and a frame count up to the
    server's ``max_frames`` (with a sampling rate, which can only lower it) pass without the trust flag."""
    from vllm.entrypoints.generate.base import protocol
    from vllm.exceptions import VLLMValidationError

    from vllm_stgridpool.compat import request_trust

    request_trust.apply(__import__("vllm").__version__)
    check = protocol.validate_request_mm_kwargs
    assert getattr(check, "_stgridpool_trust", False)
    monkeypatch.setattr(request_trust, "_max_frames", 8)
    kwargs = dict(mm_processor_kwargs=mm_processor_kwargs, media_io_kwargs=media_io_kwargs)
    check(**kwargs, trust_request_mm_kwargs=True)  # a trusting server accepts everything, as before
    monkeypatch.setattr(request_trust, "_active", False)
    if mm_processor_kwargs or media_io_kwargs:
        with pytest.raises(VLLMValidationError):  # not active for the served model: vLLM's rule
            check(**kwargs, trust_request_mm_kwargs=False)
    monkeypatch.setattr(request_trust, "_active", True)
    if own or not (mm_processor_kwargs or media_io_kwargs):
        check(**kwargs, trust_request_mm_kwargs=False)
    else:
        with pytest.raises(VLLMValidationError, match="trust-request-mm-kwargs"):
            check(**kwargs, trust_request_mm_kwargs=False)


def test_p6_passes_arguments_it_does_not_read_on_to_vllm(monkeypatch):
    """A keyword vLLM might add, or a positional call, reaches vLLM's check unchanged (no TypeError)."""
    from vllm_stgridpool.compat import request_trust

    seen = []

    def upstream(*args, **kwargs):
        seen.append((args, kwargs))

    check = request_trust.trust_own_key(upstream)
    monkeypatch.setattr(request_trust, "_active", True)
    monkeypatch.setattr(request_trust, "_max_frames", 8)
    own = dict(mm_processor_kwargs={"stgridpool": {}}, media_io_kwargs=None, trust_request_mm_kwargs=False)
    check(**own, model_config="new upstream keyword")  # the own key still passes, vLLM not asked
    assert seen == []
    other = dict(own, mm_processor_kwargs={"num_frames": 4})
    check(**other, model_config="new upstream keyword")
    check("positional", flag=True)
    assert seen == [((), {**other, "model_config": "new upstream keyword"}), (("positional",), {"flag": True})]


@pytest.mark.parametrize(
    "num_frames, budget, kept, kernel",
    [(16, 4096, 16, 2), (40, 4096, 24, 2), (8, 500, 8, 4), (16, 1000, 16, 4), (64, 1000, 27, 4)],
)
def test_a_request_budget_picks_frames_and_kernel_the_model_sees(processor, num_frames, budget, kept, kernel):
    """Placeholders, the frames handed to the vision tower and the kernel row all follow one choice."""
    from vllm_stgridpool.serving.config_rows import config_from_row

    video = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 64, 80, 3), dtype=np.uint8)
    result = process(processor, video, {"max_video_tokens": budget})
    side = (27 - kernel) // kernel + 1
    assert result["mm_placeholders"]["video"][0].length == kept * side * side + 1 <= budget
    item = result["mm_kwargs"]["video"][0]
    assert item["pixel_values_videos"].data.shape[0] == kept
    assert config_from_row(item["stgridpool_config"].data.tolist()).kernel_size == kernel
    (record,) = result["stgridpool_videos"]
    assert (record.num_frames, record.frames_kept, record.kernel_size) == (num_frames, kept, kernel)
    assert record.budget_limited == ((kept, kernel) != (num_frames, 2))


def test_a_budget_too_small_for_one_frame_is_refused_with_the_smallest_that_works(processor, frames):
    with pytest.raises(ValueError, match="use max_video_tokens >= 37"):
        process(processor, frames, {"max_video_tokens": 36})


def test_a_request_budget_above_the_servers_is_refused(onevision_checkpoint, frames):
    budgeted = build_processor(onevision_checkpoint, {"max_video_tokens": 4096})
    with pytest.raises(ValueError, match="from 1 to 4096"):
        process(budgeted, frames, {"max_video_tokens": 5000})
    long_video = np.random.default_rng(1).integers(0, 256, (64, 64, 80, 3), dtype=np.uint8)
    assert process(budgeted, long_video)["mm_placeholders"]["video"][0].length == 24 * 169 + 1
    assert process(budgeted, long_video, {"max_video_tokens": 2048})["mm_placeholders"]["video"][0].length == 25 * 81 + 1


@pytest.mark.parametrize("module", ["request_trust", "accepted_metrics"])
def test_p6_and_p8_guards(module):
    """Both apply to the installed vLLM (its features are there) and to no unsupported version."""
    import importlib

    import vllm

    guard = importlib.import_module(f"vllm_stgridpool.compat.{module}").GUARD
    assert guard.why_not(vllm.__version__) is None
    assert "not a supported version" in guard.why_not("0.31.2")
    assert "not a supported version" in guard.why_not("0.34.0")
