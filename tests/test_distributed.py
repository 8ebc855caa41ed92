"""Past one engine process: vLLM's data parallelism and Ray, with the plugin in every process.

Heavy (several engines, a Ray cluster): skipped unless
``STGRIDPOOL_TEST_DISTRIBUTED=1``, which ``make test-distributed`` sets after
installing the ``ray`` extra. Expected prompt sizes: text tokens from the
checkpoint's chat template plus the spec's ``T * H' * W' + 1``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.support.servers import cpu_server_args, serving, text_tokens
from tests.test_batch import video_tokens

pytestmark = [
    pytest.mark.engine,
    pytest.mark.distributed,
    pytest.mark.skipif(
        os.environ.get("STGRIDPOOL_TEST_DISTRIBUTED") != "1",
        reason="heavy: run with `make test-distributed` (STGRIDPOOL_TEST_DISTRIBUTED=1)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Describe the video."
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # two ranks on a 2-core machine
PLUGIN_LOADED = "Loading plugin stgridpool"


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


# --- vllm serve --data-parallel-size 2 ------------------------------------------

DP_FRAMES = (16, 8, 5, 12, 16, 8)


@pytest.fixture(scope="module")
def data_parallel_server(onevision_checkpoint, tmp_path_factory):
    yield from serving(
        onevision_checkpoint, tmp_path_factory, "data_parallel",
        "--plugins", "stgridpool", "--data-parallel-size", "2", *cpu_server_args(kv_cache_bytes=256 << 20),
        env={**ONE_CORE_PER_RANK, "VLLM_LOGGING_LEVEL": "DEBUG"},
        timeout=900,
    )


def test_data_parallel_2_serves_with_the_plugin_on_both_ranks(data_parallel_server, onevision_checkpoint,
                                                              mp4_factory):
    client = openai.OpenAI(base_url=data_parallel_server.base_url + "/v1", api_key="EMPTY", max_retries=0)

    def ask(frames: int) -> int:
        response = client.chat.completions.create(
            model=str(onevision_checkpoint), max_tokens=4, temperature=0.0,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": data_url(mp4_factory(frames))}},
                {"type": "text", "text": QUESTION},
            ]}],
        )
        return response.usage.prompt_tokens

    with ThreadPoolExecutor(len(DP_FRAMES)) as pool:
        counts = list(pool.map(ask, DP_FRAMES))
    text = text_tokens(onevision_checkpoint, QUESTION)
    assert counts == [text + video_tokens(frames) for frames in DP_FRAMES]

    log = data_parallel_server.log()
    for process in ("EngineCore_DP0", "EngineCore_DP1"):
        assert re.search(rf"\({process} pid=\d+\).*{PLUGIN_LOADED}", log), process
    workers = set(re.findall(rf"\(VllmWorker\S* pid=(\d+)\).*{PLUGIN_LOADED}", log))
    assert len(workers) == 2

    finished = re.findall(r'^vllm:request_success_total\{[^}]*engine="(\d)"[^}]*\} (\S+)',
                          data_parallel_server.get("/metrics"), re.M)
    per_engine = {}
    for engine, value in finished:
        per_engine[engine] = per_engine.get(engine, 0.0) + float(value)
    assert sorted(per_engine) == ["0", "1"]
    assert sum(per_engine.values()) == len(DP_FRAMES)


# --- Ray -------------------------------------------------------------------------


def test_ray_executor_is_not_available_on_vllm_cpu(onevision_checkpoint):
    """``--distributed-executor-backend ray`` needs a Ray device key, which vLLM's CPU platform lacks.

    This pins the blocker: when a vLLM release runs the Ray executor on CPU,
    this test fails and the README's Ray section should gain the CPU command.
    """
    pytest.importorskip("ray")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU build's limitation")
    script = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM({str(onevision_checkpoint)!r}, tensor_parallel_size=2, distributed_executor_backend='ray',\n"
        "        hf_overrides={'stgridpool': {}}, dtype='float32', max_model_len=16384,\n"
        "        kv_cache_memory_bytes=256 << 20, enforce_eager=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ONE_CORE_PER_RANK, "VLLM_PLUGINS": "stgridpool"})
    assert done.returncode != 0
    assert "current platform cpu does not support ray" in done.stderr


RAY_FRAMES = (12, 16, 8, 5)
RAY_SETTINGS = {"max_frames": 16, "kernel_size": 3}


@pytest.fixture(scope="module")
def ray_data_run(onevision_checkpoint, mp4_factory, tmp_path_factory):
    """``examples/ray_data_videos.py``: two engine replicas as Ray actors, one row per video."""
    pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray_data")
    videos = [shutil.copy(mp4_factory(frames), folder / f"clip{frames}.mp4") for frames in RAY_FRAMES]
    engine_kwargs = {"dtype": "float32", "max_model_len": 16384, "kv_cache_memory_bytes": 256 << 20,
                     "enforce_eager": True}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ray_data_videos.py"), "--model", str(onevision_checkpoint),
         "--cpu", "--concurrency", "2", "--batch-size", "1", "--stgridpool", json.dumps(RAY_SETTINGS),
         "--engine-kwargs", json.dumps(engine_kwargs), *map(str, videos)],
        capture_output=True, text=True, timeout=1500, cwd=folder,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG"},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"path"')]
    rows = {Path(row["path"]).name: row for row in results}
    return rows, done.stdout + done.stderr


def test_ray_data_pipeline_costs_the_formula(ray_data_run, onevision_checkpoint):
    rows, _ = ray_data_run
    text = text_tokens(onevision_checkpoint, QUESTION)
    assert {name: row["prompt_tokens"] for name, row in rows.items()} == {
        f"clip{frames}.mp4": text + video_tokens(frames, kernel_size=3) for frames in RAY_FRAMES
    }


def test_plugin_loads_in_every_ray_engine_actor(ray_data_run):
    """Each engine replica is a Ray actor whose engine core and worker load the plugin."""
    _, log = ray_data_run
    actor = r"\(MapWorker\(MapBatches\(vLLMEngineStageUDF\)\) pid=(\d+)\)\S*"
    for process in ("EngineCore", r"VllmWorker\S*"):
        loaded = set(re.findall(rf"{actor} \({process} pid=\d+\).*{PLUGIN_LOADED}", log))
        assert len(loaded) == 2, (process, loaded)
