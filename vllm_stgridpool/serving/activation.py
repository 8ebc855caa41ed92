"""When ST-GridPool is active for a model, and with which server settings.

It is opt-in: active for a model when ``VLLM_PLUGINS`` names ``stgridpool``
(what ``--plugins stgridpool`` sets) or when the model's ``--hf-overrides``
carries a ``stgridpool`` object, and ``"enabled": false`` in that object
turns it off again. What a single request may change is
:mod:`vllm_stgridpool.serving.request_rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_stgridpool import envs
from vllm_stgridpool.config import STGridPoolSettings

PLUGIN_NAME = "stgridpool"
HF_CONFIG_KEY = "stgridpool"


def named_in_vllm_plugins() -> bool:
    allowed = envs.VLLM_PLUGINS
    if allowed is None:
        return False
    return PLUGIN_NAME in {name.strip() for name in allowed.split(",")}


def settings_for(hf_config: Any) -> STGridPoolSettings | None:
    """The model's ST-GridPool settings, or None when it runs stock."""
    settings = plugin_settings(hf_config)
    return settings if settings is not None and settings.enabled else None


def plugin_settings(hf_config: Any) -> STGridPoolSettings | None:
    """The model's settings whenever the plugin is active for it, ``"enabled": false`` included.

    What is not ST-GridPool's pooling (the ``video_newline`` layout) also
    applies with stock pooling; None when the plugin is not active at all.
    """
    overrides = getattr(hf_config, HF_CONFIG_KEY, None)
    if overrides is None and not named_in_vllm_plugins():
        return None
    return STGridPoolSettings.from_dict(plain_mapping(overrides))


def plain_mapping(values: Any) -> Any:
    """A mapping as a plain dict (``None``: empty); anything else is left for the parser to reject."""
    if values is None:
        return {}
    return dict(values) if isinstance(values, Mapping) else values
