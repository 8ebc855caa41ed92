"""The Triton stage (vllm_stgridpool/stage/triton_stage.py, triton_kernels.py) and the backend choice (backend.py).

The kernels run here on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), the code a
GPU compiles, with the interpreter's large blocks and with a GPU's (test_triton_ptx.py compiles them for
sm_80 and sm_90 and reads the PTX; test_triton_warmup.py audits compiles and copies). Expected
values come from the float64 reference (tests/support/reference_stgridpool.py): float64 within 1e-9,
mosaics in bfloat16 / float16 equal to the float32 reference rounded once per level, pooled tokens
within the dtype's rounding of the window's largest |x| (the CPU kernels' contract, test_numerics.py).
Interpreted kernels are slow (a launch costs about 0.1 s), so shapes stay small.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.support.reference_stgridpool import ptg, ptg_level, st_gridpool_reference

from vllm_stgridpool import STGridPoolConfig, st_gridpool
from vllm_stgridpool.stage import backend, cpu_kernels, triton_stage
from vllm_stgridpool.stage.plan import make_plan

pytest.importorskip("triton")

# The interpreter emulates a GPU in numpy, which warns where a GPU says nothing (exp of -inf, overflow to inf).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test here runs the Triton kernels on CPU tensors, through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "triton")


def config(grid_sizes=(4, 4, 4), grid_strides=(2, 4, 8), kernel_size=2, temperature=1.0, norm_p=2.0):
    return STGridPoolConfig.from_dict({"grid_sizes": list(grid_sizes), "grid_strides": list(grid_strides),
                                       "kernel_size": kernel_size, "temperature": temperature, "norm_p": norm_p})


def randn(*shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def reference(x, cfg):
    return st_gridpool_reference(x, cfg.grid_sizes, cfg.grid_strides, cfg.kernel_size, cfg.temperature, cfg.norm_p)


# --------------------------------------------------------------------------
# float64: the reference within 1e-9
# --------------------------------------------------------------------------

CASES = {
    "paper, 27x27": ((16, 27, 27, 8), config()),
    "24x24, k=3, t=-2, p=1": ((16, 24, 24, 6), config(kernel_size=3, temperature=-2.0, norm_p=1.0)),
    "13x11, k=4, t=30, p=3": ((20, 13, 11, 5), config((3, 6), (1, 2), kernel_size=4, temperature=30.0, norm_p=3.0)),
    "9x8, k=1, t=0, p=0.5": ((24, 9, 8, 4), config((9, 2), (1, 3), kernel_size=1, temperature=0.0, norm_p=0.5)),
    "no pyramid": ((5, 27, 27, 3), config((), ())),
    "eight levels": ((12, 6, 5, 3), config((2,) * 8, (1,) * 8)),
    "t=+1e4, p=1000": ((12, 8, 8, 4), config((4, 3), (2, 3), temperature=1e4, norm_p=1000.0)),
    "t=-1e4, p=0.01": ((12, 8, 8, 4), config((4, 3), (2, 3), temperature=-1e4, norm_p=0.01)),
    "27x27, 4x4 mosaics, batch of 2": ((2, 32, 27, 27, 4), config((16,), (2,), temperature=0.5)),
}


@pytest.mark.parametrize("name", CASES)
def test_float64_equals_the_reference(name):
    shape, cfg = CASES[name]
    x = randn(*shape, seed=len(name))
    if cfg.norm_p > 100:  # the reference's x ** 1000 neither over- nor underflows for x in [0.6, 1.9]
        x = 0.6 + 1.3 * torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = st_gridpool(x, cfg)
    videos = x if x.dim() == 5 else x.unsqueeze(0)
    want = torch.stack([reference(video, cfg) for video in videos]).reshape(got.shape)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-9


# --------------------------------------------------------------------------
# reduced precision: the CPU kernels' contract
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("grid_sizes, grid_strides", [((4, 4, 4), (2, 4, 8)), ((3,), (1,)), ((6, 4), (1, 2))])
def test_mosaics_are_the_float32_result_rounded(dtype, grid_sizes, grid_strides):
    """kernel_size 1 makes NSP the identity: each level equals the reference level run in float32 on the
    previous level's rounded frames and rounded once to the dtype, bit for bit (27 x 27: cropped tiles)."""
    cfg = config(grid_sizes, grid_strides, kernel_size=1)
    x = randn(24, 27, 27, 8, seed=len(grid_sizes), dtype=dtype)
    want = x
    for grid, stride in zip(grid_sizes, grid_strides):
        want = ptg_level(want.float(), grid, stride).to(dtype)
    got = st_gridpool(x, cfg)
    assert torch.equal(got, want)


