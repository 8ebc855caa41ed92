"""``make eval``: lmms-eval against ``vllm serve MODEL --plugins stgridpool``, one accuracy table on one scale.

For each server a set of settings needs, the driver starts ``vllm serve``
from this venv (``.venv``), runs lmms-eval from its own venv
(``.venv-eval``) once per benchmark and setting against it (through
``stgridpool_lmms_eval.launch``), then scores every logged reply again with
the benchmark's own scorer (``stgridpool_lmms_eval.score``) and writes the
report. See docs/accuracy.md.

The protocol is the authors' by default (lmms-eval's ``llava_video`` model
as their logged runs used it), each part a named option: frames at
``--fps`` 1 up to ``--frames`` (64) and uniform beyond, the ``qwen_1_5``
system prompt (``--system-prompt``), the tasks' ``default`` prompts
(``--prompts``), the tasks' generation settings (greedy, their token
limits).

Settings (``--settings``, default all): ``stock`` (stock pooling, a server
with ``"enabled": false``), ``defaults`` (ST-GridPool's, the paper's),
``nsp_alone`` (no pyramid), ``ptg_plain_average`` (``"temperature": 0``:
each window's plain mean), ``kernel3``, ``stock_equal_tokens`` (stock at
the most frames whose tokens do not exceed ST-GridPool's),
``budget_stock_tokens`` (ST-GridPool under ``max_video_tokens`` equal to
those). The per-request ones travel as ``mm_processor_kwargs.stgridpool``
to one ST-GridPool server; ``--custom NAME=JSON`` adds one.

Tasks (``--tasks``): lmms-eval task or group names, one lmms-eval run each;
by default the local stand-ins of the paper's six benchmarks (``eval/standins``).

Writes ``report.json``, ``report.md`` and ``accuracy_vs_tokens.png`` under
``--output`` (default ``artifacts/eval``), and for EgoSchema's full set the
answers file its server scores (``submissions/``). Exit status 1 when any
document's request failed or a run did not complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import servers  # noqa: E402
import standins  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
SERVED_NAME = "eval-model"
STOCK = "stock"
STGRIDPOOL = "stgridpool"
DEFAULT_TASKS = ",".join(standins.standins())
PREFIX_CACHE = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    server: str  # STOCK or STGRIDPOOL
    request: dict | None = None  # the per-request stgridpool object
    equal_tokens: bool = False  # stock at the frame count matching ST-GridPool's tokens
    budget_stock_tokens: bool = False  # max_video_tokens = stock's at that frame count


SETTINGS = {
    s.name: s
    for s in (
        Setting("stock", "stock pooling (enabled: false), model's layout", STOCK),
        Setting("defaults", "ST-GridPool defaults (paper)", STGRIDPOOL),
        Setting("nsp_alone", "NSP alone (no pyramid)", STGRIDPOOL, {"grid_sizes": [], "grid_strides": []}),
        Setting("ptg_plain_average", "PTG + plain average (temperature 0)", STGRIDPOOL, {"temperature": 0}),
        Setting("kernel3", "ST-GridPool kernel_size 3", STGRIDPOOL, {"kernel_size": 3}),
        Setting("stock_equal_tokens", "stock at ST-GridPool's video tokens (fewer frames)", STOCK, equal_tokens=True),
        Setting(
            "budget_stock_tokens", "ST-GridPool, max_video_tokens = stock_equal_tokens'", STGRIDPOOL,
            budget_stock_tokens=True,
        ),
    )
}


@dataclass(frozen=True)
class Geometry:
    """What a video's token count depends on: patches per frame side, pooling family, newline layout."""

    side: int
    family: str  # "onevision" or "next_video"
    layout: str  # "video", "grid" or "none"

    def stock_grid(self) -> int:
        # OneVision: bilinear to ceil(side / 2); NeXT-Video: 2x2 average pooling, floor.
        return math.ceil(self.side / 2) if self.family == "onevision" else self.side // 2

    def kernel_grid(self, kernel: int) -> int:
        return (self.side - kernel) // kernel + 1

    def tokens(self, frames: int, grid: int) -> int:
        if self.layout == "video":
            return frames * grid * grid + 1
        if self.layout == "grid":
            return frames * grid * (grid + 1)
        return frames * grid * grid

    def stgridpool_tokens(self, frames: int, request: dict | None) -> int:
        """ST-GridPool's video tokens, under a request's kernel and budget (the budget rule of docs/budgets.md)."""
        from vllm_stgridpool.serving.budget import fit_video

        request = request or {}
        fit = fit_video(
            frames, request.get("kernel_size", 2), request.get("max_video_tokens"),
            min_frames=16, max_kernel_size=4,  # the servers' defaults (the driver sets neither)
            tokens=lambda f, k: self.tokens(f, self.kernel_grid(k)), kernel_fits=lambda k: k <= self.side,
        )
        return fit.tokens


