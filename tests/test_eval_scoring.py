"""The benchmarks' own scorers on known replies, and lmms-eval surviving missing videos (``.venv-eval``, no server).

``stgridpool_lmms_eval.score`` scores logged samples written here as
lmms-eval writes them, for every stand-in task: the right option scores 1
(100 %), a failed request 0 without being parsed (each failure sits on the
document whose answer the task's parser would have read out of the failure
text: VideoMME and NExT-QA and EgoSchema "D", MVBench "A", LongVideoBench
"E"), a TempCompass reply its rules cannot read keeps the verdict the run
logged, a reply a parser can only guess at gets the same guess every time.
Then lmms-eval itself runs every stand-in through the launcher with no
``HF_HOME`` and no videos: every document is a failed request, no task stops
the run.

Runs with ``make test-eval`` (``STGRIDPOOL_TEST_EVAL=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("STGRIDPOOL_TEST_EVAL") != "1",
    reason="needs .venv-eval: run with `make test-eval` (STGRIDPOOL_TEST_EVAL=1)",
)

REPOSITORY = Path(__file__).resolve().parent.parent
EVAL_PYTHON = REPOSITORY / ".venv-eval" / "bin" / "python"
sys.path.insert(0, str(REPOSITORY / "eval"))
import standins  # noqa: E402

FAIL = "[LMMS_EVAL_REQUEST_FAILED after 1 retries] Error code: 400 - video over a limit"
GROUPS = {"tempcompass_standin": ["tempcompass_multi_choice_standin", "tempcompass_yes_no_standin",
                                  "tempcompass_caption_matching_standin", "tempcompass_captioning_standin"],
          "mvbench_standin": ["mvbench_episodic_reasoning_standin", "mvbench_action_antonym_standin"]}
# task: [(reply, logged metric or None, expected score)]
CASES = {
    "videomme_standin": [("A", None, 1), (FAIL, None, 0), ("B", None, 0)],
    "egoschema_subset_standin": [("A.", None, 1), (FAIL, None, 0), ("(B)", None, 0)],
    "nextqa_mc_test_standin": [("B", None, 1), (FAIL, None, 0), ("E. each frame has its own colour", None, 1)],
    "longvideobench_val_v_standin": [("B", None, 1), (FAIL, None, 0), ("The best answer is B.", None, 1)],
    "mvbench_episodic_reasoning_standin": [(FAIL, None, 0), ("B", None, 1)],
    "mvbench_action_antonym_standin": [("A", None, 1)],
    "tempcompass_multi_choice_standin": [
        ("B", None, 1),
        ("the bar moves one step every frame", {"chatgpt_response": "Correct", "rating": 1}, 1),
    ],
    "tempcompass_yes_no_standin": [("yes", None, 1), (FAIL, None, 0)],
    "tempcompass_caption_matching_standin": [("Caption A", None, 1)],
    "tempcompass_captioning_standin": [("A square moves to the right.", {"rating": -1}, 0)],
    "egoschema_standin": [("C", None, None), (FAIL, None, None)],
}
UNREADABLE = "a reply with no option in it at all"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The stand-in tasks written against .venv-eval's lmms-eval, and their media."""
    root = tmp_path_factory.mktemp("standins")
    where = "import lmms_eval, os; print(os.path.dirname(lmms_eval.__file__))"
    lmms_eval = Path(subprocess.run([str(EVAL_PYTHON), "-c", where], capture_output=True, text=True).stdout.strip())
    standins.write(list(standins.standins()), lmms_eval / "tasks", root / "tasks", root / "home")
    return root


