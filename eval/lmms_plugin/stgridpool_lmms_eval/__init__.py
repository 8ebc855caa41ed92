"""lmms-eval's ``openai`` chat model, plus a per-request ST-GridPool setting.

Registered with lmms-eval through the ``lmms_eval.models`` entry-point group:
``lmms-eval --model stgridpool_openai --model_args ...,stgridpool={"kernel_size":3}``.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="stgridpool_openai",
    chat_class_path="stgridpool_lmms_eval.model.STGridPoolOpenAI",
)
