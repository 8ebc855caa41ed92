"""benchmarks/gpu_check.py without a GPU: each row guarded (a failing row is recorded, the next still runs,
the JSON is on disk after every row), and its CPU dry run under Triton's interpreter, which imports no vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_row_is_recorded_and_the_next_still_runs(tmp_path):
    gpu_check = load_gpu_check()
    path = tmp_path / "report.json"
    report = gpu_check.Report(path, {"triton": "x"})
    assert json.loads(path.read_text())["rows"] == []

    def fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    report.row("cuda graph", "fails", fails)
    on_disk = json.loads(path.read_text())  # written before the next row runs
    assert on_disk["ok"] is False and on_disk["failed"] == ["cuda graph: fails"]
    assert on_disk["rows"][0]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    report.row("timings", "runs", lambda: {"stock_ms": 1.5})
    rows = json.loads(path.read_text())["rows"]
    assert [row["name"] for row in rows] == ["fails", "runs"] and rows[1]["ok"] is True
    assert json.loads(path.read_text())["triton"] == "x"


@pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="needs triton")
def test_the_dry_run_passes_its_cpu_rows_without_vllm(tmp_path):
    """Every row a CPU can run, interpreted at small shapes: start-up, reference parity for four dtypes and
    four settings, the production comparison with the PyTorch-ops backend, layouts, extreme values."""
    out = tmp_path / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    report = json.loads(out.read_text())
    assert done.returncode == 0 and report["ok"], report["failed"] or done.stderr[-2000:]
    assert report["vllm_imported"] is False
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"start-up", "reference", "production", "layouts"}
    assert len(report["rows"]) == 2 + 16 + 4 + 1 + 4
