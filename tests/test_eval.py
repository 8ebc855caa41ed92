"""``eval/run_eval.py`` end to end: real servers, lmms-eval 0.7.3 from ``.venv-eval``, the six benchmarks' stand-ins.

Two runs of the driver on the tiny checkpoint at 8 frames at most (1 fps):

- ``full``: ST-GridPool's defaults over every stand-in (VideoMME, EgoSchema
  subset and full set, NExT-QA, LongVideoBench, TempCompass, MVBench with a
  frame-folder task), TempCompass's judge off;
- ``settings``: the VideoMME stand-in under stock pooling, the defaults, NSP
  alone, NSP alone again (a custom setting with the same object) and a setting
  the server refuses (``kernel_size`` 1).

The weights are random, so the answers mean nothing; what is checked is that
every document is answered as the authors' harness would ask it (prompt
tokens: the chat template with the ``qwen_1_5`` system prompt plus the
formula at the frames the 1-fps rule takes), that the report is the hand
computation from lmms-eval's logged samples on one scale with standard
errors, that failures score 0, that judge-less documents are counted and
marked, and that two settings differing only in their pyramid reach the
server as different requests.

Runs with ``make test-eval`` (``STGRIDPOOL_TEST_EVAL=1``), which sets up ``.venv-eval`` first.
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
ST_SIDE, STOCK_SIDE = (27 - 2) // 2 + 1, math.ceil(27 / 2)  # ST-GridPool's kernel-2 grid, stock's bilinear grid
SYSTEM = "You are a helpful assistant."
FAILED = "[LMMS_EVAL_REQUEST_FAILED"
NSP = '{"grid_sizes": [], "grid_strides": []}'
# The frames the 1-fps rule takes, capped at FRAMES: a clip of n frames at 8 fps lasts n / 8 s (vLLM's loader:
# min(FRAMES, floor(seconds))); a folder of n TVQA frames (3 fps): every third, or FRAMES uniform when more.
VIDEOMME_FRAMES = [4, 4, 8]  # standin_square (32 frames: 4 s), twice; standin_long (120 frames: 15 s)
EPISODIC_FRAMES = [8, 4]  # folders of 30 frames (10 > 8: uniform) and 12 frames (every third: 4)
# How each benchmark's own process_results output says "right", as its aggregation reads it.
RIGHT = {
    "videomme_perception_score": lambda m: m["score"] == 1,
    "score": lambda m: str(m["ground_truth"]) == str(m["pred"]),
    "lvb_acc": lambda m: m["answer"] == m["parsed_pred"],
    "exact_match": bool,
    "avg_accuracy": lambda m: m["rating"] == 1,
    "mvbench_accuracy": lambda m: m["score"] == 1 and m["pred_answer"] != "",
}


def drive(output: Path, *args: str) -> subprocess.CompletedProcess:
    variables = ("MODEL", "TASKS", "SETTINGS", "FRAMES", "LIMIT", "INCLUDE", "FPS", "PROMPTS", "JUDGE", "CONCURRENCY")
    return subprocess.run(
        [sys.executable, str(REPOSITORY / "eval/run_eval.py"), "--frames", str(FRAMES), "--judge", "off",
         "--output", str(output), *args],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=1800,
        env={k: v for k, v in os.environ.items() if k not in variables},
    )


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    output = tmp_path_factory.mktemp("eval_full")
    return output, drive(output, "--settings", "defaults")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    output = tmp_path_factory.mktemp("eval_settings")
    return output, drive(output, "--tasks", "videomme_standin", "--settings", "stock,defaults,nsp_alone",
                         "--custom", f"nsp_again={NSP}", "--custom", 'kernel1={"kernel_size": 1}')


def report(output: Path) -> dict:
    return json.loads((output / "report.json").read_text())


def row(output: Path, setting: str) -> dict:
    (found,) = [r for r in report(output)["settings"] if r["setting"] == setting]
    return found


def samples(output: Path, setting: str, benchmark: str) -> dict[str, list[dict]]:
    """lmms-eval's logged samples of one run, by task."""
    found = {}
    for path in sorted((output / "runs" / setting / benchmark).rglob("*_samples_*.jsonl")):
        task = path.stem.split("_samples_", 1)[1]
        found[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return found


def hand_accuracy(logged: dict[str, list[dict]]) -> tuple[float, float]:
    """Percent and standard error from the logged samples alone: a failed request 0, otherwise the task's own
    verdict as lmms-eval logged it; a benchmark of several tasks is their mean."""
    parts = []
    for task_samples in logged.values():
        scores = []
        for sample in task_samples:
            metric = next(name for name in RIGHT if name in sample)
            reply = sample["filtered_resps"]
            scores.append(0 if reply.startswith(FAILED) else int(RIGHT[metric](sample[metric])))
        p = sum(scores) / len(scores)
        parts.append((100 * p, 100 * math.sqrt(p * (1 - p) / len(scores))))
    return sum(p for p, _ in parts) / len(parts), math.sqrt(sum(se * se for _, se in parts)) / len(parts)


def text_tokens(tokenizer, text: str) -> int:
    chat = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(rendered)["input_ids"]) - 1  # less the one <video> placeholder


