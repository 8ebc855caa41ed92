"""The vLLM internals the model classes in ``vllm_stgridpool/models/`` override or call.

The families subclass vLLM's LLaVA-OneVision and LLaVA-NeXT-Video classes
(model, processing info, multimodal processor) and override private methods
that vLLM calls by name. A vLLM that renamed one, or calls it with other
arguments, would leave an override silently uncalled (the stock pooling and
token count served under the plugin's name) or fail on the first request.
:data:`GUARD` lists each of them with the parameters it relies on; the
plugin checks it in :func:`vllm_stgridpool.plugin.refusal`, before it
registers anything, so such a vLLM gets the plugin's refusal naming what
changed (patches/README.md, "Class overrides").

Three kinds of checks, all on vLLM's own classes (never on the plugin's):

- :class:`Signature`: a method the plugin overrides must exist and take
  exactly the parameters of the override (vLLM calls the override as it
  calls its own method);
- :class:`~vllm_stgridpool.compat.Feature`: a method or class the plugin
  calls must take the parameters the plugin passes by name;
- :class:`SetInInit` and :class:`Fields`: attributes a stock ``__init__``
  sets (the vision tower, the pooler, ...) and keys of vLLM's typed
  dictionaries that the plugin reads.
"""

from __future__ import annotations

import dataclasses
import inspect

from vllm_stgridpool.compat import Feature, Guard

ONEVISION = "vllm.model_executor.models.llava_onevision"
NEXT_VIDEO = "vllm.model_executor.models.llava_next_video"


def signature_text(function: object) -> str:
    """``function``'s parameters after the first (``self``), as a def would write them: ``a, b, *, c``."""
    parts: list[str] = []
    params = list(inspect.signature(function).parameters.values())[1:]
    for index, param in enumerate(params):
        if param.kind is param.KEYWORD_ONLY and not any(p.kind is p.VAR_POSITIONAL for p in params[:index]):
            if "*" not in parts:
                parts.append("*")
        if param.kind is param.VAR_POSITIONAL:
            parts.append("*" + param.name)
        elif param.kind is param.VAR_KEYWORD:
            parts.append("**" + param.name)
        else:
            parts.append(param.name)
        if param.kind is param.POSITIONAL_ONLY and (index + 1 == len(params) or params[index + 1].kind is not param.POSITIONAL_ONLY):
            parts.append("/")
    return ", ".join(parts)


class Signature(Feature):
    """A vLLM method that must exist and take exactly ``signature`` (its parameters after
    ``self``, e.g. ``"*, image_width, image_height"``): one the plugin overrides (vLLM calls
    the override as it calls its own), or one it calls with every keyword it was given."""

    def __init__(self, module: str, attribute: str, signature: str) -> None:
        super().__init__(module, attribute)
        self.signature = signature

    def resolve(self) -> object:
        found = super().resolve()
        actual = signature_text(found)
        if actual != self.signature:
            raise LookupError(f"{self} takes ({actual}); the plugin expects ({self.signature})")
        return found


class SetInInit(Feature):
    """Attributes the ``__init__`` of vLLM class ``attribute`` sets on its instances and the plugin reads."""

    def __init__(self, module: str, attribute: str, names: tuple[str, ...]) -> None:
        super().__init__(module, attribute)
        self.names = tuple(names)

    def resolve(self) -> object:
        found = super().resolve()
        assigned = found.__init__.__code__.co_names  # the attribute names its own code stores or reads
        missing = [name for name in self.names if name not in assigned]
        if missing:
            raise LookupError(f"{self}.__init__ no longer sets {', '.join(missing)}")
        return found


class Fields(Feature):
    """Keys of a vLLM ``TypedDict`` (or fields of a dataclass) that the plugin reads or replaces."""

    def __init__(self, module: str, attribute: str, names: tuple[str, ...]) -> None:
        super().__init__(module, attribute)
        self.names = tuple(names)

    def resolve(self) -> object:
        found = super().resolve()
        known = {field.name for field in dataclasses.fields(found)} if dataclasses.is_dataclass(found) else set()
        for cls in inspect.getmro(found):
            known.update(getattr(cls, "__annotations__", {}))
        missing = [name for name in self.names if name not in known]
        if missing:
            raise LookupError(f"{self} has no field {', '.join(missing)}")
        return found


def _processing_info(module: str, cls: str) -> tuple[Feature, ...]:
    """What models/common.py's ``STGridPoolProcessingInfo`` overrides and calls on a family's info class."""
    return (
        Signature(module, f"{cls}.get_num_video_tokens", "*, image_width, image_height, num_frames"),
        Signature(module, f"{cls}._get_num_frame_tokens", "*, image_width, image_height"),
        Signature(module, f"{cls}.get_num_frames_with_most_features", "seq_len, mm_counts"),
        Feature(module, f"{cls}._get_max_video_frames", ("max_tokens",)),
        Feature(module, f"{cls}.get_image_size_with_most_features"),
        Feature(module, f"{cls}.get_vision_encoder_info"),
        Feature(module, f"{cls}.get_hf_config"),
    )


