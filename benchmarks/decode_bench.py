"""Video decoding: the plugin's loader through its worker pool vs in-process, and vs decord and opencv.

Loaders, each called as vLLM's ``VideoMediaIO`` calls a loader,
``load_bytes(data, num_frames=N)``, on the same mp4 files (written here with
OpenCV, mp4v, 30 fps, a panning texture plus a moving square):

* ``pool``: the plugin's loader (``pyav``) as a server runs it, decoding in a
  worker process and returning the frames through shared memory;
* ``local``: the same loader decoding in the calling process
  (``STGRIDPOOL_VIDEO_DECODE_WORKERS=0``): the pool's cost is pool / local;
* ``decord``: decord2's ``VideoReader.get_batch`` on the file (what the
  loader did before it decoded with PyAV);
* ``opencv``: vLLM's own ``opencv`` loader.

Speed: median wall seconds, and CPU seconds (this process's threads plus,
for ``pool``, the worker's), of ``--repeats`` calls per loader after one
warm-up call, the loaders alternating call by call so that load from other
processes on a shared machine hits all alike. Each call also reads every
returned byte once (a sum), as the processor that follows does, so frames
mapped from shared memory pay their page mapping here.

Peak memory: in a fresh subprocess per (loader, case), the growth of the
resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set before the call; it counts
native buffers and the returned frames ("out MiB"). For ``pool`` the
worker's own high-water growth is added (its pages of the returned frames
are the caller's too, so "out MiB" is subtracted once).

Frames: the largest absolute difference of each loader's frames from
``local``'s (0 = identical).

Usage: ``python benchmarks/decode_bench.py [--repeats 5]``; writes
``benchmarks/results/decode_bench.json``.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import msgspec
import numpy as np
from engine_setup import git_state  # benchmarks/ is on sys.path

# (frames in the video, width, height, frames requested)
CASES = (
    (64, 682, 384, 64),
    (64, 1920, 1080, 64),
    (300, 640, 480, 32),
    (300, 1280, 720, 64),
)
LOADER_NAMES = ("pool", "local", "decord", "opencv")
SOURCE_FPS = 30.0
RESULTS_PATH = Path(__file__).parent / "results" / "decode_bench.json"
# The pool's size as a server would have it (the loader's default unless the environment sets one).
POOL_WORKERS = os.environ.get("STGRIDPOOL_VIDEO_DECODE_WORKERS") or str(min(4, os.cpu_count() or 1))


class LoaderResult(msgspec.Struct):
    median_seconds: float
    median_cpu_seconds: float  # this process's, plus the decode worker's for the pool
    frames_per_second: float
    peak_rss_growth_mib: float
    max_abs_difference_from_local: int


class CaseResult(msgspec.Struct):
    video_frames: int
    width: int
    height: int
    file_bytes: int
    num_frames: int
    frames_returned: int
    output_mib: float
    loaders: dict[str, LoaderResult]
    pool_over_local: float
    pool_over_local_cpu: float


class BenchReport(msgspec.Struct, kw_only=True):
    git_commit: str = ""  # the code the run measured, as in the engine benchmarks' reports
    git_dirty: bool = False
    git_changed_paths: list[str] = []
    load_average: float = 0.0  # the 1-minute load average as the run started (other work on the machine)
    repeats: int
    cpu_count: int
    python: str
    decoders: dict[str, str]
    speed_method: str
    memory_method: str
    cases: list[CaseResult]


def decoder_versions() -> dict[str, str]:
    import av
    import decord

    return {
        "pyav": f"{av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})",
        "decord": f"decord2 {decord.__version__}",
        "opencv": cv2.__version__,
    }


def make_loaders() -> dict:
    """name -> ``load(data, num_frames) -> frames``."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from vllm_stgridpool.video.loader import PyAVVideoLoader

    def plugin_loader(pool_size: str):
        def load(data: bytes, num_frames: int):
            os.environ["STGRIDPOOL_VIDEO_DECODE_WORKERS"] = pool_size
            return PyAVVideoLoader.load_bytes(data, num_frames=num_frames)[0]

        return load

    def decord_loader(data: bytes, num_frames: int):
        import decord

        from vllm.multimodal.video import VideoBackend
        from vllm.multimodal.video_decoders import VideoSourceMetadata, VideoTargetMetadata

        with tempfile.NamedTemporaryFile() as file:
            file.write(data)
            file.flush()
            reader = decord.VideoReader(file.name, ctx=decord.cpu(0))
            total = len(reader)
            fps = float(reader.get_avg_fps())
            source = VideoSourceMetadata(total_frames_num=total, original_fps=fps, duration=total / fps)
            indices = VideoBackend.compute_frames_index_to_sample(source, VideoTargetMetadata(num_frames=num_frames, fps=-1, max_duration=300))
            return reader.get_batch(indices).asnumpy()

    opencv = VIDEO_LOADER_REGISTRY.name2class["opencv"]
    return {
        "pool": plugin_loader(POOL_WORKERS),
        "local": plugin_loader("0"),
        "decord": decord_loader,
        "opencv": lambda data, num_frames: opencv.load_bytes(data, num_frames=num_frames)[0],
    }


