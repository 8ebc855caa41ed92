"""Decode speed and peak memory: the ``decord`` loader vs vLLM's ``opencv`` loader.

Both loaders are called exactly as vLLM's ``VideoMediaIO`` calls them,
``load_bytes(data, num_frames=N)``, on the same mp4 files (written here with
OpenCV, mp4v, 30 fps, a panning texture plus a moving square).

Speed: frames returned per second of wall time, median of ``--repeats`` calls
per loader after one warm-up call, the two loaders alternating call by call so
that load from other processes on a shared machine hits both alike.

Peak memory: measured in a fresh subprocess per (loader, video, num_frames),
as the growth of the kernel's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``) over the resident set just before the call. The mark is
reset right before decoding by writing ``5`` to ``/proc/self/clear_refs``.
Unlike ``tracemalloc``, which only sees Python's allocator, this counts the
native buffers of FFmpeg, OpenCV and decord; a fresh process keeps memory
retained by an earlier decode from hiding the cost. Both libraries are imported
before the baseline, so only decoding is counted. The figure includes the
returned frame array, shown separately as "out MiB".

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

VIDEO_LENGTHS = (16, 64, 300)
RESOLUTIONS = ((320, 240), (640, 480), (1280, 720))
NUM_FRAMES_REQUESTS = (32, 64)
LOADER_NAMES = ("decord", "opencv")
SOURCE_FPS = 30.0
RESULTS_PATH = Path(__file__).parent / "results" / "decode_bench.json"


class LoaderResult(msgspec.Struct):
    frames_returned: int
    median_seconds: float
    frames_per_second: float
    peak_rss_growth_mib: float


class CaseResult(msgspec.Struct):
    video_frames: int
    width: int
    height: int
    file_bytes: int
    num_frames: int
    output_mib: float
    decord: LoaderResult
    opencv: LoaderResult
    speed_ratio_decord_over_opencv: float
    memory_ratio_decord_over_opencv: float


class BenchReport(msgspec.Struct):
    repeats: int
    cpu_count: int
    python: str
    opencv_version: str
    decord_version: str
    speed_method: str
    memory_method: str
    cases: list[CaseResult]


def load_loaders() -> dict:
    """vLLM's registered loaders by name, with the decord one registered."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm_stgridpool.video_loader import register_decord_loader

    register_decord_loader()
    return {name: VIDEO_LOADER_REGISTRY.name2class[name] for name in LOADER_NAMES}


