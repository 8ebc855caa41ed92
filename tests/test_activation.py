"""When ST-GridPool is active, and which config each request runs with (no engine needed)."""

from __future__ import annotations

import types

import pytest

from vllm_stgridpool import STGridPoolConfig
from vllm_stgridpool.serving.activation import settings_for
from vllm_stgridpool.serving.config_rows import config_from_row, config_to_row
from vllm_stgridpool.serving.request_rules import RequestSettings, StageShape, check_num_frames, request_settings
from vllm_stgridpool.config import STGridPoolSettings
from vllm_stgridpool.plugin import UnsupportedVLLMVersion, check_vllm_version

SHAPE = StageShape(max_frames=64, height=27, width=27, channels=896, itemsize=4)


def hf_config(**attrs):
    return types.SimpleNamespace(**attrs)


@pytest.fixture(autouse=True)
def no_plugin_env(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)


def test_inactive_without_opt_in():
    assert settings_for(hf_config()) is None


@pytest.mark.parametrize("allowlist", ["stgridpool", "lora,stgridpool", " stgridpool "])
def test_vllm_plugins_naming_it_activates_the_defaults(monkeypatch, allowlist):
    monkeypatch.setenv("VLLM_PLUGINS", allowlist)
    assert settings_for(hf_config()) == STGridPoolSettings()


def test_vllm_plugins_naming_something_else_stays_stock(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "stgridpool2,other")
    assert settings_for(hf_config()) is None


def test_hf_overrides_object_activates_and_configures():
    settings = settings_for(hf_config(stgridpool={"kernel_size": 3, "max_frames": 32}))
    assert settings.pool.kernel_size == 3 and settings.max_frames == 32


def test_enabled_false_turns_it_off(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "stgridpool")
    assert settings_for(hf_config(stgridpool={"enabled": False})) is None


def test_bad_server_config_is_rejected_at_start():
    with pytest.raises(ValueError, match="max_frames"):
        settings_for(hf_config(stgridpool={"max_frames": 0}))


def test_no_override_uses_the_server_config():
    settings = STGridPoolSettings.from_dict({"kernel_size": 3})
    assert request_settings(settings, {}, SHAPE) == RequestSettings(settings.pool, None)
    assert request_settings(None, {}, SHAPE) is None


def test_override_merges_over_the_server_config():
    settings = STGridPoolSettings.from_dict({"temperature": 2.0})
    config = request_settings(settings, {"stgridpool": {"kernel_size": 3}}, SHAPE).config
    assert config == STGridPoolConfig(kernel_size=3, temperature=2.0)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"kernel_size": 1}, "more than this server"),
        ({"kernel_size": 28}, "does not fit"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": -2}, "kernel_size"),
        ({"kernel_size": 10**9}, "kernel_size"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"grid_sizes": [4, 4]}, "same length"),
        ({"grid_sizes": [4] * 10**5, "grid_strides": [2] * 10**5}, "levels"),
        ({"colour": 1}, "unknown field `colour`"),
        ({"max_frames": 8}, "unknown field `max_frames`"),
        ("kernel_size=3", "JSON object"),
        ([3], "JSON object"),
    ],
)
def test_bad_override_is_rejected_with_the_reason(override, words):
    with pytest.raises(ValueError, match=words):
        request_settings(STGridPoolSettings(), {"stgridpool": override}, SHAPE)


def test_server_can_forbid_overrides():
    settings = STGridPoolSettings.from_dict({"allow_request_overrides": False})
    with pytest.raises(ValueError, match="allow_request_overrides"):
        request_settings(settings, {"stgridpool": {"kernel_size": 3}}, SHAPE)


def test_override_without_stgridpool_enabled_is_rejected():
    with pytest.raises(ValueError, match="not enabled"):
        request_settings(None, {"stgridpool": {}}, SHAPE)


def test_frame_limits():
    check_num_frames(STGridPoolSettings(), 64)
    with pytest.raises(ValueError, match="max_frames 64"):
        check_num_frames(STGridPoolSettings(), 65)
    with pytest.raises(ValueError, match="at least one frame"):
        check_num_frames(None, 0)


@pytest.mark.parametrize(
    "config",
    [STGridPoolConfig(), STGridPoolConfig(grid_sizes=(), grid_strides=(), kernel_size=3, temperature=-0.3),
     STGridPoolConfig(grid_sizes=(9,) * 8, grid_strides=(1, 2, 3, 4, 5, 6, 7, 8), norm_p=2.5)],
)
def test_config_survives_the_trip_to_the_model(config):
    assert config_from_row(config_to_row(config)) == config


def test_plugin_refuses_other_vllm_versions():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    check_vllm_version("0.33.0")
    with pytest.raises(UnsupportedVLLMVersion, match="supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0"):
        check_vllm_version("0.34.0")


def model_config_stand_in(max_model_len: int, side_px: int = 378, patch: int = 14):
    vision = types.SimpleNamespace(image_size=side_px, patch_size=patch)
    return types.SimpleNamespace(hf_config=types.SimpleNamespace(vision_config=vision), max_model_len=max_model_len)


@pytest.mark.parametrize(
    ("max_model_len", "extra", "expected"),
    [
        (32768, 1, 64),  # room for the paper's 64 frames
        (10817, 1, 64),  # exactly 64 * 169 + 1
        (10816, 1, 63),
        (8192, 1, 48),  # (8192 - 1) // 169
        (100, 1, 1),  # never below one frame
    ],
)
def test_default_frame_count_fits_the_context(max_model_len, extra, expected):
    from vllm_stgridpool.plugin import default_num_frames

    assert default_num_frames(STGridPoolSettings(), model_config_stand_in(max_model_len), extra) == expected


def test_default_frame_count_for_a_24x24_family():
    from vllm_stgridpool.plugin import default_num_frames

    settings = STGridPoolSettings.from_dict({"kernel_size": 3, "max_frames": 32})
    assert default_num_frames(settings, model_config_stand_in(1000, 336, 14), 0) == 1000 // 64


def test_a_request_budget_may_lower_the_server_budget_only():
    server = STGridPoolSettings.from_dict({"max_video_tokens": 4096})
    assert request_settings(server, {}, SHAPE).max_video_tokens == 4096
    lowered = request_settings(server, {"stgridpool": {"max_video_tokens": 1000}}, SHAPE)
    assert lowered == RequestSettings(STGridPoolConfig(), 1000)
    for bad in (4097, 0, -5, 1.5, "100", True):
        with pytest.raises(ValueError, match="max_video_tokens must be a whole number from 1 to 4096"):
            request_settings(server, {"stgridpool": {"max_video_tokens": bad}}, SHAPE)
    unbudgeted = request_settings(STGridPoolSettings(), {"stgridpool": {"max_video_tokens": 500}}, SHAPE)
    assert unbudgeted.max_video_tokens == 500


@pytest.mark.parametrize("server_key", ["min_frames", "max_kernel_size"])
def test_budget_rule_settings_are_server_only(server_key):
    with pytest.raises(ValueError, match=f"unknown field `{server_key}`"):
        request_settings(STGridPoolSettings(), {"stgridpool": {server_key: 2}}, SHAPE)


def test_bad_budget_settings_are_rejected_at_start():
    for values, field in (({"max_video_tokens": 0}, "max_video_tokens"), ({"min_frames": 0}, "min_frames"),
                          ({"max_kernel_size": 0}, "max_kernel_size")):
        with pytest.raises(ValueError, match=field):
            STGridPoolSettings.from_dict(values)
