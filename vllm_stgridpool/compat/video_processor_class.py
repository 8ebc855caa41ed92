"""LLaVA-NeXT-Video's published processor files load again: AutoVideoProcessor picks a video processor.

A checkpoint without a video processor file gets its video processor built
from the image processor's config, whose class name transformers turns into
a video processor's by replacing ``ImageProcessor`` with ``VideoProcessor``.
For ``llava-hf/LLaVA-NeXT-Video-7B-hf`` (image processor
``LlavaNextImageProcessor``, no video processor file) that gives
``LlavaNextVideoProcessor``: the model's multimodal *processor*, whose loading
asks for its video processor again, until ``RecursionError`` (transformers
5.19; huggingface/transformers#42142 reports the same regression as
``'LlavaNextVideoProcessor' has no attribute 'from_dict'``). vLLM then fails
every video request to that checkpoint, and loses its chat template, which
it reads through the processor.

``video_processor_class_from_name`` is wrapped to answer None when the class
a name finds is a multimodal processor (``ProcessorMixin``) rather than a
video processor, so AutoVideoProcessor falls back to the model type's own
video processor (``LlavaNextVideoVideoProcessor``), as it did before the
regression. Ledger entry: patches/README.md, P9.
"""

from __future__ import annotations

import functools
import logging

from vllm_stgridpool.compat import Feature, Guard

logger = logging.getLogger("vllm.stgridpool")

GUARD = Guard(
    "P9",
    "video processor class of LLaVA-NeXT-Video checkpoints",
    (Feature("transformers.models.auto.video_processing_auto", "video_processor_class_from_name"),),
    any_vllm=True,  # changes transformers only; defect_present() is its condition
)
# The name transformers derives from LLaVA-NeXT-Video's image processor.
DERIVED_NAME = "LlavaNextImageProcessor".replace("ImageProcessor", "VideoProcessor")
_WRAPPED = "_stgridpool_video_processors_only"


def defect_present() -> bool:
    """True when the installed transformers maps LLaVA-NeXT-Video's derived name to a multimodal processor."""
    from transformers.models.auto import video_processing_auto

    return _is_multimodal_processor(video_processing_auto.video_processor_class_from_name(DERIVED_NAME))


def apply(vllm_version: str) -> bool:
    """Wrap the lookup where :data:`GUARD` holds and transformers has the defect; returns whether it did."""
    if not GUARD.applies(vllm_version):
        return False
    from transformers.models.auto import video_processing_auto

    lookup = video_processing_auto.video_processor_class_from_name
    if getattr(lookup, _WRAPPED, False):
        return True
    if not defect_present():
        logger.debug("vllm_stgridpool: P9 not needed, transformers finds LLaVA-NeXT-Video's video processor")
        return False
    video_processing_auto.video_processor_class_from_name = video_processors_only(lookup)
    return True


def video_processors_only(lookup):
    @functools.wraps(lookup)
    def video_processor_class_from_name(class_name: str):
        found = lookup(class_name)
        return None if _is_multimodal_processor(found) else found

    setattr(video_processor_class_from_name, _WRAPPED, True)
    return video_processor_class_from_name


def _is_multimodal_processor(found: object) -> bool:
    from transformers import ProcessorMixin

    return isinstance(found, type) and issubclass(found, ProcessorMixin)
