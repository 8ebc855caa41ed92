"""Batch inference with the plugin, for real on the tiny checkpoint: ``vllm run-batch`` and offline ``LLM``.

``vllm run-batch`` runs once for the module on a file of good and bad lines,
as the README tells users to run it; the offline example
(``examples/offline_video_batch.py``) runs once as a script. Expected prompt
sizes are not taken from the plugin: the text part comes from the
checkpoint's chat template and tokenizer, the video part from the spec's
``T * H' * W' + 1`` with ``H' = W' = (27 - k) // k + 1``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.engines import two_at_a_time
from tests.support.servers import text_tokens
from vllm_stgridpool_testing.launch import vllm_command

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
GRID = 27
MAX_TOKENS = 4
SIZING = ("--max-model-len", "16384", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20),
          "--enforce-eager")


def video_tokens(frames: int, kernel_size: int = 2) -> int:
    return frames * ((GRID - kernel_size) // kernel_size + 1) ** 2 + 1


def data_url(payload: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(payload).decode()


# --- vllm run-batch -------------------------------------------------------------

QUESTION = "What happens in this video?"


def batch_line(custom_id: str, model: str, video_url: str, mm_processor_kwargs=None) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_url}},
            {"type": "text", "text": QUESTION},
        ]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    if mm_processor_kwargs is not None:
        body["mm_processor_kwargs"] = mm_processor_kwargs
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def vllm_run_batch(onevision_checkpoint, mp4_factory, folder: Path):
    """``vllm run-batch --plugins stgridpool`` over good and bad lines; the output lines by custom_id."""
    media = folder / "media"
    media.mkdir()
    local_clip = shutil.copy(mp4_factory(8), media / "clip8.mp4")
    sixteen = data_url(mp4_factory(16).read_bytes())
    model = str(onevision_checkpoint)
    lines = [
        batch_line("data-url", model, sixteen),
        batch_line("local-file", model, Path(local_clip).as_uri()),
        batch_line("kernel-3", model, sixteen, {"stgridpool": {"kernel_size": 3}}),
        batch_line("costs-more", model, sixteen, {"stgridpool": {"kernel_size": 1}}),
        batch_line("bad-setting", model, sixteen, {"stgridpool": {"kernel_size": 0}}),
        batch_line("other-processor-key", model, sixteen, {"num_frames": 3}),
        batch_line("corrupt-video", model, data_url(b"\x00\x00\x00\x18ftypmp42 not really a video")),
        batch_line("missing-file", model, (media / "no_such_clip.mp4").as_uri()),
        batch_line("outside-media-path", model, Path(__file__).as_uri()),
    ]
    requests = folder / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = folder / "results.jsonl"
    done = subprocess.run(
        [*vllm_command(), "run-batch", "--plugins", "stgridpool", "-i", str(requests), "-o", str(results),
         "--model", model, "--allowed-local-media-path", str(media), *SIZING],
        capture_output=True, text=True, timeout=900, cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    outputs = [json.loads(line) for line in results.read_text().splitlines()]
    by_id = {output["custom_id"]: output for output in outputs}
    assert len(by_id) == len(outputs) == len(lines)
    return by_id, done.stderr


@pytest.fixture(scope="module")
def batch_runs(onevision_checkpoint, mp4_factory, tmp_path_factory) -> dict:
    """The module's two engines, ``vllm run-batch`` and the offline example, started side by side."""
    runs = {
        "run-batch": lambda: vllm_run_batch(onevision_checkpoint, mp4_factory, tmp_path_factory.mktemp("run_batch")),
        "offline": lambda: offline_example(onevision_checkpoint, mp4_factory, tmp_path_factory.mktemp("offline")),
    }
    return dict(zip(runs, two_at_a_time(*runs.values())))


@pytest.fixture(scope="module")
def run_batch(batch_runs):
    return batch_runs["run-batch"].result()


@pytest.fixture(scope="module")
def batch_text_tokens(onevision_checkpoint) -> int:
    return text_tokens(onevision_checkpoint, QUESTION)


def usage(output: dict) -> dict:
    assert output["error"] is None, output["error"]
    assert output["response"]["status_code"] == 200
    return output["response"]["body"]["usage"]


def error_message(output: dict, status: int | None = 400) -> str:
    """The error of a failed line (``status`` None: any error status)."""
    code = output["response"]["status_code"]
    assert code == status if status is not None else code >= 400, output
    assert output["response"].get("body") is None
    return json.dumps(output["error"])


