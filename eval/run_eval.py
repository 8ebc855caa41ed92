"""``make eval``: lmms-eval against ``vllm serve MODEL --plugins stgridpool``, one report line per setting.

For each server a set of settings needs, the driver starts ``vllm serve`` from
this venv (``.venv``), runs lmms-eval from its own venv (``.venv-eval``) once
per setting against it, and stops it. lmms-eval sends every video as one
``video_url`` part (``pass_video_url=True``), so the server decodes and
samples it and ST-GridPool (or stock pooling) sees the whole video.

Settings (``--settings``, default all):

- ``stock``: stock pooling in the model's layout, a server with
  ``"enabled": false``, at ``--frames`` frames;
- ``defaults``: ST-GridPool's defaults (the paper's), lmms-eval's own
  ``openai`` model unchanged;
- ``nsp_alone``: no pyramid (``"grid_sizes": [], "grid_strides": []``);
- ``ptg_plain_average``: the pyramid with plain averaging in place of
  norm-weighted pooling: ``"temperature": 0`` makes every window's softmax
  uniform (all logits are ``0 * (score - reference) = 0``), so each output
  token is the mean of its ``k x k`` window;
- ``kernel3``: ``"kernel_size": 3``;
- ``stock_equal_tokens``: stock pooling at the most frames whose video
  tokens do not exceed ST-GridPool's at ``--frames`` (equal KV cost);
- ``budget_stock_tokens``: ST-GridPool at ``--frames`` under
  ``max_video_tokens`` equal to ``stock_equal_tokens``' video tokens.

The per-request ones run against one ST-GridPool server through
``mm_processor_kwargs.stgridpool`` objects (the ``stgridpool_openai`` model
of ``eval/lmms_plugin``); only ``stock`` and ``stock_equal_tokens`` start
servers of their own. ``--custom NAME=JSON`` adds a per-request setting.

Writes ``report.json``, ``report.md`` and ``accuracy_vs_tokens.png`` under
``--output`` (default ``artifacts/eval``). A document whose request failed is
counted per setting, never scored silently: the exit status is 1 when any
failed. Video tokens per request are the formula's (``T * H' * W' + 1`` in
the ``video`` layout, ``T * H' * (W' + 1)`` in ``grid``); the report checks
that each document's prompt tokens minus them (its text) agree across
settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
LOCAL_TASKS = REPOSITORY / "eval" / "tasks"
FAILED_MARK = "[LMMS_EVAL_REQUEST_FAILED"
SERVED_NAME = "eval-model"
# The tiny CPU checkpoint's server: an explicit KV cache and float32, as the demo and tests.
TINY_SERVER_ARGS = ("--max-model-len", "16384", "--kv-cache-memory-bytes", str(1 << 30), "--dtype", "float32", "--enforce-eager")
GPU_SERVER_ARGS = ("--dtype", "bfloat16", "--max-model-len", "32768")
STOCK = "stock"
STGRIDPOOL = "stgridpool"


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
        """ST-GridPool's video tokens, under a request's kernel and budget (the budget rule of README.md)."""
        from vllm_stgridpool.serving.budget import fit_video

        request = request or {}
        fit = fit_video(
            frames, request.get("kernel_size", 2), request.get("max_video_tokens"),
            min_frames=16, max_kernel_size=4,  # the servers' defaults (the driver sets neither)
            tokens=lambda f, k: self.tokens(f, self.kernel_grid(k)), kernel_fits=lambda k: k <= self.side,
        )
        return fit.tokens


@dataclass
class Result:
    setting: str
    description: str
    server: str
    request: dict | None
    frames: int
    video_tokens: int
    command: str = ""
    exit_code: int | None = None
    error: str = ""
    docs: int = 0
    failed_docs: int = 0
    mean_prompt_tokens: float | None = None
    metrics: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)


def model_geometry(model: str) -> Geometry:
    from transformers import AutoConfig

    from vllm_stgridpool.compat.model_aliases import resolve

    resolved = resolve(model)
    config = AutoConfig.from_pretrained(resolved)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if "NextVideo" in config.architectures[0]:
        return Geometry(side, "next_video", "none")
    return Geometry(side, "onevision", "grid" if "llava-video" in str(resolved).lower() else "video")


def local_task_names(folders: list[Path]) -> set[str]:
    names = set()
    for folder in folders:
        for yaml_file in folder.rglob("*.yaml"):
            for line in yaml_file.read_text().splitlines():
                if line.startswith("task:"):
                    names.add(line.split(":", 1)[1].strip().strip("\"'"))
    return names


def write_local_videos(folder: Path) -> None:
    """The shipped task's mp4s: ``clip_{frames}f_{width}x{height}.mp4``, the sample clip."""
    from vllm_stgridpool_testing.sample_videos import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    for docs in LOCAL_TASKS.rglob("docs.json"):
        for doc in json.loads(docs.read_text()):
            path = folder / doc["video"]
            if not path.exists():
                frames, size = path.stem.removeprefix("clip_").split("_")
                width, height = size.split("x")
                write_mp4(path, int(frames.removesuffix("f")), width=int(width), height=int(height))


