"""What one call of the stage's CUDA paths costs the host: kernel launches and syncing ops, counted.

The Triton path runs here on CPU tensors under Triton's interpreter, through the same launcher a GPU
runs. After a first call for a shape (which builds the step tables and copies them to the device), one
call is watched two ways: every ``InterpretedFunction.run`` is a kernel launch (the interpreter's own
tensor work inside a launch is what a GPU does on the device, so it runs with the watch paused), and a
``TorchDispatchMode`` sees every ATen op the call dispatches. A call must launch at most L + 1 kernels
for L pyramid levels, whatever the number of frames or videos, and dispatch no op that waits on the
device (``_local_scalar_dense``, ``item``, ``nonzero``, ``is_nonzero``, ``equal``) or copies host data
to it (``lift_fresh``, ``_to_copy``, ``copy_``); its allocations are counted. The PyTorch-ops path (what
CUDA ran before) is counted on the ``meta`` device for the record: ``pytest -s`` prints both.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.stage.plan import make_plan

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, emulating a GPU that says nothing

SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}
HOST_TO_DEVICE = {"lift_fresh", "lift_fresh_copy", "_to_copy", "copy_", "_copy_from"}
ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided"}
NOT_KERNELS = ALLOCATIONS | {"_unsafe_view"}  # a view that the schema does not mark as one


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block, by name, and which of them are views."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()  # ops that launch a kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        # A kernel: not a view, not an allocation, and it computes tensors (promote_types gives a dtype).
        if not func.is_view and name not in NOT_KERNELS and any(isinstance(o, torch.Tensor) for o in tree_leaves(out)):
            self.kernels[name] += 1
        return out

    def launches(self) -> int:
        return sum(self.kernels.values())


@pytest.fixture
def launch_counter(monkeypatch):
    """Counts Triton launches (interpreted), running each with the dispatch watch paused."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "triton")
    launches = []
    run = InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        launches.append(grid)
        with _disable_current_modes():
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    return launches


def audit(x: torch.Tensor, config: STGridPoolConfig, launches: list) -> tuple[int, OpCounter]:
    st_gridpool(x, config)  # the first call for the shape: tables built and copied once
    launches.clear()
    with OpCounter() as counter:
        st_gridpool(x, config)
    return len(launches), counter


@pytest.mark.parametrize("shape", [(64, 27, 27, 4), (3, 32, 27, 27, 2), (16, 24, 24, 4)])
def test_triton_path_launches_once_per_level_plus_one_and_never_syncs(shape, launch_counter):
    config = STGridPoolConfig()
    x = torch.randn(*shape)
    count, ops = audit(x, config, launch_counter)
    levels = len(make_plan(*shape[-4:-1], config).levels)  # levels that build mosaics: 3 at T=64, 2 at T=16
    print(f"\nTriton path {tuple(shape)}: {count} launches for {levels} levels, grids {launch_counter}, "
          f"dispatched ops {dict(ops.ops)}")
    assert count == levels + 1
    assert all(grid[1] == (shape[0] if len(shape) == 5 else 1) for grid in launch_counter)  # videos: grid axis 1
    assert not SYNCING & set(ops.ops) and not HOST_TO_DEVICE & set(ops.ops)
    assert ops.launches() == 0  # nothing but allocations (output, mosaic buffers) and views outside the kernels
    assert sum(ops.ops[name] for name in ALLOCATIONS) == 2


def test_no_pyramid_is_one_launch(launch_counter):
    count, ops = audit(torch.randn(8, 27, 27, 4), STGridPoolConfig(grid_sizes=(), grid_strides=()), launch_counter)
    assert count == 1 and sum(ops.ops[name] for name in ALLOCATIONS) == 1  # the output only


@pytest.mark.parametrize("dim, dtype", [(896, torch.float32), (3584, torch.bfloat16)])
def test_pytorch_ops_path_count_for_the_record(dim, dtype, monkeypatch):
    """What one 64-frame 27 x 27 video costs on the path CUDA took before (counted on ``meta``): hundreds of
    kernel launches, and no syncing op either (the plan is host-side)."""
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "torch")
    x = torch.empty(64, 27, 27, dim, device="meta", dtype=dtype)
    st_gridpool(x, STGridPoolConfig())
    with OpCounter() as ops:
        st_gridpool(x, STGridPoolConfig())
    top = ", ".join(f"{name} {n}" for name, n in ops.kernels.most_common(8))
    print(f"\nPyTorch-ops path (64, 27, 27, {dim}) {dtype}: {sum(ops.ops.values())} ops dispatched, "
          f"{ops.launches()} launch kernels ({top})")
    assert not SYNCING & set(ops.ops)
    assert ops.launches() > 100 * (len(make_plan(64, 27, 27, STGridPoolConfig()).levels) + 1)


class AllocatedBytes(TorchDispatchMode):
    """Bytes of every tensor the block allocates (the Triton path's only allocations are its buffers)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ALLOCATIONS:
            self.bytes += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("values", [{}, {"grid_sizes": [4, 4, 4, 4], "grid_strides": [1, 1, 1, 1]}])
def test_the_cost_model_counts_what_the_triton_path_holds(values, launch_counter):
    """stage_cost's CUDA figure (every mosaic at once, what request_rules compares on CUDA) is what the
    Triton path allocates, to the byte; a dense pyramid holds many times the PyTorch-ops path's buffers."""
    from vllm_stgridpool.stage.cost import stage_cost

    config = STGridPoolConfig.from_dict(values)
    x = torch.randn(32, 27, 27, 8)
    st_gridpool(x, config)
    with AllocatedBytes() as allocated:
        st_gridpool(x, config)
    assert allocated.bytes == stage_cost(32, 27, 27, 8, config, 4).peak_bytes_every_mosaic
