"""``python -m stgridpool_lmms_eval.score REQUEST.json RESULT.json``: each logged document scored again by its task.

``REQUEST.json``: ``{"include": [task folders], "local_only": bool, "runs": {KEY: lmms-eval output folder}}``.
For every ``*_samples_TASK.jsonl`` under a run's folder, each document is
looked up in the task's own dataset (by ``doc_id``) and its logged reply
scored by the task's ``process_results`` (``scoring.scoring_context``: the
same per-document seed as in the run; a judged reply keeps the verdict the
run logged). A reply that is a failed request is never parsed: it scores 0.
The per-document value is the task's own aggregation over that one document
(0 or its full mark, on the task's scale); the task's aggregation over the
answered documents is returned alongside as a check. For a task whose metric
is ``submission`` (EgoSchema's full set, scored by the benchmark's server)
the answers are collected instead.

``RESULT.json``: ``{KEY: {"tasks": {TASK: {"metric", "docs": [...], "aggregate", "submission"}},
"groups": {GROUP: [TASK, ...]}}}``.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

from stgridpool_lmms_eval.scoring import failed, logged_judge, scoring_context, verdict_given

SUBMISSION = "submission"


def aggregate(task, metric: str, values: list):
    function = task.aggregation()[metric]
    if "args" in inspect.signature(function).parameters:
        return function(values, args=None)
    return function(values)


def reply_of(sample: dict):
    reply = sample["filtered_resps"]
    while isinstance(reply, list):
        reply = reply[0] if reply else ""
    return reply


def score_task(task, samples: list[dict]) -> dict:
    metric = task.config.metric_list[0]["metric"]
    docs = list(task.eval_docs)
    scored, answered, submission = [], [], {}
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc, reply = docs[sample["doc_id"]], reply_of(sample)
        tokens = sum((count or {}).get("input_tokens", 0) for count in sample.get("token_counts") or [])
        row = {"doc_id": sample["doc_id"], "failed": failed(reply), "score": None if metric == SUBMISSION else 0,
               "guessed": False, "judged": False,
               "verdict": None, "prompt_tokens": tokens, "reply": reply if isinstance(reply, str) else repr(reply)}
        if not row["failed"]:
            logged = sample.get(metric) if isinstance(sample.get(metric), dict) else {}
            with scoring_context(task.config.process_results, doc, logged_judge(logged)) as trace:
                result = task.process_results(doc, [reply])
            row["guessed"], row["judged"] = trace.guessed, trace.judged
            row["verdict"] = verdict_given(logged) if trace.judged else None
            if metric == SUBMISSION:
                submission.update(result[SUBMISSION])
            else:
                row["score"] = 1 if aggregate(task, metric, [result[metric]]) > 0 else 0
                answered.append(result[metric])
        scored.append(row)
    return {
        "metric": metric,
        "docs": scored,
        "aggregate": aggregate(task, metric, answered) if answered else None,
        "submission": submission if metric == SUBMISSION else None,
    }


def score_run(output: Path, load_task) -> dict:
    tasks, groups = {}, {}
    for path in sorted(output.rglob("*_samples_*.jsonl")):
        name = path.stem.split("_samples_", 1)[1]
        samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        tasks[name] = score_task(load_task(name), samples)
    for path in sorted(output.rglob("*_results.json")):
        for group, members in json.loads(path.read_text()).get("group_subtasks", {}).items():
            if members:
                groups[group] = list(members)
    return {"tasks": tasks, "groups": groups}


def main(argv: list[str]) -> None:
    request_path, result_path = map(Path, argv)
    request = json.loads(request_path.read_text())
    os.environ.setdefault("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("WARNING", include_path=request["include"] or None,
                          include_defaults=not request.get("local_only", False))
    cache = {}

    def load_task(name: str):
        if name not in cache:
            cache[name] = get_task_dict([name], manager)[name]
        return cache[name]

    result = {key: score_run(Path(folder), load_task) for key, folder in request["runs"].items()}
    result_path.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
