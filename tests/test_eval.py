"""``eval/run_eval.py`` end to end: real servers, lmms-eval 0.7.3 from ``.venv-eval``, the shipped task.

One run of the driver on the tiny checkpoint at 8 frames: stock pooling, the
defaults (lmms-eval's own ``openai`` model, no trust flag on the server), NSP
alone, kernel 3, and a setting the server refuses (``kernel_size`` 1 costs
more tokens per frame than the server's 2). The weights are random, so the
answers mean nothing; what is checked is the pipeline: every document
answered, each request's prompt tokens equal its text (the checkpoint's chat
template) plus the video's tokens by the formula, the refused setting
counted as failed documents with a non-zero exit, the report written.

Runs with ``make test-eval`` (``STGRIDPOOL_TEST_EVAL=1``), which sets up
``.venv-eval`` first; 6.5 to 9 minutes on 2 cores shared with other jobs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        os.environ.get("STGRIDPOOL_TEST_EVAL") != "1",
        reason="needs .venv-eval and several servers: run with `make test-eval` (STGRIDPOOL_TEST_EVAL=1)",
    ),
]

REPOSITORY = Path(__file__).resolve().parent.parent
FRAMES = 8
SIDE = 378 // 14  # the tiny checkpoint's SigLIP: 27 x 27 patches per frame
DOCS = json.loads((REPOSITORY / "eval/tasks/stgridpool_local/docs.json").read_text())
ANSWERED = ["stock", "defaults", "nsp_alone", "kernel3"]
REFUSED = "kernel1"


def video_tokens(setting: str) -> int:
    """One newline per video (the tiny checkpoint's name is not LLaVA-Video's): T * h * w + 1."""
    if setting == "stock":
        side = math.ceil(SIDE / 2)  # vLLM's stock pooling: bilinear to ceil(27 / 2) = 14
    else:
        kernel = 3 if setting == "kernel3" else 2
        side = SIDE // kernel  # floor windows of side k: 13 at k = 2, 9 at k = 3
    return FRAMES * side * side + 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("eval")
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "eval/run_eval.py"), "--settings", ",".join(ANSWERED),
         "--custom", REFUSED + '={"kernel_size": 1}', "--frames", str(FRAMES), "--output", str(output)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=1800,
        env={k: v for k, v in os.environ.items() if k not in ("MODEL", "TASKS", "SETTINGS", "FRAMES", "LIMIT", "INCLUDE")},
    )
    return output, completed


def samples(output: Path, setting: str) -> list[dict]:
    (path,) = (output / "runs" / setting).rglob("*_samples_stgridpool_local.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def reply(sample: dict) -> str:
    """What lmms-eval scored (it writes ``resps`` only where it differs from ``filtered_resps``)."""
    return json.dumps([sample.get("resps"), sample.get("filtered_resps")])


def test_a_refused_setting_makes_the_run_fail(run):
    output, completed = run
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert f"FAILED: {REFUSED} (4 of 4 docs failed" in completed.stdout
    assert "--trust-request-mm-kwargs" not in completed.stdout  # no server was started with it
    report = json.loads((output / "report.json").read_text())
    (refused,) = [s for s in report["settings"] if s["setting"] == REFUSED]
    assert (refused["docs"], refused["failed_docs"]) == (4, 4)
    assert all("LMMS_EVAL_REQUEST_FAILED" in reply(s) for s in samples(output, REFUSED))


@pytest.mark.parametrize("setting", ANSWERED)
def test_every_doc_answered_with_the_formulas_prompt_tokens(run, onevision_checkpoint, setting):
    output, _ = run
    tokenizer = AutoTokenizer.from_pretrained(onevision_checkpoint)
    answered = samples(output, setting)
    assert sorted(s["doc_id"] for s in answered) == list(range(len(DOCS)))
    for sample in answered:
        assert "LMMS_EVAL_REQUEST_FAILED" not in reply(sample)
        chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": sample["input"]}]}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        text_tokens = len(tokenizer(rendered)["input_ids"]) - 1  # less the one <video> placeholder
        assert sample["token_counts"][0]["input_tokens"] == text_tokens + video_tokens(setting)
    report = json.loads((output / "report.json").read_text())
    (line,) = [s for s in report["settings"] if s["setting"] == setting]
    assert (line["docs"], line["failed_docs"], line["error"], line["video_tokens"]) == (4, 0, "", video_tokens(setting))


def test_the_defaults_ran_lmms_evals_own_openai_model(run):
    output, _ = run
    report = json.loads((output / "report.json").read_text())
    commands = {s["setting"]: s["command"] for s in report["settings"]}
    assert "--model openai " in commands["defaults"] and "pass_video_url=True" in commands["defaults"]
    assert "--model stgridpool_openai " in commands["kernel3"]


def test_the_report_is_written(run):
    output, completed = run
    table = (output / "report.md").read_text()
    for setting in [*ANSWERED, REFUSED]:
        assert f"| {setting}: " in table and f"| {setting}: " in completed.stdout
    assert "agree across settings: True" in table
    assert (output / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