def test_every_stand_in_answered_on_one_scale(full):
    output, completed = full
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    defaults = row(output, "defaults")
    assert defaults["failed"] == 0 and defaults["error"] == "" and defaults["docs"] == 23
    scored = {b for b, a in defaults["accuracy"].items() if a["percent"] is not None}
    assert scored == {"videomme_standin", "egoschema_subset_standin", "nextqa_mc_test_standin",
                      "longvideobench_val_v_standin", "tempcompass_standin", "mvbench_standin"}
    table = (output / "report.md").read_text()
    for benchmark in scored:
        accuracy = defaults["accuracy"][benchmark]
        assert 0 <= accuracy["percent"] <= 100 and accuracy["se"] >= 0  # percent, never a fraction
        assert f"{accuracy['percent']:.1f} ± {accuracy['se']:.1f}" in table
    assert (output / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_is_the_hand_computation_from_the_samples(full):
    output, _ = full
    for benchmark, accuracy in row(output, "defaults")["accuracy"].items():
        if accuracy["percent"] is None:
            continue
        percent, se = hand_accuracy(samples(output, "defaults", benchmark))
        assert (accuracy["percent"], accuracy["se"]) == pytest.approx((percent, se), abs=1e-9), benchmark


def test_prompts_are_the_authors_protocol(full, onevision_checkpoint):
    """The qwen_1_5 system prompt, then the video at the frames the 1-fps rule takes (a frame folder too)."""
    output, _ = full
    tokenizer = AutoTokenizer.from_pretrained(onevision_checkpoint)
    cases = [(samples(output, "defaults", "videomme_standin")["videomme_standin"], VIDEOMME_FRAMES),
             (samples(output, "defaults", "mvbench_standin")["mvbench_episodic_reasoning_standin"], EPISODIC_FRAMES)]
    for logged, frames in cases:
        for sample, t in zip(logged, frames, strict=True):
            expected = text_tokens(tokenizer, sample["input"]) + t * ST_SIDE * ST_SIDE + 1
            assert sample["token_counts"][0]["input_tokens"] == expected, sample["doc_id"]
    assert "Answer with the option's letter from the given choices directly." in cases[0][0][0]["input"]
    stats = row(output, "defaults")["runs"]
    (mvbench,) = [r for r in stats if r["benchmark"] == "mvbench_standin"]
    assert mvbench["stats"]["frame_folders"] == 2


def test_judge_less_documents_are_counted_and_marked(full):
    output, _ = full
    accuracy = row(output, "defaults")["accuracy"]["tempcompass_standin"]
    logged = samples(output, "defaults", "tempcompass_standin")
    captioning = len(logged.pop("tempcompass_captioning_standin"))  # always judged
    unread = sum(not s["avg_accuracy"]["match_success"] for task in logged.values() for s in task)
    assert accuracy["judged"] == unread + captioning and accuracy["unjudged"] == accuracy["judged"]
    assert accuracy["incomplete"] == (accuracy["unjudged"] > 0)
    assert ("(incomplete)" in (output / "report.md").read_text()) == accuracy["incomplete"]


def test_egoschema_full_set_answers_are_written_for_its_server(full):
    output, _ = full
    submission = row(output, "defaults")["submissions"]["egoschema_standin"]
    answers = json.loads(Path(submission["file"]).read_text())
    assert sorted(answers) == ["standin-ego-1", "standin-ego-2"] and submission["missing"] == []
    assert all(answer in range(-1, 5) for answer in answers.values())


def test_stock_and_settings_reach_the_server(settings, onevision_checkpoint):
    output, completed = settings
    tokenizer = AutoTokenizer.from_pretrained(onevision_checkpoint)
    for setting, side in (("stock", STOCK_SIDE), ("defaults", ST_SIDE), ("nsp_alone", ST_SIDE)):
        logged = samples(output, setting, "videomme_standin")["videomme_standin"]
        for sample, t in zip(logged, VIDEOMME_FRAMES, strict=True):
            assert FAILED not in sample["filtered_resps"]
            expected = text_tokens(tokenizer, sample["input"]) + t * side * side + 1
            assert sample["token_counts"][0]["input_tokens"] == expected, (setting, sample["doc_id"])


def test_a_pyramid_change_reaches_the_server(settings):
    """NSP alone has the defaults' token counts; the server's prefix cache tells the requests apart: repeating NSP
    alone reuses every full 128-token block of every prompt, NSP alone after the defaults does not (its videos
    hash differently; only documents sharing a video within the run share blocks)."""
    output, _ = settings
    cache = {name: row(output, name)["runs"][0]["prefix_cache"] for name in ("nsp_alone", "nsp_again")}
    docs = len(samples(output, "nsp_again", "videomme_standin")["videomme_standin"])
    again, alone = cache["nsp_again"], cache["nsp_alone"]
    assert again["prefix_cache_queries"] == alone["prefix_cache_queries"]  # the same prompts
    assert again["prefix_cache_hits"] >= again["prefix_cache_queries"] - docs * 128
    assert alone["prefix_cache_hits"] < alone["prefix_cache_queries"] - docs * 128


def test_a_refused_setting_scores_zero_without_parsing(settings):
    output, completed = settings
    assert completed.returncode == 1
    assert "FAILED: kernel1 (3 of 3 docs failed" in completed.stdout
    refused = row(output, "kernel1")
    accuracy = refused["accuracy"]["videomme_standin"]
    assert (accuracy["percent"], accuracy["se"], accuracy["failed"], accuracy["incomplete"]) == (0, 0, 3, True)
    logged = samples(output, "kernel1", "videomme_standin")["videomme_standin"]
    assert all(s["filtered_resps"].startswith(FAILED) and "400" in s["filtered_resps"] for s in logged)
    # Parsed as VideoMME's parser reads it, the failure text would have been "D": right on the second document.
    assert logged[1]["videomme_perception_score"]["pred_answer"] == "D" == logged[1]["target"]
    (line,) = [x for x in (output / "report.md").read_text().splitlines() if x.startswith("| kernel1:")]
    assert line.endswith("| 0.0 ± 0.0 (incomplete) |")
