"""What the serving, follow-up and batch benchmarks share, so that their figures describe the same thing.

They serve one checkpoint, clips of one size and the same variants, and
every report begins with the same facts of the run: the code (git commit),
vLLM's version, the machine, and where its figures hold.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent

# A text model big enough that prefill and KV size follow the prompt length,
# small enough that a 64-frame request takes seconds on two CPU cores.
CHECKPOINT_ARGS = dict(text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=2)
VISION = {"vision_hidden": 32, "vision_layers": 2, "grid": "27x27", "dtype": "float32"}  # the builder's defaults
VIDEO_SIZE = (320, 240)

# name -> (the ``--hf-overrides`` / ``hf_overrides`` object, ``VLLM_PLUGINS``). A budget
# variant is k=2 with the server-wide ``max_video_tokens`` of the stgridpool object: it
# keeps k=2 while 16 frames fit and samples fewer frames (or raises the kernel) to fit.
VARIANTS = {
    "stock": (None, ""),
    "stgridpool-k2": ({"stgridpool": {}}, "stgridpool"),
    "stgridpool-k3": ({"stgridpool": {"kernel_size": 3}}, "stgridpool"),
    "stgridpool-b4096": ({"stgridpool": {"max_video_tokens": 4096}}, "stgridpool"),
    "stgridpool-b2048": ({"stgridpool": {"max_video_tokens": 2048}}, "stgridpool"),
}
LABELS = {
    "stock": "stock (2x2 bilinear)",
    "stgridpool-k2": "ST-GridPool k=2",
    "stgridpool-k3": "ST-GridPool k=3",
    "stgridpool-b4096": "ST-GridPool, 4,096-token budget",
    "stgridpool-b2048": "ST-GridPool, 2,048-token budget",
}
STYLES = {  # (color, marker) per variant, the same in every plot
    "stock": ("tab:gray", "o"),
    "stgridpool-k2": ("tab:blue", "s"),
    "stgridpool-k3": ("tab:orange", "^"),
    "stgridpool-b4096": ("tab:green", "D"),
    "stgridpool-b2048": ("tab:purple", "v"),
}

# Where the figures hold, written into every report next to them.
SCOPE = (
    "Measured on {cpu_count} CPU cores with a tiny random-weight LLaVA-OneVision checkpoint "
    "(SigLIP 27x27 grid, Qwen2 text model of width 512 and 6 layers). Exact for any model on the "
    "27x27 grid, so they carry over to a 7B model on a GPU: prompt tokens per video, KV blocks per "
    "request, and the KV capacity ratios (how many requests a fixed cache holds). Do not carry over: "
    "latency and throughput, and their ratios; here a 512-wide model's prefill is dominated by "
    "attention (grows with tokens squared) and everything shares 2 cores, so time falls faster than "
    "the token count, while a 7B model's prefill is dominated by its weights (linear in tokens): "
    "expect time ratios near the token ratios there, plus what the larger capacity adds under load."
)


class RunFacts(msgspec.Struct, kw_only=True):
    """The fields every engine benchmark report starts with (defaults: reports written before a field existed)."""

    vllm_version: str
    machine: str
    cpu_count: int
    checkpoint: dict
    video_size: list[int]
    git_commit: str = ""
    git_dirty: bool = False  # uncommitted changes to tracked files when the run started
    git_changed_paths: list[str] = []  # which ones
    cpu_model: str = ""
    memory_gib: float = 0.0
    figures_hold: str = ""


def run_facts() -> dict:
    """This run's :class:`RunFacts`, as keyword arguments of a report."""
    import vllm

    cpu_count = os.cpu_count() or 0
    return dict(
        vllm_version=vllm.__version__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
        cpu_count=cpu_count,
        checkpoint={**CHECKPOINT_ARGS, **VISION},
        video_size=list(VIDEO_SIZE),
        **git_state(),
        cpu_model=_proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        memory_gib=round(int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]) / 2**20, 1),
        figures_hold=SCOPE.format(cpu_count=cpu_count),
    )


def git_state() -> dict:
    """The commit the code ran at, and which tracked files differed from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return dict(git_commit=git("rev-parse", "HEAD"), git_dirty=bool(changed), git_changed_paths=changed)


def _proc_field(path: str, name: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def build_checkpoint(artifacts: Path) -> Path:
    """The benchmark checkpoint, built once into ``artifacts`` (a git-ignored folder)."""
    from vllm_stgridpool_testing.tiny_models import build_llava_onevision

    started = time.perf_counter()
    checkpoint = build_llava_onevision(artifacts / "llava-onevision-bench", **CHECKPOINT_ARGS)
    print(f"checkpoint: {checkpoint} ({time.perf_counter() - started:.1f} s)", flush=True)
    return checkpoint


def report_fields(facts: dict, args, variants: list, started: float) -> dict:
    """What every engine benchmark report holds besides its own settings: the run's facts, the common
    settings, the variants' results and the run's duration."""
    return dict(
        **facts,
        mode=args.mode,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        max_tokens=args.max_tokens,
        variants=variants,
        total_s=time.perf_counter() - started,
    )


def write_report(report: msgspec.Struct, output: Path) -> None:
    """The report as indented JSON at ``output`` (its folder made if needed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")


def publish(report: msgspec.Struct, output: Path, print_table, plot) -> None:
    """Write the report, print its table, draw its plot next to the JSON, and say how long the run took."""
    write_report(report, output)
    _show(report, output, print_table, plot)
    print(f"wrote {output} and its plot ({report.total_s / 60:.1f} min in all)")


def _show(report, output: Path, print_table, plot) -> None:
    print_table(report.variants)
    plot(report.variants, output.with_suffix(".png"), report.frames)


def chosen_variants(parser, names: str) -> list[str]:
    """The comma-separated ``--variants``, each one of :data:`VARIANTS` (else the parser's error)."""
    chosen = names.split(",")
    if set(chosen) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(chosen) - set(VARIANTS))}")
    return chosen


def replot(output: Path, report_type: type, print_table, plot) -> None:
    """``--replot``: the table and plot of the report already at ``output`` (no engine started)."""
    _show(msgspec.json.decode(output.read_bytes(), type=report_type), output, print_table, plot)


def print_ratio_table(variants: list, rows, label_width: int = 30) -> None:
    """One line per ``(label, get, format)`` row, one column per variant, each with its ratio to stock."""
    stock = next((v for v in variants if v.name == "stock"), variants[0])
    header = " " * label_width + "".join(f"{v.name:>22}" for v in variants)
    print("\n" + header + "\n" + "-" * len(header))
    for label, get, fmt in rows:
        line = f"{label:{label_width}}"
        for v in variants:
            value, base = get(v), get(stock)
            ratio = f"({value / base:4.2f}x)" if v is not stock and base else ""
            line += f"{format(value, fmt):>13} {ratio:>8}"
        print(line)


def add_report_options(parser, stem: str, generated: str) -> None:
    """The options every engine benchmark takes: KV cache, generated tokens, where its report goes, replot."""
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20, help="KV cache for every variant (512 MiB)")
    parser.add_argument("--max-tokens", type=int, default=16, help=f"generated tokens per {generated} (ignore_eos)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"result JSON, the PNG next to it (default results/{stem}.json; quick: "
                             f"results/{stem}_quick.json)")
    parser.add_argument("--replot", action="store_true", help="redraw table and PNG from an existing JSON")