def write_video(path: Path, num_frames: int, width: int, height: int) -> None:
    """Write a clip with detail that moves, so inter frames carry real work."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (height, 2 * width, 3), np.uint8), (7, 7), 0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), SOURCE_FPS, (width, height))
    square = height // 6
    for index in range(num_frames):
        shift = (index * 4) % width
        frame = np.ascontiguousarray(texture[:, shift : shift + width])
        left = (index * 7) % (width - square)
        frame[height // 2 : height // 2 + square, left : left + square] = 255
        writer.write(frame)
    writer.release()


def read_status_kib(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak_rss_growth(loader_name: str, video_path: str, num_frames: int) -> None:
    """Child-process entry: print the RSS high-water growth of one decode (plus its worker's, for the pool)."""
    import av  # noqa: F401  (libraries loaded before the baseline)
    import decord  # noqa: F401

    load = make_loaders()[loader_name]
    data = Path(video_path).read_bytes()
    workers: list[int] = []
    if loader_name == "pool":  # start the worker first: its start-up is not decoding
        load(data, 1)
        from vllm_stgridpool.video.pipeline import shared_decode_pool

        workers = [str(pid) for pid in shared_decode_pool().worker_pids()]
    for pid in ["self", *workers]:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    baselines = {pid: read_status_kib("VmRSS", pid) for pid in ["self", *workers]}
    frames = load(data, num_frames)
    growth_kib = sum(read_status_kib("VmHWM", pid) - baseline for pid, baseline in baselines.items())
    if workers:
        growth_kib -= frames.nbytes // 1024  # the frames' pages, counted in both processes
    print(msgspec.json.encode({"growth_kib": growth_kib}).decode())


def peak_rss_growth_mib(loader_name: str, video_path: Path, num_frames: int) -> float:
    command = [sys.executable, __file__, "--measure-peak", loader_name, str(video_path), str(num_frames)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return msgspec.json.decode(completed.stdout.strip().splitlines()[-1])["growth_kib"] / 1024


def worker_cpu_seconds() -> float:
    """CPU seconds the decode pool's workers have used (all their threads)."""
    from vllm_stgridpool.video.pipeline import shared_decode_pool

    os.environ["STGRIDPOOL_VIDEO_DECODE_WORKERS"] = POOL_WORKERS
    total = 0.0
    for pid in shared_decode_pool().worker_pids():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def time_loaders(loaders: dict, data: bytes, num_frames: int, repeats: int):
    """Median wall and CPU seconds per loader (calls alternate between loaders), and each loader's frames.

    CPU seconds hold up better than wall seconds on a machine other work shares.
    """
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    cpu: dict[str, list[float]] = {name: [] for name in loaders}
    frames = {name: load(data, num_frames) for name, load in loaders.items()}
    for _ in range(repeats):
        for name, load in loaders.items():
            workers_before = worker_cpu_seconds() if name == "pool" else 0.0
            cpu_before, start = time.process_time(), time.perf_counter()
            int(load(data, num_frames).sum(dtype=np.uint64))  # read every byte, as the processor will
            seconds[name].append(time.perf_counter() - start)
            workers = worker_cpu_seconds() - workers_before if name == "pool" else 0.0
            cpu[name].append(time.process_time() - cpu_before + workers)
    return (
        {name: statistics.median(times) for name, times in seconds.items()},
        {name: statistics.median(times) for name, times in cpu.items()},
        frames,
    )


def run_case(loaders, video_path: Path, case, repeats: int) -> CaseResult:
    video_frames, width, height, num_frames = case
    data = video_path.read_bytes()
    medians, cpu_medians, frames = time_loaders(loaders, data, num_frames, repeats)
    reference = frames["local"]
    results = {}
    for name in LOADER_NAMES:
        same_shape = frames[name].shape == reference.shape
        results[name] = LoaderResult(
            median_seconds=medians[name],
            median_cpu_seconds=cpu_medians[name],
            frames_per_second=len(frames[name]) / medians[name],
            peak_rss_growth_mib=peak_rss_growth_mib(name, video_path, num_frames),
            max_abs_difference_from_local=(
                int(np.abs(frames[name].astype(np.int16) - reference).max()) if same_shape else -1
            ),
        )
    return CaseResult(
        video_frames=video_frames,
        width=width,
        height=height,
        file_bytes=len(data),
        num_frames=num_frames,
        frames_returned=len(reference),
        output_mib=reference.nbytes / 2**20,
        loaders=results,
        pool_over_local=medians["pool"] / medians["local"],
        pool_over_local_cpu=cpu_medians["pool"] / cpu_medians["local"],
    )


def format_table(cases: list[CaseResult]) -> str:
    header = (
        f"{'video':>16} {'N':>3} {'out MiB':>7} | "
        + " ".join(f"{name + ' s':>8}" for name in LOADER_NAMES)
        + f" {'pool/local':>10} {'cpu pool/local':>14} | "
        + " ".join(f"{name + ' MiB':>10}" for name in LOADER_NAMES)
        + " | max |diff| vs local"
    )
    lines = [header, "-" * len(header)]
    for case in cases:
        video = f"{case.video_frames}f {case.width}x{case.height}"
        lines.append(
            f"{video:>16} {case.num_frames:>3} {case.output_mib:>7.1f} | "
            + " ".join(f"{case.loaders[name].median_seconds:>8.3f}" for name in LOADER_NAMES)
            + f" {case.pool_over_local:>10.3f} {case.pool_over_local_cpu:>14.3f} | "
            + " ".join(f"{case.loaders[name].peak_rss_growth_mib:>10.1f}" for name in LOADER_NAMES)
            + " | "
            + " ".join(f"{name} {case.loaders[name].max_abs_difference_from_local}" for name in LOADER_NAMES[1:])
        )
    return "\n".join(lines)


def main(repeats: int) -> None:
    facts = dict(git_state(), load_average=os.getloadavg()[0])  # the code and the machine as the run starts
    loaders = make_loaders()
    cases = []
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as folder:
        for case in CASES:
            video_frames, width, height, _ = case
            video_path = Path(folder) / f"{video_frames}f_{width}x{height}.mp4"
            if not video_path.exists():
                write_video(video_path, video_frames, width, height)
            result = run_case(loaders, video_path, case, repeats)
            print(format_table([result]).splitlines()[-1], flush=True)
            cases.append(result)

    report = BenchReport(
        **facts,
        repeats=repeats,
        cpu_count=os.cpu_count() or 0,
        python=platform.python_version(),
        decoders=decoder_versions(),
        speed_method=(
            "median wall and CPU seconds (CPU: this process plus the pool's workers) of "
            "load_bytes(data, num_frames=N) plus one read of the returned frames, "
            f"over {repeats} calls per loader alternating between loaders, after one warm-up call each"
        ),
        memory_method=(
            "VmHWM - VmRSS around one call in a fresh process, high-water mark reset via /proc/PID/clear_refs; "
            "includes native allocations and the returned frames; pool adds its worker's growth minus the frames"
        ),
        cases=cases,
    )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print()
    print(format_table(cases))
    print(f"\ndecoders: {report.decoders}\nwrote {RESULTS_PATH}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--measure-peak",
        nargs=3,
        metavar=("LOADER", "VIDEO", "NUM_FRAMES"),
        help="internal: measure one decode's peak RSS growth in this process",
    )
    arguments = parser.parse_args()
    if arguments.measure_peak:
        loader_name, video_path, num_frames = arguments.measure_peak
        measure_peak_rss_growth(loader_name, video_path, int(num_frames))
    else:
        main(arguments.repeats)
