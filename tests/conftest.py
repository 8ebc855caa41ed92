"""Session-wide assets: tiny checkpoints and mp4 clips are built once and shared."""

from __future__ import annotations

import pytest

from vllm_stgridpool_testing.sample_videos import DEFAULT_FPS, DEFAULT_HEIGHT, DEFAULT_WIDTH, write_mp4
from vllm_stgridpool_testing.tiny_models import build_llava_next_video, build_llava_onevision


@pytest.fixture(scope="session")
def onevision_checkpoint(tmp_path_factory):
    """A tiny random LLaVA-OneVision folder (SigLIP 27x27 patches, Qwen2 text)."""
    return build_llava_onevision(tmp_path_factory.mktemp("checkpoints") / "llava_onevision")


@pytest.fixture(scope="session")
def next_video_checkpoint(tmp_path_factory):
    """A tiny random LLaVA-NeXT-Video folder (CLIP 24x24 patches, Llama text)."""
    return build_llava_next_video(tmp_path_factory.mktemp("checkpoints") / "llava_next_video")


@pytest.fixture(scope="session")
def onevision_replica(tmp_path_factory):
    """A replica of llava-hf/llava-onevision-qwen2-7b-ov-hf: its structure and files, depth and widths shrunk."""
    from vllm_stgridpool_testing.tiny_models import build_onevision_replica

    return build_onevision_replica(tmp_path_factory.mktemp("replicas") / "llava-onevision-qwen2-7b-ov-hf")


@pytest.fixture(scope="session")
def llava_video_replica(tmp_path_factory):
    """A replica of llava-hf/LLaVA-Video-7B-Qwen2-hf, in a folder named like the checkpoint (grid layout)."""
    from vllm_stgridpool_testing.tiny_models import build_llava_video_replica

    return build_llava_video_replica(tmp_path_factory.mktemp("replicas") / "LLaVA-Video-7B-Qwen2-hf")


@pytest.fixture(scope="session")
def next_video_replica(tmp_path_factory):
    """A replica of llava-hf/LLaVA-NeXT-Video-7B-hf: its structure and files, depth and widths shrunk."""
    from vllm_stgridpool_testing.tiny_models import build_next_video_replica

    return build_next_video_replica(tmp_path_factory.mktemp("replicas") / "LLaVA-NeXT-Video-7B-hf")


@pytest.fixture(scope="session")
def mp4_factory(tmp_path_factory):
    """``make(num_frames, width=, height=, fps=) -> Path``; each distinct clip is encoded once."""
    folder = tmp_path_factory.mktemp("videos")
    written = {}

    def make(num_frames, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT, fps=DEFAULT_FPS):
        key = (num_frames, width, height, fps)
        if key not in written:
            written[key] = write_mp4(folder / f"{num_frames}f_{width}x{height}_{fps:g}fps.mp4", *key)
        return written[key]

    return make


@pytest.fixture(params=["fused", "ops"])
def nsp_path(request):
    """Runs a test on the fused CPU kernel and on the PyTorch-ops path (the path of every other device)."""
    from vllm_stgridpool.stage import cpu_kernels

    if request.param == "ops":
        with cpu_kernels.disabled():
            yield request.param
    else:
        if cpu_kernels.load() is None:
            pytest.skip("the fused CPU kernel could not be built here (tests/test_native.py says why)")
        yield request.param


@pytest.fixture(scope="module")
def client(server):
    """An ``openai`` client of the module's ``server`` fixture (each server-testing module defines one)."""
    from tests.support.servers import openai_client

    return openai_client(server)


@pytest.fixture(scope="module")
def text_tokens(request, onevision_checkpoint) -> int:
    """Prompt tokens of a chat turn asking the module's ``QUESTION`` about one video, less the video."""
    from tests.support.servers import text_tokens as chat_text_tokens

    return chat_text_tokens(onevision_checkpoint, request.module.QUESTION)
