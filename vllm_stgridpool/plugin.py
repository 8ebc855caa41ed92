"""The vLLM general plugin: ``stgridpool = vllm_stgridpool.plugin:register``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers), possibly several times: it is idempotent and imports no model
code (model classes are registered lazily by name).

Next to a vLLM it was not written for (a version outside
``compat.SUPPORTED_SERIES``, or one whose extension points differ) it does
not activate. Asked for by name (``--plugins stgridpool`` /
``VLLM_PLUGINS=stgridpool``) it raises an error naming the supported
versions, which stops the server; merely installed (``VLLM_PLUGINS`` unset,
every plugin loads) it logs that once and vLLM runs as shipped.
"""

from __future__ import annotations

import logging

from vllm_stgridpool import envs
from vllm_stgridpool.models.families import FAMILIES
from vllm_stgridpool.compat import (
    Feature,
    Guard,
    is_supported,
    say_refusal_once,
    unsupported_message,
    vllm_version,
)

logger = logging.getLogger("vllm.stgridpool")



_registered = False


# The vLLM extension points register() uses; each is an ordinary attribute of vLLM 0.32 and 0.33.
EXTENSION_POINTS = Guard(
    "plugin",
    "model classes, frame-sampling hook and decord loader",
    (
        Feature("vllm", "ModelRegistry.register_model", ("model_arch", "model_cls")),
        Feature("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),
        Feature("vllm.model_executor.models.config", "VerifyAndUpdateConfig.verify_and_update_model_config"),
        Feature("vllm.multimodal.video", "VIDEO_LOADER_REGISTRY.register"),
    ),
)
# vLLM 0.32's opencv loader returns no frame for a valid 1-frame video; 0.33 reads it.
# With ST-GridPool active, uploads go to the plugin's loader (header limits, a decode worker pool, current
# FFmpeg) unless the user chose one: vLLM's opencv loader decodes in the API server with no size limit. It also
# reads 1-frame videos, which 0.32's opencv loader rejects. The same on 0.32 and 0.33.
SAFE_LOADER_BY_DEFAULT = Guard("safe loader default", "the plugin's pyav loader for uploads instead of opencv")


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None) -> None:
    """Raises :class:`UnsupportedVLLMVersion`, naming the supported versions, unless ``version`` is one."""
    if version is None or not is_supported(version):
        raise UnsupportedVLLMVersion(unsupported_message(version))


def refusal(version: str | None) -> str | None:
    """Why the plugin cannot activate next to this vLLM, or None when it can."""
    if version is None or not is_supported(version):
        return unsupported_message(version)
    reason = EXTENSION_POINTS.why_not(version)
    if reason is not None:
        return f"vllm-stgridpool cannot register with this vLLM: {reason}"
    from vllm_stgridpool.compat import model_internals

    reason = model_internals.GUARD.why_not(version)  # an override vLLM would no longer call, or call otherwise
    if reason is not None:
        return f"vllm-stgridpool cannot replace vLLM's LLaVA video classes: {reason}"
    return None


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_stgridpool.serving.activation import named_in_vllm_plugins

    version = vllm_version()
    reason = refusal(version)
    if reason is not None:
        if named_in_vllm_plugins():  # asked for by name: the server must not start without it
            raise UnsupportedVLLMVersion(
                f"{reason}. Install a vllm-stgridpool release made for this vLLM, or a supported vLLM; "
                "or start the server without --plugins stgridpool / VLLM_PLUGINS=stgridpool"
            )
        say_refusal_once(f"{reason}; the plugin is not active, vLLM runs without it", logger.warning)
        return
    envs.check()  # a malformed STGRIDPOOL_* value stops the server here, not each request later
    from vllm import ModelRegistry

    from vllm_stgridpool.compat import accepted_metrics, jpeg_frames, media_fetch, request_trust
    from vllm_stgridpool.compat import model_aliases, retry_after, video_processor_class, video_requests

    model_aliases.apply(version)  # redirect file first (also fixes 0.32's probe order), then llava-video & co.
    video_processor_class.apply(version)  # LLaVA-NeXT-Video's published processor files load
    request_trust.apply(version)  # acts only once a served model has ST-GridPool active
    accepted_metrics.apply(version)
    video_requests.apply(version)  # the loader learns a video's request and its arrival
    retry_after.apply(version)  # the loader's 503s say when to retry
    if named_in_vllm_plugins():  # an explicit opt-in: only then change vLLM's error codes
        media_fetch.apply(version)
        jpeg_frames.apply(version)  # wraps the connector media_fetch registered: after it
    for architecture, family in FAMILIES.items():
        ModelRegistry.register_model(architecture, family.model_class)
    _register_frame_sampling_default(SAFE_LOADER_BY_DEFAULT.applies(version))
    from vllm_stgridpool.video.loader import register_video_loader

    register_video_loader()
    _registered = True
    logger.debug("vllm-stgridpool registered for %s", ", ".join(FAMILIES))