def server_args(setting: Setting, frames: int, media_dir: Path, base: list[str]) -> list[str]:
    args = ["--plugins", "stgridpool", "--served-model-name", SERVED_NAME, *base,
            "--allowed-local-media-path", str(media_dir),
            "--media-io-kwargs", json.dumps({"video": {"num_frames": frames}})]
    if setting.server == STOCK:
        args += ["--hf-overrides", json.dumps({"stgridpool": {"enabled": False}})]
    return args


def lmms_eval_command(args, setting: Setting, request: dict | None, frames: int, port: int, output: Path) -> list[str]:
    model_args = [f"model_version={SERVED_NAME}", f"base_url=http://127.0.0.1:{port}/v1", "api_key=EMPTY",
                  "pass_video_url=True", f"max_frames_num={frames}", "max_retries=2", "retry_backoff_s=1"]
    if setting.server == STOCK:
        # A stock-pooling server samples --media-io-kwargs' frames and, without
        # --trust-request-mm-kwargs, accepts no per-request frame count.
        model, model_args = "stgridpool_openai", [*model_args, "num_frames_per_request=False"]
    elif request is None:
        model = "openai"  # lmms-eval's own model, unchanged: what any user would run
    else:
        model = "stgridpool_openai"
        model_args.append("stgridpool=" + json.dumps(request, separators=(",", ":")))
    command = [str(args.eval_venv / "bin" / "lmms-eval"), "--model", model, "--model_args", ",".join(model_args),
               "--tasks", args.tasks, "--batch_size", "1", "--output_path", str(output), "--log_samples",
               "--verbosity", "WARNING"]
    for folder in args.include:
        command += ["--include_path", str(folder)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    return command


def run_setting(args, setting: Setting, result: Result, port: int, env: dict) -> None:
    output = args.output / "runs" / setting.name
    shutil.rmtree(output, ignore_errors=True)  # a previous run's files would be read as this one's
    command = lmms_eval_command(args, setting, result.request, result.frames, port, output)
    result.command = shlex.join(command)
    print(f"  {setting.name}: {result.command}", flush=True)
    log = args.output / "logs" / f"lmms-eval-{setting.name}.log"
    with open(log, "w") as log_file:
        result.exit_code = subprocess.run(
            command, cwd=REPOSITORY, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    read_outputs(output, result)
    if result.exit_code != 0 and not result.error:
        result.error = f"lmms-eval exited with {result.exit_code} (log: {log})"


def read_outputs(output: Path, result: Result) -> None:
    """Per-task metrics from lmms-eval's results file; documents, failures and prompt tokens from its samples."""
    results_files = sorted(output.rglob("*_results.json"))
    if not results_files:
        result.error = result.error or "lmms-eval wrote no results"
        return
    report = json.loads(results_files[-1].read_text())
    for task, values in report.get("results", {}).items():
        for key, value in values.items():
            if "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                result.metrics[task] = value  # the task's first metric (lmms-eval keeps metric_list order)
                break
    for group, subtasks in report.get("group_subtasks", {}).items():
        # A group without a metric of its own (MVBench's 20 tasks): the mean over its tasks.
        if group not in result.metrics and subtasks and all(t in result.metrics for t in subtasks):
            result.metrics[group] = sum(result.metrics[t] for t in subtasks) / len(subtasks)
    prompt_tokens = []
    for samples_file in sorted(output.rglob("*_samples_*.jsonl")):
        task = samples_file.stem.split("_samples_", 1)[1]
        for line in samples_file.read_text().splitlines():
            sample = json.loads(line)
            # lmms-eval writes ``resps`` only where it differs from ``filtered_resps``.
            failed = FAILED_MARK in json.dumps([sample.get("resps"), sample.get("filtered_resps")])
            tokens = sum(count.get("input_tokens", 0) for count in sample.get("token_counts") or [])
            result.samples.append({"task": task, "doc_id": sample["doc_id"], "prompt_tokens": tokens, "failed": failed})
            if not failed:
                prompt_tokens.append(tokens)
    result.docs = len(result.samples)
    result.failed_docs = sum(sample["failed"] for sample in result.samples)
    if prompt_tokens:
        result.mean_prompt_tokens = sum(prompt_tokens) / len(prompt_tokens)


def text_tokens_agree(results: list[Result]) -> bool | None:
    """Each document's prompt tokens minus its setting's video tokens: the same in every setting?"""
    seen: dict[tuple, set] = {}
    for result in results:
        for sample in result.samples:
            if not sample["failed"]:
                key = (sample["task"], sample["doc_id"])
                seen.setdefault(key, set()).add(sample["prompt_tokens"] - result.video_tokens)
    return None if not seen else all(len(values) == 1 for values in seen.values())


def markdown_table(results: list[Result], tasks: list[str]) -> str:
    head = ["setting", "frames", "video tokens / request", "mean prompt tokens", "docs", "failed docs", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        prompt = "" if r.mean_prompt_tokens is None else f"{r.mean_prompt_tokens:,.1f}"
        metrics = [f"{r.metrics[t]:.2f}" if t in r.metrics else "-" for t in tasks]
        failed = f"{r.failed_docs}" + (f" ({r.error})" if r.error else "")
        lines.append("| " + " | ".join(
            [f"{r.setting}: {r.description}", str(r.frames), f"{r.video_tokens:,}", prompt, str(r.docs), failed, *metrics]
        ) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for task in tasks:
        points: dict[tuple, list[str]] = {}  # settings at the same point share one label
        for r in results:
            if task in r.metrics:
                points.setdefault((r.video_tokens, r.metrics[task]), []).append(r.setting)
        if not points:
            continue
        axes.scatter([x for x, _ in points], [y for _, y in points], label=task)
        for (x, y), names in points.items():
            axes.annotate("\n".join(names), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("video tokens per request")
    axes.set_ylabel("accuracy (lmms-eval's metric)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=env("MODEL") or None, help="checkpoint, hub id or alias (default: the tiny local one)")
    parser.add_argument("--tasks", default=env("TASKS") or "stgridpool_local", help="lmms-eval task names, comma-separated")
    parser.add_argument("--include", action="append", default=[], help="a folder of extra task YAMLs (repeatable)")
    parser.add_argument("--settings", default=env("SETTINGS") or ",".join(SETTINGS))
    parser.add_argument("--custom", action="append", default=[], metavar="NAME=JSON",
                        help="a per-request setting: its stgridpool object")
    parser.add_argument("--frames", type=int, default=int(env("FRAMES") or 0) or None,
                        help="frames per video (default: 64, the paper's; 16 for the tiny local checkpoint)")
    parser.add_argument("--limit", type=int, default=int(env("LIMIT")) if env("LIMIT") else None)
    parser.add_argument("--output", type=Path, default=Path(env("STGRIDPOOL_ARTIFACTS", "artifacts")) / "eval")
    parser.add_argument("--eval-venv", type=Path, default=REPOSITORY / ".venv-eval")
    parser.add_argument("--media-dir", type=Path, default=Path(env("MEDIA_DIR") or "/"),
                        help="--allowed-local-media-path of the servers (default /: the videos of any task)")
    parser.add_argument("--vllm-args", default=env("VLLM_ARGS", ""), help="more vllm serve flags")
    args = parser.parse_args(argv)
    if env("INCLUDE"):
        args.include.append(env("INCLUDE"))
    args.include = [Path(p).resolve() for p in [LOCAL_TASKS / "stgridpool_local", *args.include]]
    args.output = args.output.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = []
    for name in [n.strip() for n in args.settings.split(",") if n.strip()]:
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; known: {', '.join(SETTINGS)} (or --custom NAME=JSON)")
        settings.append(SETTINGS[name])
    for custom in args.custom:
        name, _, obj = custom.partition("=")
        settings.append(Setting(name, f"custom {obj}", STGRIDPOOL, json.loads(obj)))
    if not (args.eval_venv / "bin" / "lmms-eval").exists():
        raise SystemExit(f"{args.eval_venv}/bin/lmms-eval not found: run `make eval-setup` first")

    (args.output / "logs").mkdir(parents=True, exist_ok=True)
    videos = args.output / "videos"
    write_local_videos(videos)
    if args.model is None:
        from vllm_stgridpool_testing.tiny_models import build_llava_onevision

        model = str(build_llava_onevision(args.output / "llava-onevision-tiny"))
        base = list(TINY_SERVER_ARGS)
        frames = args.frames or 16
    else:
        model, base, frames = args.model, list(GPU_SERVER_ARGS), args.frames or 64
    base += shlex.split(args.vllm_args)
    geometry = model_geometry(model)

    # Equal KV cost: the most stock frames within ST-GridPool's tokens, and that many tokens as a budget.
    stgridpool_tokens = geometry.stgridpool_tokens(frames, None)
    equal_frames = max(
        (f for f in range(1, frames + 1) if geometry.tokens(f, geometry.stock_grid()) <= stgridpool_tokens), default=1
    )
    equal_budget = geometry.tokens(equal_frames, geometry.stock_grid())
    results = []
    for s in settings:
        request = {"max_video_tokens": equal_budget} if s.budget_stock_tokens else s.request
        f = equal_frames if s.equal_tokens else frames
        tokens = geometry.tokens(f, geometry.stock_grid()) if s.server == STOCK else geometry.stgridpool_tokens(f, request)
        results.append(Result(s.name, s.description, s.server, request, f, tokens))

    # The server's key goes in model_args; OPENAI_API_KEY stays the user's (a task's judge may use it).
    env = {**os.environ, "STGRIDPOOL_EVAL_VIDEOS": str(videos)}
    if set(args.tasks.split(",")) <= local_task_names(args.include):
        env["HF_HUB_OFFLINE"] = "1"  # local tasks only: lmms-eval needs no hub
    from vllm_stgridpool_testing.launch import start_server

    started = time.monotonic()
    servers: dict[tuple, list[tuple[Setting, Result]]] = {}
    for s, r in zip(settings, results):
        servers.setdefault((s.server, r.frames), []).append((s, r))
    for (kind, f), members in servers.items():
        args_ = server_args(members[0][0], f, args.media_dir, base)
        print(f"server: vllm serve {model} {shlex.join(args_)}", flush=True)
        try:
            server = start_server(model, *args_, log_path=args.output / "logs" / f"server-{kind}-{f}.log", timeout=1800)
        except (RuntimeError, TimeoutError) as error:
            for _, r in members:
                r.error = f"server did not start: {str(error).splitlines()[0]}"
            continue
        with server:
            for s, r in members:
                run_setting(args, s, r, server.port, env)

    reported = {task for r in results for task in r.metrics}
    tasks = [t for t in args.tasks.split(",") if t in reported] or sorted(reported)
    agree = text_tokens_agree(results)
    table = markdown_table(results, tasks)
    report = {
        "model": model, "tasks": args.tasks, "frames": frames, "limit": args.limit,
        "equal_token_frames": equal_frames, "equal_token_budget": equal_budget,
        "geometry": asdict(geometry), "text_tokens_agree": agree,
        "seconds": round(time.monotonic() - started, 1),
        "settings": [asdict(r) for r in results],
    }
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    notes = (
        f"\nModel `{model}`, tasks `{args.tasks}`, {frames} frames, limit {args.limit}. Video tokens per request: "
        f"the formula for the setting's frames and layout (`{geometry.layout}`, {geometry.side} x {geometry.side} "
        f"patches); each document's prompt tokens minus them agree across settings: {agree}.\n"
    )
    (args.output / "report.md").write_text(table + notes)
    plot(results, tasks, args.output / "accuracy_vs_tokens.png")
    print()
    print(table + notes)
    failed = [r for r in results if r.failed_docs or r.error or r.docs == 0]
    if failed:
        print("FAILED: " + ", ".join(f"{r.setting} ({r.failed_docs} of {r.docs} docs failed{'; ' + r.error if r.error else ''})" for r in failed))
        return 1
    print(f"report: {args.output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
