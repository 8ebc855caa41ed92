"""Scoring one document with the task's own ``process_results``, reproducibly and with the judge in view.

Two things in the tasks' scorers make a score depend on more than the reply:

- a reply the parser cannot read gets a random option letter (EgoSchema,
  NExT-QA and LongVideoBench call ``random.choice``);
- TempCompass sends a reply its rules cannot read to a GPT judge
  (``get_eval_result``, and ``get_eval_result_for_captioning`` for its
  captioning task), at temperature 1, retrying ten times when there is no key.

``scoring_context`` runs one ``process_results`` call with the task
module's ``random`` replaced by a generator seeded from the document (the
same document always gets the same guess, in lmms-eval's run and when the
report scores the logged reply again) and, if given, the judge functions
replaced; it records whether the parser guessed and whether the judge was
asked. lmms-eval scores documents one at a time here (the launcher passes
``--process_docs_parallel 1``), so swapping the module's names is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass

JUDGE_FUNCTIONS = ("get_eval_result", "get_eval_result_for_captioning")
FAILED_MARKS = ("[LMMS_EVAL_REQUEST_FAILED", "[LMMS_EVAL_BUDGET_EXCEEDED]")


def failed(reply) -> bool:
    """A reply that is lmms-eval's record of a request that got no answer (never a model's text)."""
    return isinstance(reply, str) and reply.startswith(FAILED_MARKS)


def doc_seed(doc: dict) -> int:
    text = json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass
class Trace:
    guessed: bool = False  # the parser picked a random option
    judged: bool = False  # the task asked its judge


class _SeededRandom(random.Random):
    """The ``random`` module's functions the tasks call, seeded, noting that a guess was made."""

    def __init__(self, seed: int, trace: Trace):
        super().__init__(seed)
        self._trace = trace

    def choice(self, seq):
        self._trace.guessed = True
        return super().choice(seq)


@contextlib.contextmanager
def scoring_context(process_results, doc: dict, judges: dict | None = None):
    """Run ``process_results`` (the task's function) under a per-document seed and, optionally, other
    judge functions (``{name: replacement}``, names from ``JUDGE_FUNCTIONS``); yields the ``Trace``."""
    names = getattr(process_results, "__globals__", {})
    trace = Trace()
    saved = {name: names[name] for name in ("random", *JUDGE_FUNCTIONS) if name in names}
    if "random" in names:
        names["random"] = _SeededRandom(doc_seed(doc), trace)
    for name in JUDGE_FUNCTIONS:
        if name in names:
            original = names[name] if not judges or name not in judges else judges[name]
            names[name] = _noting_judge(original, trace)
    try:
        yield trace
    finally:
        names.update(saved)


def _noting_judge(judge, trace: Trace):
    def asked(*args, **kwargs):
        trace.judged = True
        return judge(*args, **kwargs)

    return asked


def no_judge() -> dict:
    """Judge replacements for a run without a judge: the verdict the task gives when its judge never answers
    (rating 0, no response; captioning: rating -1), at once instead of after ten retries."""
    return {
        "get_eval_result": lambda prompt, *args, **kwargs: (None, 0),
        "get_eval_result_for_captioning": lambda prompt, *args, **kwargs: {
            "chatgpt-reasoning": None, "chatgpt-answer": None, "rating": -1, "token_count": None,
        },
    }


def logged_judge(logged: dict) -> dict:
    """Judge replacements that give the verdict lmms-eval's run logged for this document (never asking again)."""
    return {
        "get_eval_result": lambda prompt, *args, **kwargs: (logged.get("chatgpt_response"), logged.get("rating", 0)),
        "get_eval_result_for_captioning": lambda prompt, *args, **kwargs: {
            "chatgpt-reasoning": logged.get("chatgpt-reasoning"),
            "chatgpt-answer": logged.get("chatgpt-answer"),
            "rating": logged.get("rating", -1),
            "token_count": None,
        },
    }


def verdict_given(logged: dict) -> bool:
    """Whether a logged judged result holds the judge's answer (not the no-answer default)."""
    return logged.get("chatgpt_response") is not None or logged.get("chatgpt-answer") is not None
