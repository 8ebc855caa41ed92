"""What one video's stage costs, computed from the plan it runs: memory held and elements moved.

The API server refuses a per-request pyramid that would cost more than the
server's own setting (``request_rules.check_request_cost``) before the
model runs, so this must follow ``ops.py`` step by step: it walks the same
:class:`~vllm_stgridpool.stage.plan.Plan` and counts what ``torch_ops.apply_plan``
allocates and touches at each step. Change it whenever ``ops.py`` changes;
``tests/test_ops.py`` measures the stage against it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from vllm_stgridpool.config import STGridPoolConfig
from vllm_stgridpool.stage.plan import Plan, PoolFrames, PoolMosaics, Resize, chunk_frames, make_plan


class StageCost(NamedTuple):
    """One video's stage: the most memory it holds at once beyond its input, and the elements it moves.

    ``peak_bytes`` counts the pooled output, the mosaic buffers and the
    largest temporaries of any one step (what ``ops.py`` allocates);
    ``peak_bytes_every_mosaic`` the output and every mosaic at once, what the
    Triton stage (``triton_stage.py``) allocates, with no temporaries;
    ``work`` counts the elements the stage moves through memory: whole
    frames read by each pass (norm, weighted sum, resize) and every element
    written (output, tiles, mosaics); the weighted sum's accumulation into
    the output it is writing is not counted again.
    """

    peak_bytes: int
    work: int
    peak_bytes_every_mosaic: int


@functools.lru_cache(maxsize=1024)
def stage_cost(
    num_frames: int, height: int, width: int, dim: int, config: STGridPoolConfig, itemsize: int
) -> StageCost:
    """Upper bounds of :func:`vllm_stgridpool.st_gridpool` on one (num_frames, height, width, dim) video.

    Both grow with the pyramid's density (more levels, smaller strides, more
    tiles) and shrink with the kernel, so a server can refuse per-request
    settings that cost more than its own setting at ``max_frames``.
    ``itemsize`` is the features' bytes per element (4 for float32). This is
    the eager stage on its PyTorch-ops path, as vLLM runs it on every device
    (under ``torch.compile`` the pyramid runs as this same eager code, after
    the compiler's pooling of every frame); the fused CPU kernel
    (:mod:`vllm_stgridpool.stage.cpu_kernels`) reads each window once and holds no
    scores, so it stays under both bounds.
    """
    plan = make_plan(num_frames, height, width, config, chunk_frames(height, width, dim, itemsize))
    return _plan_cost(plan, dim, itemsize, config.norm_p)


def _plan_cost(plan: Plan, dim: int, itemsize: int, norm_p: float) -> StageCost:
    """Bytes held and elements moved by ``torch_ops.apply_plan`` for one video, step by step."""
    k = plan.kernel_size
    out_h, out_w = plan.out_grid
    frame = plan.height * plan.width * dim
    pooled_out = out_h * out_w * dim
    compute = max(itemsize, 4)  # scores and weights are at least float32
    scaled = norm_p not in (1.0, 2.0)  # torch_ops._scores: a float copy of the features, scaled per token

    def pool(frames: int) -> tuple[int, int]:
        tokens = frames * out_h * k * out_w * k
        scaled_copy = tokens * dim * compute if scaled else 0  # held while scoring
        # bfloat16 and float16 sum in a float32 scratch, copied into the output; on CPU each product also
        # casts its token view to float32. Held while summing, after the scaled copy is gone.
        scratch = 2 * frames * pooled_out * compute if compute > itemsize else 0
        temp = 3 * tokens * compute + max(scaled_copy, scratch)  # scores, weights, weights in the input dtype
        moved = frames * (2 * frame + pooled_out)  # the norm pass and the weighted sum read, the output written
        if scratch:
            moved += 4 * frames * pooled_out
        if scaled:
            moved += 4 * frames * frame  # max, min, the scaled copy written and read
        return temp, moved

    peak = work = 0
    for step in plan.steps:
        temp = 0
        if isinstance(step, PoolFrames):
            temp, moved = pool(step.stop - step.start)
        elif isinstance(step, PoolMosaics):
            temp, moved = pool(1)  # one mosaic at a time
            moved *= len(step.mosaics)
        elif isinstance(step, Resize):
            tile = step.size[0] * step.size[1] * dim
            temp = len(step.sources) * tile * itemsize  # the tiles, placed once all exist
            moved = len(step.sources) * (frame + tile)
            moved += sum(2 * place.rows * place.cols * dim for places in step.places for place in places)  # placed
        else:
            moved = 0
        peak, work = max(peak, temp), work + moved
    output = plan.num_frames * pooled_out * itemsize
    slack = frame * itemsize  # small temporaries (scores, weights, views' bookkeeping) not counted above
    return StageCost(
        peak_bytes=output + plan.num_slots * frame * itemsize + peak + slack,
        work=work,
        peak_bytes_every_mosaic=output + len(plan.slots) * frame * itemsize,
    )

