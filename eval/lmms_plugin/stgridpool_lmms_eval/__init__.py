"""lmms-eval's ``openai`` chat model with the authors' protocol and per-request ST-GridPool settings.

Registered with lmms-eval through the ``lmms_eval.models`` entry-point group
(``lmms-eval --model stgridpool_openai ...``). Nothing is imported from
lmms-eval here: lmms-eval loads this package while it builds its model
registry, and the launcher (``python -m stgridpool_lmms_eval.launch``)
imports it before lmms-eval.
"""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="stgridpool_openai", chat_class_path="stgridpool_lmms_eval.model.STGridPoolOpenAI")