def test_data_url_and_local_file_lines_cost_the_formula(run_batch, batch_text_tokens):
    outputs, _ = run_batch
    assert usage(outputs["data-url"])["prompt_tokens"] == batch_text_tokens + video_tokens(16)
    assert usage(outputs["local-file"])["prompt_tokens"] == batch_text_tokens + video_tokens(8)
    assert 1 <= usage(outputs["data-url"])["completion_tokens"] <= MAX_TOKENS


def test_per_line_stgridpool_setting_without_trusting_every_processor_kwarg(run_batch, batch_text_tokens):
    """The ``stgridpool`` object alone needs no ``--trust-request-mm-kwargs`` (P6)."""
    outputs, _ = run_batch
    assert usage(outputs["kernel-3"])["prompt_tokens"] == batch_text_tokens + video_tokens(16, kernel_size=3)


def test_per_line_settings_follow_the_server_rules(run_batch):
    """Same caps as the server: never costlier than the engine's setting, values checked."""
    outputs, _ = run_batch
    assert "more than this server" in error_message(outputs["costs-more"])
    assert "kernel_size" in error_message(outputs["bad-setting"])


def test_other_processor_kwargs_stay_refused(run_batch):
    outputs, _ = run_batch
    message = error_message(outputs["other-processor-key"])
    assert "mm_processor_kwargs" in message and "--trust-request-mm-kwargs" in message


def test_bad_videos_get_an_error_line_and_the_rest_completes(run_batch):
    outputs, log = run_batch
    assert "decode" in error_message(outputs["corrupt-video"]).lower()
    # vLLM 0.32 answers a missing file under the allowed folder with a 500 (an unhandled OSError).
    assert "No such file or directory" in error_message(outputs["missing-file"], status=500)
    assert "allowed-local-media-path" in error_message(outputs["outside-media-path"])
    assert "Running batch: 100% Completed" in log


# --- offline LLM: the example script -------------------------------------------

OFFLINE_FRAMES = (16, 7, 5)
EXAMPLE_QUESTION = "Describe the video."


def offline_example(onevision_checkpoint, mp4_factory, folder: Path):
    """``examples/offline_video_batch.py`` on three clips: llm.chat, then llm.generate with k=2 and k=3."""
    videos = [shutil.copy(mp4_factory(frames), folder / f"clip{frames}.mp4") for frames in OFFLINE_FRAMES]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offline_video_batch.py"), "--model", str(onevision_checkpoint),
         "--cpu", "--max-tokens", str(MAX_TOKENS), "--request-settings", '[{}, {"kernel_size": 3}]', *map(str, videos)],
        capture_output=True, text=True, timeout=900, cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return answers, done.stderr


@pytest.fixture(scope="module")
def offline_run(batch_runs):
    return batch_runs["offline"].result()


def test_offline_chat_over_many_videos_costs_the_formula(offline_run, onevision_checkpoint):
    answers, _ = offline_run
    text = text_tokens(onevision_checkpoint, EXAMPLE_QUESTION)
    chat = [a for a in answers if a["api"] == "chat"]
    assert [a["video"] for a in chat] == [f"clip{frames}.mp4" for frames in OFFLINE_FRAMES]
    assert [a["prompt_tokens"] for a in chat] == [text + video_tokens(frames) for frames in OFFLINE_FRAMES]


def test_offline_generate_takes_per_prompt_settings(offline_run, onevision_checkpoint):
    answers, _ = offline_run
    text = text_tokens(onevision_checkpoint, EXAMPLE_QUESTION)
    generate = [a for a in answers if a["api"] == "generate"]
    expected = [
        (f"clip{frames}.mp4", settings, text + video_tokens(frames, settings.get("kernel_size", 2)))
        for frames in OFFLINE_FRAMES
        for settings in ({}, {"kernel_size": 3})
    ]
    assert [(a["video"], a["stgridpool"], a["prompt_tokens"]) for a in generate] == expected


def test_frames_decoded_like_the_engine_give_the_chat_answer(offline_run):
    """generate's own decoding (the engine's loader and frame count) sees what chat sees: same greedy tokens."""
    answers, _ = offline_run
    chat = {a["video"]: a for a in answers if a["api"] == "chat"}
    for answer in answers:
        if answer["api"] == "generate" and answer["stgridpool"] == {}:
            assert answer["output_token_ids"] == chat[answer["video"]]["output_token_ids"]
            assert answer["prompt_tokens"] == chat[answer["video"]]["prompt_tokens"]


def test_offline_runs_show_vllms_progress_bar(offline_run):
    _, log = offline_run
    assert f"Processed prompts: 100%" in log
    assert f"{len(OFFLINE_FRAMES) * 2}/{len(OFFLINE_FRAMES) * 2}" in log
