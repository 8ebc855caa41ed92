"""``python -m stgridpool_lmms_eval.launch ARGS``: lmms-eval's command line (``ARGS`` as for ``lmms-eval``), run so
that one benchmark's quirks cannot spoil or stop a run.

Set before lmms-eval starts, from the environment (``eval/run_eval.py`` sets them):

- ``HF_HOME`` defaults to ``~/.cache/huggingface``: NExT-QA's and TempCompass's
  task code read ``os.environ["HF_HOME"]`` at import and would fail without it;
- ``STGRIDPOOL_EVAL_PROMPTS=NAME``: the tasks' prompt variant for model
  ``NAME`` (``llava_vid``: VideoMME's LLaVA-Video prompt); unset, the
  ``default`` variants, as the authors' logged runs used;
- ``STGRIDPOOL_EVAL_JUDGE=off``: TempCompass's GPT judge is not called; a reply
  its rules cannot read gets the task's no-verdict score at once (instead of
  ten retries against an API without a key);
- ``STGRIDPOOL_EVAL_INCLUDE=DIR:DIR``: task folders to index besides lmms-eval's
  (its ``--include_path`` takes one folder);
- ``STGRIDPOOL_EVAL_LOCAL_TASKS=1``: only those folders are indexed (the
  stand-in tasks), not lmms-eval's two thousand task files;
- ``STGRIDPOOL_EVAL_NO_AGGREGATE=1``: lmms-eval's per-task aggregation is
  skipped; the report computes every score from the logged samples, and
  EgoSchema's full-set aggregation would upload the answers to the
  benchmark's server (retrying for minutes where there is no network).

Every document is scored by the task's ``process_results`` under
``scoring.scoring_context`` (a per-document seed for the parsers' random
guesses), one document at a time.
"""

from __future__ import annotations

import functools
import os
import sys


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def install_hooks() -> None:
    from lmms_eval.api.task import ConfigurableTask
    from lmms_eval.evaluator_utils import TaskOutput
    from lmms_eval.tasks import TaskManager

    from stgridpool_lmms_eval.scoring import no_judge, scoring_context

    prompts = os.environ.get("STGRIDPOOL_EVAL_PROMPTS") or None
    local_only = _flag("STGRIDPOOL_EVAL_LOCAL_TASKS")
    includes = [p for p in os.environ.get("STGRIDPOOL_EVAL_INCLUDE", "").split(os.pathsep) if p]
    task_manager_init = TaskManager.__init__

    @functools.wraps(task_manager_init)
    def init(self, *args, **kwargs):
        if prompts:
            kwargs["model_name"] = prompts
        if includes:
            given = kwargs.get("include_path") or []
            kwargs["include_path"] = [*([given] if isinstance(given, str) else given), *includes]
        if local_only:
            kwargs["include_defaults"] = False
        task_manager_init(self, *args, **kwargs)

    TaskManager.__init__ = init

    judges = no_judge() if os.environ.get("STGRIDPOOL_EVAL_JUDGE") == "off" else None
    process_results = ConfigurableTask.process_results

    @functools.wraps(process_results)
    def scored(self, doc, results, *args, **kwargs):
        with scoring_context(self.config.process_results, doc, judges):
            return process_results(self, doc, results, *args, **kwargs)

    ConfigurableTask.process_results = scored

    if _flag("STGRIDPOOL_EVAL_NO_AGGREGATE"):
        TaskOutput.calculate_aggregate_metric = lambda self, *args, **kwargs: None
        TaskOutput.calculate_clt_aggregate_metric = lambda self, *args, **kwargs: None


def main() -> None:
    os.environ.setdefault("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    install_hooks()
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = ["lmms-eval", *sys.argv[1:], "--process_docs_parallel", "1"]
    cli_evaluate()


if __name__ == "__main__":
    main()
