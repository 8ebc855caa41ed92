"""The Triton kernels as a GPU compiles them, on this machine (no GPU): sm_80 and sm_90, read from the PTX.

tests/support/triton_aot.py runs the stage's own launcher under Triton's own JIT with a stand-in CUDA driver
(no launch), once per variant, in a fresh process per architecture with an empty Triton cache, and reads
each compiled variant's PTX and ptxas's report. ``make test`` checks the production variants (kernel size
2, bfloat16 at D=3584 and float32 at D=896, each norm kind) with the Triton of the venv; ``make
test-triton`` sets ``STGRIDPOOL_TRITON_VARIANTS=all`` and checks every reachable variant under each Triton
release the supported vLLM builds pull (see the Makefile), writing the report to
``STGRIDPOOL_TRITON_REPORT`` when set.

What the PTX must show, as docs/operator.md states it:
- no approximate division or square root (``div.full``, ``div.approx``, ``sqrt.approx``): every float32
  and float64 division is ``div.rn``; and no contracted float32 multiply-add (``fma.rn.f32``);
- CUDA's fast approximations only where stated: ``ex2.approx.ftz.f32`` for the per-channel powers of norms
  other than 1 and 2 in float32 (and libdevice's float64 log refining ``rcp.approx.ftz.f64``, there too);
- 128-bit feature loads and stores (``ld.global.v4.b32``, ``ld.global.v2.b64``) and no scalar ones where
  the channel block gives each thread 16 bytes (kernel sizes 1 and 2);
- no spills in the serving dtypes' variants at kernel sizes 1 to 4 with norms 1 and 2; every variant's
  registers and spills are in the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
MATRIX = os.environ.get("STGRIDPOOL_TRITON_VARIANTS", "production")
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def variants() -> list[dict]:
    """Every variant of the matrix, compiled for sm_80 and sm_90 in two processes at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    with tempfile.TemporaryDirectory() as cache:
        runs = [subprocess.Popen([sys.executable, "-m", "tests.support.triton_aot", str(arch), MATRIX], cwd=ROOT,
                                 env={**env, "TRITON_CACHE_DIR": f"{cache}/{arch}"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for arch in ARCHS]
        outputs = [run.communicate(timeout=1800) for run in runs]
    rows = []
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        rows += report["variants"]
    if os.environ.get("STGRIDPOOL_TRITON_REPORT"):
        Path(os.environ["STGRIDPOOL_TRITON_REPORT"]).write_text(json.dumps({"triton": report["triton"],
                                                                            "variants": rows}, indent=1))
    print_table(report["triton"], rows)
    return rows


def print_table(version: str, rows: list[dict]) -> None:
    """One line per variant (pytest -s shows it; make test-triton keeps the JSON report)."""
    print(f"\nTriton {version}: {len(rows)} variants")
    for row in rows:
        c = row["constants"]
        loads = ",".join(sorted(k.removeprefix("ld.global.") for k in row["loads"]))
        print(f"sm_{row['arch']} {row['dtype']:8} k={row['kernel_size']:<2} p={row['norm_p']:<3} "
              f"blocks {c['BLOCK_J']}x{c['BLOCK_W']}x{c['BLOCK_D']} VEC={c['VEC']} regs={row['registers']:<3} "
              f"spills={row['spill_bytes']} loads={loads} {row['seconds']} s")


def test_each_call_compiles_one_variant_per_architecture(variants):
    """A call of one config compiles one variant (the frame count, strides and floats are no part of it),
    and the matrix's every (dtype, kernel size, norm) compiled for both architectures."""
    from tests.support.triton_aot import MATRICES, NORMS

    wanted = {(arch, dtype, k, p) for arch in ARCHS for dtype, _, sizes in MATRICES[MATRIX] for k in sizes
              for p in NORMS}
    got = [(row["arch"], row["dtype"], row["kernel_size"], row["norm_p"]) for row in variants]
    assert sorted(got) == sorted(wanted)


def test_no_approximate_division_or_square_root_and_no_contraction(variants):
    for row in variants:
        approximations = set(row["approximations"])
        assert not {name for name in approximations if name.startswith(("div.", "sqrt."))}, row["constants"]
        assert "fma.rn.f32" not in row["ieee"], row["constants"]  # the launcher turns FP fusion off
        assert row["ieee"].get("div.rn.f64" if row["dtype"] == "float64" else "div.rn.f32"), row["constants"]


def test_fast_approximations_only_in_the_powers_of_other_norms(variants):
    """ex2.approx.ftz.f32 only for u ** p of norms other than 1 and 2 in float32 (the softmax and each
    score's root run in float64, through libdevice); nothing approximate at all for norms 1 and 2."""
    for row in variants:
        approximations = set(row["approximations"])
        if row["norm_p"] in (1.0, 2.0):
            assert not approximations, (row["dtype"], row["kernel_size"], row["norm_p"], approximations)
        elif row["dtype"] == "float64":
            assert approximations <= {"rcp.approx.ftz.f64"}, approximations  # libdevice's log refines it
        else:
            assert approximations <= {"ex2.approx.ftz.f32", "rcp.approx.ftz.f64"}, approximations


def test_feature_loads_are_128_bit_vectors(variants):
    """At kernel sizes 1 and 2, where a thread's share of every channel block is 16 bytes (1,024 bfloat16,
    512 float32 or 256 float64 channels a block), every feature load and store is one 128-bit access:
    bfloat16 and float16 have no 16-bit load left, float64 no 64-bit one, and float32 no more 32-bit ones
    than bfloat16's variant (the step table's int32 loads). (Wider windows split the block into fewer
    channels: the report has their loads.)"""
    table_loads = {(row["arch"], row["kernel_size"], row["norm_p"]): row["loads"].get("ld.global.b32", 0)
                   for row in variants if row["dtype"] == "bfloat16"}
    for row in variants:
        if row["kernel_size"] > 2:
            continue
        loads, stores, where = row["loads"], row["stores"], (row["arch"], row["dtype"], row["kernel_size"])
        vector = "ld.global.v2.b64" if row["dtype"] == "float64" else "ld.global.v4.b32"
        assert vector in loads, (where, loads)
        assert "ld.global.b16" not in loads and "ld.global.b64" not in loads, (where, loads)
        if row["dtype"] == "float32":
            assert loads.get("ld.global.b32", 0) <= table_loads[row["arch"], row["kernel_size"], row["norm_p"]]
        assert set(stores) == {"st.global.v2.b64" if row["dtype"] == "float64" else "st.global.v4.b32"}, where


def test_no_spills_in_the_serving_variants(variants):
    """The dtypes a model serves in (bfloat16, float16, float32) at kernel sizes 1 to 4 with norms 1 and 2:
    no spill. (Elsewhere, ptxas may save a few registers around the IEEE division's slow-path call: the
    report has every variant's count.)"""
    for row in variants:
        if row["dtype"] != "float64" and row["kernel_size"] <= 4 and row["norm_p"] in (1.0, 2.0):
            assert row["spill_bytes"] == 0, (row["arch"], row["dtype"], row["kernel_size"], row["norm_p"])
        assert row["registers"] <= 255