def ulps_of_window_largest(got, x, cfg):
    """The largest error of pooled tokens ``got`` against the float64 reference on the same rounded input
    ``x``, in units of the dtype's eps times the window's largest |x| (the CPU kernels' contract)."""
    want = reference(x.double(), cfg)
    frames = ptg(x.double(), cfg.grid_sizes, cfg.grid_strides)
    out_h, out_w = want.shape[1:3]
    k = cfg.kernel_size
    windows = frames[:, : out_h * k, : out_w * k].abs()
    largest = windows.unflatten(1, (out_h, k)).unflatten(3, (out_w, k)).amax(dim=(2, 4))
    return ((got.double() - want).abs() / (torch.finfo(x.dtype).eps * largest)).max().item()


@pytest.mark.parametrize("dtype, ulps_allowed", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float32, 4.0)])
@pytest.mark.parametrize("kernel_size, temperature", [(2, 1.0), (3, -2.0)])
def test_outputs_within_the_dtype_rounding(dtype, ulps_allowed, kernel_size, temperature):
    """Pooled tokens against the float64 reference on the same rounded input, in units of the dtype's eps
    times the window's largest |x|: bfloat16 and float16 sum in float32 and round once (<= 1, as the CPU
    kernels in test_numerics.py); float32 rounds at each multiply-add and in every mosaic's averages (measured
    3.30 here, as the CPU kernels' 3.30 and the PyTorch-ops path's 2.91 on this input)."""
    cfg = config(kernel_size=kernel_size, temperature=temperature)
    x = randn(16, 27, 27, 32, seed=kernel_size, dtype=dtype)
    assert ulps_of_window_largest(st_gridpool(x, cfg), x, cfg) <= ulps_allowed


def extreme(shape, dtype, seed):
    """Tokens of the kinds that break a naive score: zeros, +-the dtype's largest value, 1e30, subnormals,
    ordinary features and features spread over 40 decades (clipped to the dtype's range)."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    *lead, dim = shape
    tokens = math.prod(lead)
    normal = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    kinds = [torch.zeros(tokens, dim, dtype=torch.float64), torch.sign(normal) * info.max,
             torch.full((tokens, dim), info.max, dtype=torch.float64), normal * 1e30, normal * info.tiny * 0.25,
             normal, normal * torch.pow(10.0, torch.randint(-20, 20, (tokens, dim), generator=gen).double())]
    choice = torch.randint(0, len(kinds), (tokens,), generator=gen)
    values = torch.stack(kinds)[choice, torch.arange(tokens)]
    return values.clamp(-info.max, info.max).to(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_extreme_finite_features_give_finite_outputs(dtype):
    """Area sums and norms that overflow, zero tokens, subnormals: every output finite, for norms 2 and 0.5
    and temperatures at both ends of the range and 0."""
    x = extreme((12, 9, 7, 16), dtype, seed=3)
    for temperature, norm_p in [(1e4, 2.0), (-1e4, 0.5), (0.0, 1.0)]:
        y = st_gridpool(x, config((4, 2), (1, 3), temperature=temperature, norm_p=norm_p))
        assert y.dtype == dtype and torch.isfinite(y).all(), (temperature, norm_p)
    largest = torch.full((4, 4, 4, 8), torch.finfo(dtype).max, dtype=dtype)
    assert st_gridpool(largest, config((), ())).eq(torch.finfo(dtype).max).all()  # saturates, no inf


def test_batch_strides_and_input_untouched():
    """A batch equals its videos one by one; a view with D not innermost is read in place, never written."""
    cfg = config((4, 3), (2, 3), temperature=-1.5, norm_p=1.0)
    base = randn(2, 20, 5, 9, 11, seed=7)  # (B, T, D, W, H) storage
    x = base.permute(0, 1, 4, 3, 2)  # (B, T, H, W, D), not contiguous
    keep = base.clone()
    y = st_gridpool(x, cfg)
    assert torch.equal(base, keep)
    for b in range(2):
        assert torch.equal(y[b], st_gridpool(x[b].contiguous(), cfg))
        assert (y[b] - reference(x[b], cfg)).abs().max().item() <= 1e-9


def test_matches_the_cpu_kernels_in_float32():
    """The two fused paths compute the same formulas: float32 outputs within a few ulps of each other."""
    cfg = config()
    x = randn(16, 27, 27, 16, seed=9, dtype=torch.float32)
    got = st_gridpool(x, cfg)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STGRIDPOOL_STAGE_BACKEND", "cpu-kernels")
        want = st_gridpool(x, cfg)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# a GPU's blocks: several channel chunks with a masked tail, BLOCK_J as on the GPU
# --------------------------------------------------------------------------


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The launcher picks the block sizes it picks for a GPU; the kernel still runs interpreted."""
    monkeypatch.setattr(triton_stage, "_interpreted", lambda: False)


