"""The accuracy report's arithmetic, the servers' flags and death causes, the authors' frame rule: no server needed."""

from __future__ import annotations

import base64
import io
import math
import sys
from pathlib import Path

from PIL import Image

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "eval"))
sys.path.insert(0, str(REPOSITORY / "eval" / "lmms_plugin"))
import report  # noqa: E402
import servers  # noqa: E402
from stgridpool_lmms_eval import frames  # noqa: E402


def doc(score, failed=False, judged=False, verdict=None, guessed=False):
    return {"score": score, "failed": failed, "judged": judged, "verdict": verdict, "guessed": guessed}


def test_a_failed_request_counts_as_wrong_and_marks_the_cell():
    accuracy = report.task_accuracy([doc(1), doc(1), doc(0), doc(1), doc(0, failed=True)])
    assert accuracy.percent == 60.0
    assert accuracy.se == 100 * math.sqrt(0.6 * 0.4 / 5)  # 21.9089...
    assert (accuracy.failed, accuracy.incomplete) == (1, True)
    assert accuracy.cell() == "60.0 ± 21.9 (incomplete)"


def test_a_judged_document_without_verdict_marks_the_cell():
    judged = report.task_accuracy([doc(1), doc(1, judged=True, verdict=True)])
    assert (judged.percent, judged.se, judged.judged, judged.unjudged, judged.incomplete) == (100, 0, 1, 0, False)
    assert judged.cell() == "100.0 ± 0.0"
    unjudged = report.task_accuracy([doc(1), doc(0, judged=True, verdict=False)])
    assert (unjudged.percent, unjudged.unjudged, unjudged.incomplete) == (50, 1, True)


def test_a_task_scored_elsewhere_has_no_local_figure():
    accuracy = report.task_accuracy([doc(None), doc(None, failed=True)])
    assert (accuracy.percent, accuracy.se, accuracy.docs, accuracy.cell()) == (None, None, 2, "-")


def test_a_benchmark_of_several_tasks_is_their_mean():
    parts = {"a": report.task_accuracy([doc(1), doc(0)]), "b": report.task_accuracy([doc(1)])}
    accuracy = report.benchmark_accuracy(parts)
    assert accuracy.percent == 75.0
    assert accuracy.se == math.sqrt((100 * math.sqrt(0.25 / 2)) ** 2 + 0) / 2  # 17.68
    assert (accuracy.docs, accuracy.tasks) == (3, ["a", "b"])


def test_server_flags_follow_the_device_not_the_checkpoint():
    assert servers.server_flags("cuda", "float16") == ["--dtype", "float16", "--max-model-len", "32768"]
    cpu = servers.server_flags("cpu", "float16")
    assert cpu[:2] == ["--dtype", "bfloat16"] and "--kv-cache-memory-bytes" in cpu
    assert servers.server_flags("cpu", "float32")[:2] == ["--dtype", "float32"]


def test_a_dead_servers_cause_comes_from_its_log():
    log = "\n".join([
        "(APIServer pid=1) WARNING 12-07 08:11:05 [system_utils.py:255] fd limit errors like `OSError: [Errno 24]`",
        "(VllmWorker-0 pid=2) ERROR 12-07 08:11:42 [multiproc_executor.py:953] ValueError: head_dim 16 unsupported",
        "Exception: WorkerProc initialization failed due to an exception in a background process.",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ])
    cause = servers.failure_cause(log, 1)
    assert cause.startswith("exit status 1; log: ") and cause.endswith("ValueError: head_dim 16 unsupported")
    killed = servers.failure_cause("INFO starting\nWorker proc VllmWorker-0 died unexpectedly, shutting down", -9)
    assert "out-of-memory killer" in killed and killed.endswith("died unexpectedly, shutting down")


def test_the_authors_frame_rule():
    """LLaVA-Video's load_video(fps=1): every round(rate)-th frame while that is at most max, else uniform."""
    assert frames.sample_indices(12, 8, 3, 1) == [0, 3, 6, 9]
    assert frames.sample_indices(30, 8, 3, 1) == [0, 4, 8, 12, 16, 20, 24, 29]  # 10 frames > 8: linspace
    assert frames.sample_indices(24, 8, 3, 1) == [0, 3, 6, 9, 12, 15, 18, 21]  # exactly 8
    assert frames.sample_indices(5, 8, 3, None) == [0, 1, 2, 3, 4]
    assert frames.sample_indices(0, 8, 3, 1) == []


def test_a_frame_folder_becomes_a_jpeg_frames_url(tmp_path):
    for index in range(7):
        colour = (index * 30, 0, 0)
        if index % 2:
            Image.new("RGB", (2000, 1000), colour).save(tmp_path / f"{index:05d}.jpg")
        else:
            Image.new("RGB", (64, 48), colour).save(tmp_path / f"{index:05d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    url, count = frames.folder_data_url(tmp_path, max_frames=4, folder_fps=2, fps=1)
    assert url.startswith("data:video/jpeg;base64,") and count == 4  # every second of 7: 0, 2, 4, 6
    images = [Image.open(io.BytesIO(base64.b64decode(part))) for part in url.split(",", 1)[1].split(",")]
    assert [i.format for i in images] == ["JPEG"] * 4
    assert [i.size for i in images] == [(64, 48)] * 4  # the even (PNG) frames, re-encoded
    assert [i.getpixel((0, 0))[0] // 10 for i in images] == [0, 6, 12, 18]  # in name order
    big = frames.folder_data_url(tmp_path, max_frames=8, folder_fps=1, fps=1)[0].split(",")[2]
    assert Image.open(io.BytesIO(base64.b64decode(big))).size == (1024, 512)  # scaled to 1,024 px a side