def write_video(path: Path, num_frames: int, width: int, height: int) -> None:
    """Write a clip with detail that moves, so inter frames carry real work."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(
        rng.integers(0, 256, (height, 2 * width, 3), np.uint8), (7, 7), 0
    )
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), SOURCE_FPS, (width, height)
    )
    square = height // 6
    for index in range(num_frames):
        shift = (index * 4) % width
        frame = np.ascontiguousarray(texture[:, shift : shift + width])
        left = (index * 7) % (width - square)
        frame[height // 2 : height // 2 + square, left : left + square] = 255
        writer.write(frame)
    writer.release()


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak_rss_growth(loader_name: str, video_path: str, num_frames: int):
    """Child-process entry: print the RSS high-water growth of one decode."""
    import decord  # noqa: F401  (load the library before the baseline)

    loader = load_loaders()[loader_name]
    data = Path(video_path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    baseline_kib = read_status_kib("VmRSS")
    frames, _ = loader.load_bytes(data, num_frames=num_frames)
    growth_kib = read_status_kib("VmHWM") - baseline_kib
    print(msgspec.json.encode({"growth_kib": growth_kib, "frames": len(frames)}).decode())


def peak_rss_growth_mib(loader_name: str, video_path: Path, num_frames: int) -> float:
    command = [
        sys.executable,
        __file__,
        "--measure-peak",
        loader_name,
        str(video_path),
        str(num_frames),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    last_line = completed.stdout.strip().splitlines()[-1]
    return msgspec.json.decode(last_line)["growth_kib"] / 1024


def time_loaders(loaders: dict, data: bytes, num_frames: int, repeats: int) -> dict:
    """Median seconds per loader; calls alternate between loaders."""
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    frames_returned = {}
    for name, loader in loaders.items():
        frames_returned[name] = len(loader.load_bytes(data, num_frames=num_frames)[0])
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            loader.load_bytes(data, num_frames=num_frames)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: (frames_returned[name], statistics.median(seconds[name]))
        for name in loaders
    }


def run_case(loaders, video_path: Path, shape, num_frames: int, repeats: int):
    video_frames, width, height = shape
    data = video_path.read_bytes()
    timings = time_loaders(loaders, data, num_frames, repeats)
    per_loader = {}
    for name in LOADER_NAMES:
        frames_returned, median_seconds = timings[name]
        per_loader[name] = LoaderResult(
            frames_returned=frames_returned,
            median_seconds=median_seconds,
            frames_per_second=frames_returned / median_seconds,
            peak_rss_growth_mib=peak_rss_growth_mib(name, video_path, num_frames),
        )
    decord_result, opencv_result = per_loader["decord"], per_loader["opencv"]
    return CaseResult(
        video_frames=video_frames,
        width=width,
        height=height,
        file_bytes=len(data),
        num_frames=num_frames,
        output_mib=decord_result.frames_returned * width * height * 3 / 2**20,
        decord=decord_result,
        opencv=opencv_result,
        speed_ratio_decord_over_opencv=(
            decord_result.frames_per_second / opencv_result.frames_per_second
        ),
        memory_ratio_decord_over_opencv=(
            decord_result.peak_rss_growth_mib / opencv_result.peak_rss_growth_mib
        ),
    )


def format_table(cases: list[CaseResult]) -> str:
    header = (
        f"{'video':>16} {'N':>3} {'out':>4} | {'decord f/s':>10} {'opencv f/s':>10} "
        f"{'ratio':>6} | {'decord MiB':>10} {'opencv MiB':>10} {'ratio':>6} "
        f"{'out MiB':>8}"
    )
    lines = [header, "-" * len(header)]
    for case in cases:
        video = f"{case.video_frames}f {case.width}x{case.height}"
        lines.append(
            f"{video:>16} {case.num_frames:>3} {case.decord.frames_returned:>4} | "
            f"{case.decord.frames_per_second:>10.1f} "
            f"{case.opencv.frames_per_second:>10.1f} "
            f"{case.speed_ratio_decord_over_opencv:>6.2f} | "
            f"{case.decord.peak_rss_growth_mib:>10.1f} "
            f"{case.opencv.peak_rss_growth_mib:>10.1f} "
            f"{case.memory_ratio_decord_over_opencv:>6.2f} "
            f"{case.output_mib:>8.1f}"
        )
    return "\n".join(lines)


def main(repeats: int) -> None:
    import decord

    loaders = load_loaders()
    cases = []
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as folder:
        for width, height in RESOLUTIONS:
            for video_frames in VIDEO_LENGTHS:
                video_path = Path(folder) / f"{video_frames}f_{width}x{height}.mp4"
                write_video(video_path, video_frames, width, height)
                for num_frames in NUM_FRAMES_REQUESTS:
                    shape = (video_frames, width, height)
                    case = run_case(loaders, video_path, shape, num_frames, repeats)
                    print(format_table([case]).splitlines()[-1], flush=True)
                    cases.append(case)

    report = BenchReport(
        repeats=repeats,
        cpu_count=os.cpu_count() or 0,
        python=platform.python_version(),
        opencv_version=cv2.__version__,
        decord_version=decord.__version__,
        speed_method=(
            "frames returned / median wall seconds of load_bytes(data, num_frames=N)"
            f" over {repeats} alternating calls after one warm-up call per loader"
        ),
        memory_method=(
            "VmHWM - VmRSS around one load_bytes call in a fresh process, "
            "high-water mark reset via /proc/self/clear_refs; includes native "
            "allocations and the returned frames"
        ),
        cases=cases,
    )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print()
    print(format_table(cases))
    print(f"\nratio = decord / opencv; wrote {RESULTS_PATH}")


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