def _processor(module: str, cls: str) -> tuple[Feature, ...]:
    """What models/common.py's ``STGridPoolProcessorMixin`` overrides on a family's processor class."""
    return (
        Signature(module, f"{cls}.apply", "inputs, timing_ctx"),
        Signature(module, f"{cls}._apply_hf_processor_main", "mm_items, hf_kwargs"),
        Signature(module, f"{cls}._get_mm_fields_config", "hf_inputs, hf_processor_mm_kwargs"),
        Signature(module, f"{cls}._get_prompt_updates", "mm_items, hf_processor_mm_kwargs, out_mm_kwargs"),
    )


GUARD = Guard(
    "class overrides",
    "LLaVA-OneVision and LLaVA-NeXT-Video model, processing info and processor",
    (
        # The processing info of both families (token counts, profiling sizes).
        *_processing_info(ONEVISION, "LlavaOnevisionProcessingInfo"),
        *_processing_info(NEXT_VIDEO, "LlavaNextVideoProcessingInfo"),
        SetInInit("vllm.multimodal.processing.context", "BaseProcessingInfo", ("ctx",)),
        Feature("vllm.model_executor.models.vision", "VisionEncoderInfo.get_patch_grid_length"),
        # The multimodal processor of both families (request settings, placeholders, the per-video field).
        *_processor(ONEVISION, "LlavaOnevisionMultiModalProcessor"),
        *_processor(NEXT_VIDEO, "LlavaNextVideoMultiModalProcessor"),
        SetInInit("vllm.multimodal.processing.processor", "BaseMultiModalProcessor", ("info",)),
        Fields("vllm.multimodal.processing.inputs", "ProcessorInputs", ("mm_data_items", "hf_processor_mm_kwargs")),
        Fields("vllm.inputs.engine", "MultiModalInput", ("mm_placeholders",)),
        Feature("vllm.multimodal.inputs", "PlaceholderRange", ("length",)),
        Feature("vllm.multimodal.inputs", "MultiModalFieldConfig.batched", ("modality", "keep_on_cpu")),
        Feature("vllm.multimodal.processing", "PromptReplacement", ("modality", "target", "replacement")),
        Feature("vllm.multimodal.parse", "MultiModalDataItems.get_items", ("modality", "typ")),
        Feature("vllm.multimodal.parse", "VideoProcessorItems", ("data", "metadata")),
        Feature("vllm.multimodal.parse", "VideoProcessorItems.get_num_frames", ("item_idx",)),
        Feature("vllm.multimodal.parse", "VideoProcessorItems.get_count"),
        Feature("vllm.multimodal.parse", "VideoProcessorItems.get", ("index",)),
        Feature("vllm.multimodal.parse", "VideoEmbeddingItems.get_feature_size", ("item_idx",)),
        Feature("vllm.multimodal", "MULTIMODAL_REGISTRY.register_processor", ("info", "dummy_inputs")),
        # LLaVA-OneVision's model: its video path replaced, its image path and stock pooling called.
        Signature(ONEVISION, "LlavaOnevisionForConditionalGeneration.__init__", "*, vllm_config, prefix"),
        Signature(ONEVISION, "LlavaOnevisionForConditionalGeneration.embed_multimodal", "**kwargs"),
        Signature(ONEVISION, "LlavaOnevisionForConditionalGeneration._parse_and_validate_multimodal_inputs", "**kwargs"),
        Feature(ONEVISION, "LlavaOnevisionForConditionalGeneration._process_image_input", ("image_input",)),
        Feature(ONEVISION, "LlavaOnevisionForConditionalGeneration.apply_pooling", ("image_features",)),
        SetInInit(
            ONEVISION,
            "LlavaOnevisionForConditionalGeneration",
            ("config", "vision_tower", "multi_modal_projector", "image_newline"),
        ),
        Feature(ONEVISION, "LlavaOnevisionDummyInputsBuilder"),
        # LLaVA-NeXT-Video's model: its video path replaced, its pooler called, its LoRA counts overridden.
        Signature(NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration.__init__", "*, vllm_config, prefix"),
        Signature(NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration.embed_multimodal", "**kwargs"),
        Signature(
            NEXT_VIDEO,
            "LlavaNextVideoForConditionalGeneration.get_mm_lora_token_counts",
            "*, modality, mm_kwargs, num_mm_embeds",
        ),
        Signature(NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration._parse_and_validate_video_input", "**kwargs"),
        SetInInit(
            NEXT_VIDEO,
            "LlavaNextVideoForConditionalGeneration",
            ("config", "vision_tower", "vision_resampler", "multi_modal_projector", "patch_grid_length"),
        ),
        Feature(NEXT_VIDEO, "LlavaNextVideoDummyInputsBuilder"),
        # The vision towers both families build (init_vision_tower_for_llava), called with the feature strategy.
        Feature("vllm.model_executor.models.siglip", "SiglipVisionModel.forward", ("feature_select_strategy",)),
        Feature("vllm.model_executor.models.clip", "CLIPVisionModel.forward", ("feature_select_strategy",)),
    ),
)