GPU_PYRAMID = dict(grid_sizes=(4,), grid_strides=(1,))  # 4 frames of 4 x 4: one 2 x 2 mosaic of 2 x 2 tiles


@pytest.mark.parametrize("dtype, dim, chunks, ulps_allowed", [(torch.bfloat16, 3584, 4, 1.0),
                                                               (torch.float32, 896, 2, 4.0)])
@pytest.mark.parametrize("kernel_size, temperature, norm_p", [(2, 1.0, 2.0), (3, -2.0, 1.0)])
def test_gpu_blocks_at_production_widths(gpu_blocks, dtype, dim, chunks, ulps_allowed, kernel_size, temperature,
                                         norm_p):
    """D=3584 bfloat16 and D=896 float32 in a GPU's blocks, one output token per program: at kernel_size 2,
    1,024 channels a block in bfloat16 (four chunks, the last 512 masked) and 512 in float32 (two, the last
    384 masked); at 3, 256 and 128 (windows of 16). The CPU kernels' contract against the reference."""
    block = triton_stage.blocks(kernel_size, dim, dtype.itemsize)
    assert block.BLOCK_J == 1 and block.BLOCK_W == 4 ** math.ceil(math.log2(kernel_size))
    if kernel_size == 2:
        assert -(-dim // block.BLOCK_D) == chunks and dim % block.BLOCK_D
    cfg = config(**GPU_PYRAMID, kernel_size=kernel_size, temperature=temperature, norm_p=norm_p)
    x = randn(4, 4, 4, dim, seed=dim, dtype=dtype)
    assert ulps_of_window_largest(st_gridpool(x, cfg), x, cfg) <= ulps_allowed


@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 3584), (torch.float32, 896)])
def test_gpu_blocks_mosaics_bit_for_bit(gpu_blocks, dtype, dim):
    """kernel_size 1: the mosaic, resized chunk by chunk, equals the float32 reference rounded once."""
    cfg = config(**GPU_PYRAMID, kernel_size=1)
    x = randn(4, 4, 4, dim, seed=5, dtype=dtype)
    want = ptg_level(x.float(), 4, 1).to(dtype)
    assert torch.equal(st_gridpool(x, cfg), want)


def test_gpu_blocks_in_float64_on_a_strided_input(gpu_blocks):
    """float64 in a GPU's blocks (256 channels: four chunks at D=896, the last 128 masked) within 1e-9, for
    p = 3, on an input whose channels are not innermost (no 128-bit accesses: VEC 1)."""
    assert triton_stage.blocks(2, 896, 8) == triton_stage.Blocks(1, 4, 256)
    cfg = config(**GPU_PYRAMID, temperature=30.0, norm_p=3.0)
    x = randn(4, 896, 4, 4, seed=6).permute(0, 2, 3, 1)
    assert triton_stage._vector_width(x) == 1 and triton_stage._vector_width(x.contiguous()) == 2
    assert (st_gridpool(x, cfg) - reference(x, cfg)).abs().max().item() <= 1e-9


# --------------------------------------------------------------------------
# torch.compile and meta
# --------------------------------------------------------------------------


def test_compile_fullgraph_and_the_model_video_path():
    """The stage is one custom op under torch.compile(fullgraph=True): no graph break, eager's values; the
    model's video path (models.common.pool_videos) compiles whole too, and the fake gives meta shapes."""
    from vllm_stgridpool.models.common import pool_videos

    torch._dynamo.reset()
    cfg = config((4, 3), (2, 3), kernel_size=2)
    x = randn(12, 10, 9, 4, seed=11, dtype=torch.float32)
    compiled = torch.compile(lambda v: st_gridpool(v, cfg), fullgraph=True)
    assert torch.equal(compiled(x), st_gridpool(x, cfg))
    features = x.flatten(1, 2)  # (T, H*W, D), as the model hands them over

    def video_path(feats):
        return pool_videos([feats], [cfg], (10, 9), stock_pool=lambda v: v)[0]

    explained = torch._dynamo.explain(video_path)(features)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert torch.equal(torch.compile(video_path, fullgraph=True)(features), st_gridpool(x, cfg).reshape(-1, 4))
    meta = torch.compile(lambda v: st_gridpool(v, cfg), fullgraph=True)(torch.empty(2, 12, 10, 9, 4, device="meta"))
    assert meta.shape == (2, 12, 5, 4, 4) and meta.device.type == "meta"


# --------------------------------------------------------------------------
# the backend choice
# --------------------------------------------------------------------------