@dataclass
class Run:
    """One lmms-eval run: one benchmark in one setting."""

    setting: str
    benchmark: str
    output: Path
    command: str = ""
    exit_code: int | None = None
    error: str = ""
    stats: dict = field(default_factory=dict)  # the lmms-eval model's counts (requests, 503 retries, ...)
    prefix_cache: dict = field(default_factory=dict)  # the server's prefix-cache counters during the run


@dataclass
class SettingPlan:
    setting: Setting
    request: dict | None
    frames: int
    video_tokens: int
    runs: list = field(default_factory=list)
    error: str = ""


def model_geometry(model: str) -> tuple[Geometry, str]:
    """The checkpoint's token geometry and its dtype name."""
    from transformers import AutoConfig

    from vllm_stgridpool.compat.model_aliases import resolve

    resolved = resolve(model)
    config = AutoConfig.from_pretrained(resolved)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if "NextVideo" in config.architectures[0]:
        return Geometry(side, "next_video", "none"), dtype
    return Geometry(side, "onevision", "grid" if "llava-video" in str(resolved).lower() else "video"), dtype


def eval_python(args) -> Path:
    return args.eval_venv / "bin" / "python"


def lmms_eval_tasks_folder(args) -> Path:
    where = "import lmms_eval, os; print(os.path.dirname(lmms_eval.__file__))"
    out = subprocess.run([str(eval_python(args)), "-c", where], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "tasks"


def server_args(setting: Setting, frames: int, fps: float, media_dir: Path, base: list[str]) -> list[str]:
    video = {"num_frames": frames, **({"fps": fps} if fps > 0 else {})}
    args = ["--plugins", "stgridpool", "--served-model-name", SERVED_NAME, *base,
            "--allowed-local-media-path", str(media_dir), "--media-io-kwargs", json.dumps({"video": video})]
    if setting.server == STOCK:
        args += ["--hf-overrides", json.dumps({"stgridpool": {"enabled": False}})]
    return args


def decode_workers() -> int:
    """The plugin's video decoders in a server started from this environment (its default: min(4, cores))."""
    return int(os.environ.get("STGRIDPOOL_VIDEO_DECODE_WORKERS") or min(4, os.cpu_count() or 1))


def lmms_eval_command(args, plan: SettingPlan, benchmark: str, port: int, run: Run) -> list[str]:
    model_args = [
        f"model_version={SERVED_NAME}", f"base_url=http://127.0.0.1:{port}/v1", "api_key=EMPTY",
        f"max_frames_num={plan.frames}", f"fps={args.fps}", f"system_prompt={args.system_prompt}",
        f"frame_folder_fps={args.frame_folder_fps}", f"num_concurrent={args.concurrency}",
        f"stats_file={run.output / 'stats.json'}",
        # A stock server takes no per-request media_io_kwargs (it samples by its --media-io-kwargs).
        f"media_io_kwargs_per_request={plan.setting.server == STGRIDPOOL}",
    ]
    if plan.request is not None:
        model_args.append("stgridpool=" + json.dumps(plan.request, separators=(",", ":")))
    command = [str(eval_python(args)), "-m", "stgridpool_lmms_eval.launch", "--model", "stgridpool_openai",
               "--model_args", ",".join(model_args), "--tasks", benchmark, "--batch_size", "1",
               "--output_path", str(run.output), "--log_samples", "--verbosity", "WARNING"]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    return command


def run_env(args, benchmark: str, includes: list[Path]) -> dict:
    """lmms-eval's environment for one benchmark: a stand-in gets its own Hugging Face home and no hub."""
    env = {**os.environ, "STGRIDPOOL_EVAL_NO_AGGREGATE": "1",
           "STGRIDPOOL_EVAL_INCLUDE": os.pathsep.join(str(p) for p in includes)}
    if benchmark in args.standin_names:
        env.update(HF_HOME=str(args.standin_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   STGRIDPOOL_EVAL_LOCAL_TASKS="1")
    if not args.judge:
        env["STGRIDPOOL_EVAL_JUDGE"] = "off"
    if args.prompts != "default":
        env["STGRIDPOOL_EVAL_PROMPTS"] = args.prompts
    return env


def prefix_cache(server) -> dict:
    try:
        text = server.get("/metrics")
    except OSError:
        return {}
    counts = {}
    for name in PREFIX_CACHE:
        values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
        counts[name.split(":")[1].removesuffix("_total")] = sum(float(v) for v in values)
    return counts


def run_benchmark(args, plan: SettingPlan, benchmark: str, server, includes: list[Path]) -> Run:
    run = Run(plan.setting.name, benchmark, args.output / "runs" / plan.setting.name / benchmark)
    shutil.rmtree(run.output, ignore_errors=True)  # a previous run's files would be read as this one's
    run.output.mkdir(parents=True)
    command = lmms_eval_command(args, plan, benchmark, server.port, run)
    run.command = shlex.join(command)
    print(f"  {plan.setting.name} / {benchmark}", flush=True)
    log = args.output / "logs" / f"lmms-eval-{plan.setting.name}-{benchmark}.log"
    before = prefix_cache(server)
    with open(log, "w") as log_file:
        run.exit_code = subprocess.run(command, cwd=REPOSITORY, env=run_env(args, benchmark, includes), stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    after = prefix_cache(server)
    run.prefix_cache = {key: after[key] - before.get(key, 0) for key in after}
    stats = run.output / "stats.json"
    run.stats = json.loads(stats.read_text()) if stats.exists() else {}
    if not server.alive():
        run.error = "server died: " + servers.failure_cause(server.log(), server.process.returncode)
    elif run.exit_code != 0:
        run.error = f"lmms-eval exited with {run.exit_code} (log: {log})"
    elif not any(run.output.rglob("*_samples_*.jsonl")):
        run.error = f"lmms-eval wrote no samples (log: {log})"
    return run


def score(args, plans: list[SettingPlan], includes: list[Path]) -> dict:
    """Every run's documents scored by its tasks' own scorers, in lmms-eval's venv; a scorer that fails is
    every setting's error (the runs' outputs stay for a second look)."""
    runs = {f"{run.setting}/{run.benchmark}": str(run.output) for plan in plans for run in plan.runs}
    request = args.output / "score-request.json"
    result = args.output / "scores.json"
    request.write_text(json.dumps({"include": [str(p) for p in includes], "runs": runs,
                                   "local_only": set(args.benchmarks) <= set(args.standin_names)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log_path = args.output / "logs" / "score.log"
    with open(log_path, "w") as log:
        code = subprocess.run([str(eval_python(args)), "-m", "stgridpool_lmms_eval.score", str(request), str(result)],
                              env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        for plan in plans:
            plan.error = plan.error or f"scoring failed with exit status {code} (log: {log_path})"
        return {}
    return json.loads(result.read_text())


def write_submissions(args, plan: SettingPlan, scored: dict) -> dict:
    """The answers of a task scored by its benchmark's server (EgoSchema's full set), as that server takes them;
    a failed document is left out (the server counts it missing)."""
    written = {}
    for run in plan.runs:
        for task, result in scored.get(f"{run.setting}/{run.benchmark}", {}).get("tasks", {}).items():
            if result["submission"] is not None:
                path = args.output / "submissions" / f"{task}_{plan.setting.name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result["submission"], indent=1) + "\n")
                written[task] = {"file": str(path), "answers": len(result["submission"]),
                                 "missing": [d["doc_id"] for d in result["docs"] if d["failed"]]}
    return written


def setting_row(plan: SettingPlan, scored: dict, submissions: dict) -> dict:
    accuracy, docs = {}, []
    for run in plan.runs:
        result = scored.get(f"{run.setting}/{run.benchmark}")
        if result is None or run.error:
            continue
        tasks = report.benchmark_tasks(run.benchmark, result)
        accuracy[run.benchmark] = report.benchmark_accuracy({t: report.task_accuracy(d) for t, d in tasks.items()})
        docs += [d for rows in tasks.values() for d in rows]
    answered = [d["prompt_tokens"] for d in docs if not d["failed"]]
    errors = [f"{run.benchmark}: {run.error}" for run in plan.runs if run.error] + ([plan.error] if plan.error else [])
    return {
        "setting": plan.setting.name, "description": plan.setting.description, "server": plan.setting.server,
        "request": plan.request, "frames": plan.frames, "video_tokens": plan.video_tokens,
        "mean_prompt_tokens": sum(answered) / len(answered) if answered else None,
        "docs": len(docs), "failed": sum(d["failed"] for d in docs),
        "busy_retries": sum(run.stats.get("busy_retries", 0) for run in plan.runs),
        "error": "; ".join(errors), "accuracy": accuracy, "submissions": submissions,
        "runs": [vars(run) | {"output": str(run.output)} for run in plan.runs],
    }


def parse_args(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=env("MODEL") or None,
                        help="checkpoint, hub id or alias (default: the tiny local one)")
    parser.add_argument("--tasks", default=env("TASKS") or DEFAULT_TASKS,
                        help="lmms-eval task or group names, comma-separated (default: the six benchmarks' stand-ins)")
    parser.add_argument("--include", action="append", default=[], help="a folder of extra task YAMLs (repeatable)")
    parser.add_argument("--settings", default=env("SETTINGS") or ",".join(SETTINGS))
    parser.add_argument("--custom", action="append", default=[], metavar="NAME=JSON",
                        help="a per-request setting: its stgridpool object")
    parser.add_argument("--frames", type=int, default=int(env("FRAMES") or 0) or None,
                        help="the most frames per video (default: 64, the paper's; 16 for the tiny local checkpoint)")
    parser.add_argument("--fps", type=float, default=float(env("FPS") or 1),
                        help="frames per second sampled up to --frames, uniform beyond (the authors'); "
                             "0: --frames uniformly")
    parser.add_argument("--system-prompt", choices=("qwen_1_5", "none"), default=env("SYSTEM_PROMPT") or "qwen_1_5",
                        help="qwen_1_5: 'You are a helpful assistant.' (the authors' conversation template)")
    parser.add_argument("--prompts", default=env("PROMPTS") or "default",
                        help="the tasks' prompt variant: default (as the authors' logged runs) or a model name "
                             "(llava_vid)")
    parser.add_argument("--judge", choices=("auto", "on", "off"), default=env("JUDGE") or "auto",
                        help="TempCompass's GPT judge: auto = on when OPENAI_API_KEY is set")
    parser.add_argument("--frame-folder-fps", type=float, default=standins.FRAME_FOLDER_FPS,
                        help="the rate a folder of frames was taken at (MVBench's TVQA frames: 3)")
    parser.add_argument("--concurrency", type=int, default=int(env("CONCURRENCY") or 0) or None,
                        help="requests in flight (default: the server's video decoders, so none waits for one)")
    parser.add_argument("--limit", type=int, default=int(env("LIMIT")) if env("LIMIT") else None)
    parser.add_argument("--output", type=Path, default=Path(env("STGRIDPOOL_ARTIFACTS", "artifacts")) / "eval")
    parser.add_argument("--eval-venv", type=Path, default=REPOSITORY / ".venv-eval")
    parser.add_argument("--media-dir", type=Path, default=Path(env("MEDIA_DIR") or "/"),
                        help="--allowed-local-media-path of the servers (default /: the videos of any task)")
    parser.add_argument("--vllm-args", default=env("VLLM_ARGS", ""), help="more vllm serve flags")
    args = parser.parse_args(argv)
    if env("INCLUDE"):
        args.include.append(env("INCLUDE"))
    args.include = [Path(p).resolve() for p in args.include]
    args.output = args.output.resolve()
    args.eval_venv = args.eval_venv.resolve()
    args.benchmarks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.standin_names = [b for b in args.benchmarks if b in standins.standins()]
    args.standin_home = args.output / "standin_home"
    args.judge = args.judge == "on" or (args.judge == "auto" and bool(env("OPENAI_API_KEY")))
    args.concurrency = args.concurrency or decode_workers()
    return args


def plan_settings(args, geometry: Geometry, frames: int) -> tuple[list[SettingPlan], int, int]:
    chosen = []
    for name in [n.strip() for n in args.settings.split(",") if n.strip()]:
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; known: {', '.join(SETTINGS)} (or --custom NAME=JSON)")
        chosen.append(SETTINGS[name])
    for custom in args.custom:
        name, _, obj = custom.partition("=")
        chosen.append(Setting(name, f"custom {obj}", STGRIDPOOL, json.loads(obj)))
    # Equal KV cost: the most stock frames within ST-GridPool's tokens, and that many tokens as a budget.
    stgridpool_tokens = geometry.stgridpool_tokens(frames, None)
    equal_frames = max(
        (f for f in range(1, frames + 1) if geometry.tokens(f, geometry.stock_grid()) <= stgridpool_tokens), default=1
    )
    equal_budget = geometry.tokens(equal_frames, geometry.stock_grid())
    plans = []
    for s in chosen:
        request = {"max_video_tokens": equal_budget} if s.budget_stock_tokens else s.request
        f = equal_frames if s.equal_tokens else frames
        if s.server == STOCK:
            tokens = geometry.tokens(f, geometry.stock_grid())
        else:
            tokens = geometry.stgridpool_tokens(f, request)
        plans.append(SettingPlan(s, request, f, tokens))
    return plans, equal_frames, equal_budget


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not eval_python(args).exists():
        raise SystemExit(f"{eval_python(args)} not found: run `make eval-setup` first")
    (args.output / "logs").mkdir(parents=True, exist_ok=True)
    includes = list(args.include)
    if args.standin_names:
        folder = args.output / "standin_tasks"
        standins.write(args.standin_names, lmms_eval_tasks_folder(args), folder, args.standin_home)
        includes.insert(0, folder)

    if args.model is None:
        from vllm_stgridpool_testing.tiny_models import build_llava_onevision

        model, frames = str(build_llava_onevision(args.output / "llava-onevision-tiny")), args.frames or 16
    else:
        model, frames = args.model, args.frames or 64
    geometry, dtype = model_geometry(model)
    device_type = servers.device()
    base = servers.server_flags(device_type, dtype) + shlex.split(args.vllm_args)
    plans, equal_frames, equal_budget = plan_settings(args, geometry, frames)

    from vllm_stgridpool_testing.launch import start_server

    started = time.monotonic()
    groups: dict[tuple, list[SettingPlan]] = {}
    for plan in plans:
        groups.setdefault((plan.setting.server, plan.frames), []).append(plan)
    for (kind, f), members in groups.items():
        flags = server_args(members[0].setting, f, args.fps, args.media_dir, base)
        print(f"server: vllm serve {model} {shlex.join(flags)}", flush=True)
        log_path = args.output / "logs" / f"server-{kind}-{f}.log"
        try:
            server = start_server(model, *flags, log_path=log_path, timeout=1800)
        except (RuntimeError, TimeoutError) as error:
            returncode = None if isinstance(error, TimeoutError) else -1
            match = re.search(r"exited with (-?\d+)", str(error))
            returncode = int(match.group(1)) if match else returncode
            cause = servers.failure_cause(log_path.read_text(errors="replace"), returncode)
            for plan in members:
                plan.error = f"server did not start: {cause}"
            continue
        with server:
            for plan in members:
                for benchmark in args.benchmarks:
                    if not server.alive():
                        plan.error = "server died: " + servers.failure_cause(server.log(), server.process.returncode)
                        break
                    plan.runs.append(run_benchmark(args, plan, benchmark, server, includes))

    scored = score(args, plans, includes) if any(plan.runs for plan in plans) else {}
    rows = [setting_row(plan, scored, write_submissions(args, plan, scored)) for plan in plans]
    reported = [b for b in args.benchmarks if any(b in row["accuracy"] for row in rows)]
    table = report.markdown(rows, reported)
    notes = report.incomplete_notes(rows)
    summary = (
        f"\nModel `{model}` on {device_type}, {frames} frames at most, sampled at {args.fps:g} fps "
        f"(0: uniform), system prompt {args.system_prompt}, prompts {args.prompts}, TempCompass judge "
        f"{'on' if args.judge else 'off'}, {args.concurrency} requests in flight, limit {args.limit}. Accuracy in "
        f"percent ± one binomial standard error; a failed request scores 0; a benchmark of several tasks is "
        f"their mean.\n"
    )
    if notes:
        summary += "\nIncomplete:\n" + "\n".join(notes) + "\n"
    for row in rows:
        for task, sub in row["submissions"].items():
            summary += (f"\n{row['setting']} / {task}: {sub['answers']} answers for the benchmark's server in "
                        f"`{sub['file']}` ({len(sub['missing'])} missing).")
    report_json = {
        "model": model, "device": device_type, "tasks": args.benchmarks, "frames": frames, "fps": args.fps,
        "system_prompt": args.system_prompt, "prompts": args.prompts, "judge": args.judge,
        "concurrency": args.concurrency, "limit": args.limit, "geometry": vars(geometry),
        "equal_token_frames": equal_frames, "equal_token_budget": equal_budget,
        "seconds": round(time.monotonic() - started, 1),
        "settings": [{**row, "accuracy": {b: a.to_dict() for b, a in row["accuracy"].items()}} for row in rows],
        "scores": scored,
    }
    (args.output / "report.json").write_text(json.dumps(report_json, indent=1, default=str) + "\n")
    (args.output / "report.md").write_text(table + summary)
    report.plot(rows, reported, args.output / "accuracy_vs_tokens.png")
    print()
    print(table + summary)
    failed = [row for row in rows if row["failed"] or row["error"] or not row["docs"]]
    if failed:
        print("FAILED: " + ", ".join(f"{r['setting']} ({r['failed']} of {r['docs']} docs failed"
                                     f"{'; ' + r['error'] if r['error'] else ''})" for r in failed))
        return 1
    print(f"report: {args.output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