def write_run(folder: Path, replies: dict[str, list[tuple]]) -> None:
    """Samples files and a results file laid out as lmms-eval writes them."""
    out = folder / "model"
    out.mkdir(parents=True)
    for task, rows in replies.items():
        lines = []
        for doc_id, (reply, logged, _) in enumerate(rows):
            sample = {"doc_id": doc_id, "filtered_resps": reply, "token_counts": [{"input_tokens": 100}]}
            if logged is not None:
                sample["avg_accuracy"] = logged
            lines.append(json.dumps(sample))
        (out / f"20260101_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "20260101_results.json").write_text(json.dumps({"group_subtasks": GROUPS}))


def score(tasks: Path, runs: dict[str, Path], tmp_path: Path) -> dict:
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"include": [str(tasks / "tasks")], "local_only": True,
                                   "runs": {k: str(v) for k, v in runs.items()}}))
    env = {**os.environ, "HF_HOME": str(tasks / "home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([str(EVAL_PYTHON), "-m", "stgridpool_lmms_eval.score", str(request), str(result)],
                   env=env, check=True, capture_output=True, timeout=300)
    return json.loads(result.read_text())


def test_each_scorer_on_known_replies(tasks, tmp_path):
    write_run(tmp_path / "known", CASES)
    guesses = {"nextqa_mc_test_standin": [(UNREADABLE, None, None)] * 3,
               "longvideobench_val_v_standin": [(UNREADABLE + " x" * 10, None, None)] * 3}
    write_run(tmp_path / "guess1", guesses)
    write_run(tmp_path / "guess2", guesses)
    result = score(tasks, {k: tmp_path / k for k in ("known", "guess1", "guess2")}, tmp_path)

    known = result["known"]
    assert known["groups"] == GROUPS
    for task, rows in CASES.items():
        docs = known["tasks"][task]["docs"]
        assert [d["score"] for d in docs] == [expected for _, _, expected in rows], task
        assert [d["failed"] for d in docs] == [reply == FAIL for reply, _, _ in rows], task
    multi_choice = known["tasks"]["tempcompass_multi_choice_standin"]["docs"]
    assert [(d["judged"], d["verdict"]) for d in multi_choice] == [(False, None), (True, True)]
    (captioning,) = known["tasks"]["tempcompass_captioning_standin"]["docs"]
    assert (captioning["judged"], captioning["verdict"]) == (True, False)
    # The full set's answers for the benchmark's server: option "C" is index 2; the failed one left out.
    assert known["tasks"]["egoschema_standin"]["submission"] == {"standin-ego-1": 2}
    # The task's own aggregation over the answered documents, on its own scale (VideoMME: percent).
    assert known["tasks"]["videomme_standin"]["aggregate"] == 50.0
    assert known["tasks"]["egoschema_subset_standin"]["aggregate"] == 0.5

    for task in guesses:
        first, second = (result[key]["tasks"][task]["docs"] for key in ("guess1", "guess2"))
        assert all(d["guessed"] for d in first)
        assert [d["score"] for d in first] == [d["score"] for d in second]


def test_missing_videos_are_failed_documents(tasks, tmp_path):
    """No HF_HOME (the launcher defaults it; NExT-QA's and TempCompass's code need it at import), no videos:
    VideoMME, EgoSchema and TempCompass call sys.exit, NExT-QA raises, the others send a missing path."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", STGRIDPOOL_EVAL_LOCAL_TASKS="1",
               STGRIDPOOL_EVAL_NO_AGGREGATE="1", STGRIDPOOL_EVAL_JUDGE="off")
    output = tmp_path / "out"
    completed = subprocess.run(
        [str(EVAL_PYTHON), "-m", "stgridpool_lmms_eval.launch", "--model", "stgridpool_openai",
         "--model_args", f"model_version=x,base_url=http://127.0.0.1:9/v1,api_key=EMPTY,max_frames_num=8,"
                         f"stats_file={tmp_path / 'stats.json'}",
         "--tasks", ",".join(standins.standins()), "--include_path", str(tasks / "tasks"), "--batch_size", "1",
         "--output_path", str(output), "--log_samples", "--verbosity", "WARNING"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    replies = [json.loads(line)["filtered_resps"]
               for path in output.rglob("*_samples_*.jsonl") for line in path.read_text().splitlines()]
    assert len(replies) == 23
    expected_home = str(home / ".cache" / "huggingface")
    assert all(r.startswith("[LMMS_EVAL_REQUEST_FAILED") and expected_home in r for r in replies), replies
    assert json.loads((tmp_path / "stats.json").read_text())["missing_visuals"] == 23