def test_auto_picks_by_device(monkeypatch):
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "auto")
    assert backend.for_device("cpu") == "cpu-kernels"
    assert backend.for_device("cuda") == "triton"  # triton imports here
    assert backend.for_device("meta") == "torch"
    monkeypatch.setattr(backend, "_triton_imports", lambda: False)
    assert backend.for_device("cuda") == "torch"


def test_a_choice_the_device_cannot_run_is_refused_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.for_device("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        backend.for_device("xpu")
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "cuda-graphs")
    with pytest.raises(ValueError, match="auto, cpu-kernels, triton, torch"):
        backend.for_device("cuda")


def test_torch_backend_keeps_the_cpu_kernels_out(monkeypatch):
    """``torch`` is the PyTorch-ops path on CPU too: the same bits as cpu_kernels.disabled(), no kernel call."""
    monkeypatch.setenv("STGRIDPOOL_STAGE_BACKEND", "torch")
    x = randn(16, 9, 8, 8, seed=12, dtype=torch.float32)
    with cpu_kernels.disabled():
        want = st_gridpool(x, config())

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU kernels ran")

    monkeypatch.setattr(cpu_kernels, "run_plan", refuse)
    monkeypatch.setattr(cpu_kernels, "norm_pool_into", refuse)
    assert torch.equal(st_gridpool(x, config()), want)


def test_the_backend_is_logged_once_at_start_up(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_announced", False)
    with caplog.at_level(logging.INFO, logger="vllm.stgridpool"):
        assert backend.announce("cpu") == "triton"
        backend.announce("cpu")
    said = [r.getMessage() for r in caplog.records if "stage backend" in r.getMessage()]
    assert said == ["ST-GridPool stage backend: triton on cpu (STGRIDPOOL_STAGE_BACKEND=triton)"]


@pytest.mark.engine
def test_a_server_runs_the_chosen_backend_and_logs_it_once(onevision_checkpoint, mp4_factory, tmp_path):
    """A real ``vllm serve`` with the Triton stage (interpreted on this CPU): the choice reaches the worker,
    which logs it once at start-up and warms the stage up, and a 16-frame video is pooled by it into the
    formula's token count."""
    import base64
    import json

    from tests.support.servers import cpu_server_args, openai_client, text_tokens
    from vllm_stgridpool_testing.launch import start_server

    video = mp4_factory(16)
    with start_server(onevision_checkpoint, "--plugins", "stgridpool", *cpu_server_args(),
                      "--limit-mm-per-prompt", json.dumps({"video": 1}), log_path=tmp_path / "server.log") as server:
        client = openai_client(server)
        url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
        response = client.chat.completions.create(model=str(onevision_checkpoint), max_tokens=4,
                                                  messages=[{"role": "user", "content": content}])
        log = server.log()
    said = [line for line in log.splitlines() if "ST-GridPool stage backend:" in line]
    assert len(said) == 1 and said[0].endswith("triton on cpu (STGRIDPOOL_STAGE_BACKEND=triton)"), said
    # The model warmed the stage while the engine started: interpreted, the step tables only (64 frame
    # counts, the server's pyramid and none).
    warmed = [line for line in log.splitlines() if "Triton stage warmed up on cpu" in line]
    assert len(warmed) == 1 and warmed[0].endswith("0 kernel calls (D=32/128, float32), 128 step tables"), warmed
    text = text_tokens(onevision_checkpoint, "What happens?")
    assert response.usage.prompt_tokens == text + 16 * 169 + 1  # the placeholder becomes the video's tokens


def test_launches_follow_the_levels():
    """Launch l resizes level l's tiles; a row is pooled in the first launch after its value is complete."""
    from vllm_stgridpool.stage.triton_stage import launches

    plan = make_plan(16, 27, 27, config())  # the spec's worked example: two levels build mosaics
    steps = launches(plan)
    assert len(steps) == len(plan.levels) + 1 == 3
    assert [len(launch.places) for launch in steps] == [8, 4, 0]  # two 2x2 mosaics of input frames, then one
    assert [launch.tile for launch in steps] == [(14, 14), (14, 14), (0, 0)]
    assert sorted(row for *_, row in steps[0].pools) == [t for t in range(16) if t not in (7, 15)]
    assert [(source, row) for _, source, row in steps[1].pools] == [(0, 7)]  # level 1's mosaic of frame 7
    assert [(source, row) for _, source, row in steps[2].pools] == [(2, 15)]  # level 2's mosaic of frame 15
    # Level 1 samples frames 3, 7, 11, 15: two input frames and the two mosaics level 0 finished.
    assert sorted((from_input, source) for from_input, source, *_ in steps[1].places) == [(0, 0), (0, 1), (1, 3),
                                                                                           (1, 11)]
