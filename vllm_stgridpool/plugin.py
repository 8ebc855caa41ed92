"""The vLLM general plugin: ``stgridpool = vllm_stgridpool.plugin:register``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), possibly several times: it is idempotent, imports no model
code (model classes are registered lazily by name) and refuses, loudly, a
vLLM version it was not written for.
"""

from __future__ import annotations

import logging
import os

from vllm_stgridpool.compat import is_supported, supported_text

logger = logging.getLogger("vllm.stgridpool")


_MODELS = {
    "LlavaOnevisionForConditionalGeneration": (
        "vllm_stgridpool.models.llava_onevision:STGridPoolLlavaOnevisionForConditionalGeneration"
    ),
    "LlavaNextVideoForConditionalGeneration": (
        "vllm_stgridpool.models.llava_next_video:STGridPoolLlavaNextVideoForConditionalGeneration"
    ),
}

_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    if not is_supported(version):
        raise UnsupportedVLLMVersion(
            f"vllm-stgridpool supports vLLM {supported_text()}, "
            f"but vLLM {version} is installed; install a matching vllm-stgridpool release, or "
            f"run without the plugin (unset --plugins / VLLM_PLUGINS=stgridpool)"
        )


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    from vllm_stgridpool.activation import named_in_vllm_plugins
    from vllm_stgridpool.compat import accepted_metrics, media_fetch, model_redirect, request_trust

    model_redirect.apply(vllm.__version__)
    request_trust.apply(vllm.__version__)  # acts only once a served model has ST-GridPool active
    accepted_metrics.apply(vllm.__version__)
    if named_in_vllm_plugins():  # an explicit opt-in: only then change vLLM's error codes
        media_fetch.apply(vllm.__version__)
    for architecture, model_class in _MODELS.items():
        ModelRegistry.register_model(architecture, model_class)
    _register_frame_sampling_default()
    from vllm_stgridpool.video_loader import register_decord_loader

    register_decord_loader()
    _registered = True
    logger.debug("vllm-stgridpool registered for %s", ", ".join(_MODELS))


def _register_frame_sampling_default() -> None:
    """With ST-GridPool active, the server samples up to ``max_frames`` frames per video, with decord.

    vLLM's video loader samples 32 frames unless ``--media-io-kwargs`` says
    otherwise; the paper's setting is 64 (fewer if ``max_model_len`` cannot
    hold them). vLLM applies per-architecture config
    hooks (``MODELS_CONFIG_MAP``) while it builds each ``ModelConfig``; ours
    only fills in a default the user did not set, and chains to any hook
    already registered for the architecture.
    """
    from vllm.model_executor.models import config as model_hooks

    from vllm_stgridpool.activation import VIDEO_EXTRA_TOKENS

    for architecture in _MODELS:
        previous = model_hooks.MODELS_CONFIG_MAP.get(architecture)
        if previous is not None and getattr(previous, "_stgridpool", False):
            continue
        model_hooks.MODELS_CONFIG_MAP[architecture] = _frame_sampling_hook(
            previous, VIDEO_EXTRA_TOKENS[architecture]
        )


def default_num_frames(settings, model_config, extra_tokens: int) -> int:
    """``max_frames``, or fewer when a video of that many frames could not fit ``max_model_len``.

    The same bound vLLM's profiling uses (the video alone must fit), so a
    server started with a short context samples videos it can serve.
    """
    vision = model_config.hf_config.vision_config
    side = vision.image_size // vision.patch_size
    fitting = (model_config.max_model_len - extra_tokens) // settings.pool.num_tokens(1, side, side)
    return max(1, min(settings.max_frames, fitting))


def _frame_sampling_hook(previous, extra_tokens: int):
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    from vllm_stgridpool.activation import settings_for
    from vllm_stgridpool.compat import request_trust

    class STGridPoolFrameSampling(VerifyAndUpdateConfig):
        _stgridpool = True

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            if previous is not None:
                previous.verify_and_update_model_config(model_config)
            settings = settings_for(model_config.hf_config)
            mm_config = model_config.multimodal_config
            if settings is None or mm_config is None:
                return
            request_trust.mark_active()  # its own request key needs no blanket trust (P6)
            video = mm_config.media_io_kwargs.setdefault("video", {})
            video.setdefault("num_frames", default_num_frames(settings, model_config, extra_tokens))
            if "video_backend" not in video and "VLLM_VIDEO_LOADER_BACKEND" not in os.environ:
                # The opencv default rejects valid 1-frame videos; decord reads them.
                video["video_backend"] = "decord"

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if previous is not None:
                previous.verify_and_update_config(vllm_config)

    return STGridPoolFrameSampling