def _register_frame_sampling_default(safe_loader_by_default: bool) -> None:
    """With ST-GridPool active, the server samples up to ``max_frames`` frames per video
    (with the plugin's loader, where vLLM's opencv loader rejects 1-frame videos).

    vLLM's video loader samples 32 frames unless ``--media-io-kwargs`` says
    otherwise; the paper's setting is 64 (fewer if ``max_model_len`` cannot
    hold them). vLLM applies per-architecture config
    hooks (``MODELS_CONFIG_MAP``) while it builds each ``ModelConfig``; ours
    only fills in a default the user did not set, and chains to any hook
    already registered for the architecture.
    """
    from vllm.model_executor.models import config as model_hooks

    for architecture, family in FAMILIES.items():
        previous = model_hooks.MODELS_CONFIG_MAP.get(architecture)
        if previous is not None and getattr(previous, "_stgridpool", False):
            continue
        model_hooks.MODELS_CONFIG_MAP[architecture] = _frame_sampling_hook(
            previous, family.video_extra_tokens, safe_loader_by_default
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


def check_video_loader_exists(name: str) -> None:
    """Stop start-up when the video loader the user named is not registered (vLLM would fail every video)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    if name not in VIDEO_LOADER_REGISTRY.name2class:
        known = ", ".join(sorted(VIDEO_LOADER_REGISTRY.name2class))
        raise ValueError(f"the video loader {name!r} (video_backend / VLLM_VIDEO_LOADER_BACKEND) is not registered; "
                         f"registered loaders: {known}")


def _holds_its_name(loader_class, name: str) -> bool:
    """Whether vLLM's video loader registry gives ``loader_class`` for ``name`` (it never takes another's)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    return VIDEO_LOADER_REGISTRY.name2class.get(name) is loader_class


def default_video_limit():
    """Videos per prompt with ST-GridPool active and no ``--limit-mm-per-prompt`` for videos: one per media
    thread of vLLM (``VLLM_MEDIA_LOADING_THREAD_COUNT``, 8), not vLLM's 999.

    The plugin's loader admits a request's videos together: each reads its
    header and waits on its media thread for the others, so a request never
    needs more threads than there are (video/admission.py). It also bounds the
    headers one request makes the workers read before its total is known.
    """
    from vllm import envs as vllm_envs
    from vllm.config.multimodal import VideoDummyOptions

    return VideoDummyOptions(count=vllm_envs.VLLM_MEDIA_LOADING_THREAD_COUNT)


def _frame_sampling_hook(previous, extra_tokens: int, safe_loader_by_default: bool):
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    from vllm_stgridpool.serving.activation import settings_for
    from vllm_stgridpool.compat import request_trust
    from vllm_stgridpool.video import loader

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
            request_trust.mark_active(settings.max_frames)  # its own request key needs no blanket trust (P6)
            video = mm_config.media_io_kwargs.setdefault("video", {})
            video.setdefault("num_frames", default_num_frames(settings, model_config, extra_tokens))
            if mm_config.limit_per_prompt.get("video") is None:  # no --limit-mm-per-prompt for videos
                mm_config.limit_per_prompt["video"] = default_video_limit()
            named = video.get("video_backend") or envs.VLLM_VIDEO_LOADER_BACKEND
            if named is not None:
                check_video_loader_exists(named)  # a loader the user names runs, or the server does not start
            elif safe_loader_by_default and _holds_its_name(loader.PyAVVideoLoader, loader.LOADER_NAME):
                video["video_backend"] = loader.LOADER_NAME  # limits, decode pool (video/loader.py)

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if previous is not None:
                previous.verify_and_update_config(vllm_config)

    return STGridPoolFrameSampling
