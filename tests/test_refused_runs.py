"""What README.md says refuses a whole run or start-up, done for real.

- ``vllm run-batch``: a line that is not a valid request stops the run
  before any result is written (vLLM validates each line against its
  ``BatchRequestInput`` before it answers any);
- ``examples/video_batch_requests.py`` checks each line against that same
  model as it writes it;
- LLaVA-NeXT-Video with ``"video_newline": "grid"``: ``vllm serve`` stops at
  start-up, naming the setting;
- offline ``LLM(..., data_parallel_size=2)`` is refused by vLLM itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.engines import two_at_a_time
from vllm_stgridpool_testing.launch import vllm_command

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
SIZING = ("--max-model-len", "16384", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20),
          "--enforce-eager")


def run(command: list[str], folder: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=folder)


def example_lines(videos: list[Path], model: str, output: Path, *extra: str) -> list[dict]:
    """``examples/video_batch_requests.py`` run as the README shows; the lines it wrote."""
    done = run([sys.executable, str(ROOT / "examples" / "video_batch_requests.py"), "--model", model,
                "-o", str(output), *extra, *map(str, videos)], output.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


def run_batch_with_a_broken_line(checkpoint, mp4_factory, folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``vllm run-batch --plugins stgridpool`` on the example's lines with one broken line between them."""
    clip = shutil.copy(mp4_factory(4), folder / "clip4.mp4")
    good = example_lines([Path(clip)], str(checkpoint), folder / "written.jsonl", "--max-tokens", "2")[0]
    broken = json.dumps(good)[:-20]  # cut short: not JSON
    requests = folder / "requests.jsonl"
    requests.write_text("\n".join([json.dumps(good), broken, json.dumps({**good, "custom_id": "after"})]) + "\n")
    results = folder / "results.jsonl"
    done = run([*vllm_command(), "run-batch", "--plugins", "stgridpool", "-i", str(requests), "-o", str(results),
                "--model", str(checkpoint), "--allowed-local-media-path", str(folder), *SIZING], folder)
    return done, results


def serve_next_video_in_the_grid_layout(checkpoint, folder: Path) -> subprocess.CompletedProcess:
    """``vllm serve`` of LLaVA-NeXT-Video with ``"video_newline": "grid"``: it must end by itself."""
    overrides = json.dumps({"stgridpool": {"video_newline": "grid"}})
    return run([*vllm_command(), "serve", str(checkpoint), "--plugins", "stgridpool", "--hf-overrides", overrides,
                "--port", "0", *SIZING], folder, timeout=600)


@pytest.fixture(scope="module")
def runs(onevision_checkpoint, next_video_checkpoint, mp4_factory, tmp_path_factory) -> dict:
    launches = {
        "run-batch": lambda: run_batch_with_a_broken_line(
            onevision_checkpoint, mp4_factory, tmp_path_factory.mktemp("run_batch")
        ),
        "grid": lambda: serve_next_video_in_the_grid_layout(next_video_checkpoint, tmp_path_factory.mktemp("grid")),
    }
    return dict(zip(launches, two_at_a_time(*launches.values())))


def test_a_broken_line_stops_run_batch_before_anything_is_written(runs):
    done, results = runs["run-batch"].result()
    assert done.returncode != 0
    assert "Invalid JSON" in done.stderr and "BatchRequestInput" in done.stderr, done.stderr[-3000:]
    assert not results.exists()  # not even the line before it


def test_the_example_writes_lines_vllm_accepts_and_checks_each(mp4_factory, tmp_path, monkeypatch):
    """Its lines pass vLLM's own request model (with a setting and inlined videos too); a line that
    would not is refused as it is written, naming the field, and is not in the file."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import video_batch_requests
    from pydantic import ValidationError
    from vllm.entrypoints.launchers.run_batch import BatchRequestInput

    videos = [shutil.copy(mp4_factory(frames), tmp_path / f"clip{frames}.mp4") for frames in (4, 7)]
    lines = example_lines(videos, "llava-video", tmp_path / "requests.jsonl", "--data-urls",
                          "--stgridpool", '{"kernel_size": 3}')
    assert [line["custom_id"] for line in lines] == ["clip4.mp4", "clip7.mp4"]
    for line in lines:
        request = BatchRequestInput.model_validate(line)
        assert request.body.mm_processor_kwargs == {"stgridpool": {"kernel_size": 3}}
        assert line["body"]["messages"][0]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")

    written_by_the_example = video_batch_requests.request_line

    def messages_not_a_list(*args, **kwargs) -> dict:
        line = written_by_the_example(*args, **kwargs)
        return {**line, "body": {**line["body"], "messages": "Describe the video."}}

    monkeypatch.setattr(video_batch_requests, "request_line", messages_not_a_list)
    output = tmp_path / "refused.jsonl"
    with pytest.raises(ValidationError, match="messages"):
        video_batch_requests.main(["--model", "llava-video", "-o", str(output), str(videos[0])])
    assert output.read_text() == ""


def test_next_video_in_the_grid_layout_stops_the_server_at_start_up(runs):
    done = runs["grid"].result()  # ended by itself: a server that started would run until the timeout
    assert done.returncode != 0
    assert 'video_newline "grid" is LLaVA-Video\'s layout' in done.stdout + done.stderr, done.stderr[-3000:]


def test_offline_data_parallel_2_is_refused_by_vllm(onevision_checkpoint, tmp_path):
    script = (
        "import sys\n"
        "from vllm import LLM\n"
        "LLM(model=sys.argv[1], data_parallel_size=2, dtype='float32', max_model_len=4096,\n"
        "    kv_cache_memory_bytes=256 << 20, enforce_eager=True, hf_overrides={'stgridpool': {}})\n"
        "print('STARTED')\n"
    )
    done = run([sys.executable, "-c", script, str(onevision_checkpoint)], tmp_path, timeout=600)
    assert done.returncode != 0 and "STARTED" not in done.stdout
    assert "LLM(data_parallel_size=2) is not supported" in done.stderr, done.stderr[-3000:]
