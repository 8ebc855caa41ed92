"""Accuracy on one scale from per-document scores: percent, binomial standard error, incomplete cells marked.

The per-document scores come from ``stgridpool_lmms_eval.score`` (each
task's own scorer, in lmms-eval's venv): 1 or 0, a failed request 0. A
benchmark made of several tasks (MVBench's 20, TempCompass's 4) is the mean
of its tasks' accuracies, as the benchmarks report it, with the standard
error of that mean. A cell is incomplete when a document's request failed or
a document needed a judge that gave no verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


COUNTS = ("docs", "failed", "judged", "unjudged", "guessed")


@dataclass
class Accuracy:
    percent: float | None  # None: nothing scored locally (EgoSchema's full set) or no documents
    se: float | None  # binomial standard error of the mean per-document score, in points
    docs: int = 0
    failed: int = 0
    judged: int = 0  # documents the task sent to its judge
    unjudged: int = 0  # of those, how many got no verdict (scored as the task scores that: 0)
    guessed: int = 0  # documents whose reply the parser could not read (it picked a random option)
    tasks: list = field(default_factory=list)  # the tasks a benchmark's figure averages

    @property
    def incomplete(self) -> bool:
        return bool(self.failed or self.unjudged)

    def cell(self) -> str:
        if self.percent is None:
            return "-"
        text = f"{self.percent:.1f} ± {self.se:.1f}"
        return text + " (incomplete)" if self.incomplete else text

    def to_dict(self) -> dict:
        return {**asdict(self), "incomplete": self.incomplete}


def task_accuracy(docs: list[dict]) -> Accuracy:
    """``docs``: the scorer's rows (``score`` 1/0, or None when the task is scored elsewhere)."""
    counts = dict(
        docs=len(docs),
        failed=sum(d["failed"] for d in docs),
        judged=sum(d["judged"] for d in docs),
        unjudged=sum(d["judged"] and not d["verdict"] for d in docs),
        guessed=sum(d["guessed"] for d in docs),
    )
    scores = [d["score"] for d in docs]
    if not docs or any(s is None for s in scores):
        return Accuracy(None, None, **counts)
    p = sum(scores) / len(scores)
    return Accuracy(100 * p, 100 * math.sqrt(p * (1 - p) / len(scores)), **counts)


def benchmark_accuracy(parts: dict[str, Accuracy]) -> Accuracy:
    """The mean of the tasks' accuracies; its standard error from theirs (independent samples)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    scored = [a for a in parts.values() if a.percent is not None]
    counts = {k: sum(getattr(a, k) for a in parts.values()) for k in COUNTS}
    if not scored or len(scored) < len(parts):
        return Accuracy(None, None, tasks=list(parts), **counts)
    k = len(scored)
    return Accuracy(
        sum(a.percent for a in scored) / k,
        math.sqrt(sum(a.se**2 for a in scored)) / k,
        tasks=list(parts),
        **counts,
    )


def benchmark_tasks(benchmark: str, scored: dict) -> dict[str, list[dict]]:
    """A benchmark's tasks' rows in the scorer's result: the group's members, or the task itself."""
    members = scored["groups"].get(benchmark) or [benchmark]
    return {task: scored["tasks"][task]["docs"] for task in members if task in scored["tasks"]}


def markdown(rows: list[dict], benchmarks: list[str]) -> str:
    """``rows``: one per setting with ``setting``, ``description``, ``frames``, ``video_tokens``,
    ``mean_prompt_tokens``, ``docs``, ``failed``, ``busy_retries``, ``error`` and ``accuracy`` per benchmark."""
    head = ["setting", "frames (max)", "video tokens at max frames", "mean prompt tokens", "docs", "failed",
            "503 retries", *benchmarks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        prompt = "" if row["mean_prompt_tokens"] is None else f"{row['mean_prompt_tokens']:,.1f}"
        failed = str(row["failed"]) + (f" ({row['error']})" if row["error"] else "")
        cells = [row["accuracy"][b].cell() if b in row["accuracy"] else "-" for b in benchmarks]
        lines.append("| " + " | ".join([f"{row['setting']}: {row['description']}", str(row["frames"]),
                                         f"{row['video_tokens']:,}", prompt, str(row["docs"]), failed,
                                         str(row["busy_retries"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def incomplete_notes(rows: list[dict]) -> list[str]:
    notes = []
    for row in rows:
        for benchmark, accuracy in row["accuracy"].items():
            why = []
            if accuracy.failed:
                why.append(f"{accuracy.failed} of {accuracy.docs} requests failed (scored 0)")
            if accuracy.unjudged:
                why.append(f"{accuracy.unjudged} of {accuracy.judged} judged documents got no verdict (scored 0)")
            if why:
                notes.append(f"- {row['setting']} / {benchmark}: " + "; ".join(why))
    return notes


def plot(rows: list[dict], benchmarks: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5))
    labels: dict[tuple, list[str]] = {}  # settings at the same point share one label
    for index, benchmark in enumerate(benchmarks):
        color = f"C{index % 10}"
        points = [(row, row["accuracy"][benchmark]) for row in rows
                  if benchmark in row["accuracy"] and row["accuracy"][benchmark].percent is not None]
        for row, accuracy in points:
            x, y = row["video_tokens"], accuracy.percent
            axes.errorbar(x, y, yerr=accuracy.se, fmt="o", color=color, capsize=3,
                          markerfacecolor="none" if accuracy.incomplete else color)
            names = labels.setdefault((x, round(y, 1)), [])
            if row["setting"] not in names:
                names.append(row["setting"])
        if points:
            axes.plot([], [], "o", color=color, label=benchmark)
    for (x, y), names in labels.items():
        axes.annotate("\n".join(names), (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
    axes.set_xlabel("video tokens for a video at the most frames a request samples")
    axes.set_ylabel("accuracy (%), ± 1 standard error")
    axes.set_title("hollow: incomplete (a failed request, or a judged reply without a verdict)", fontsize=9)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
