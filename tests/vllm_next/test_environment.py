"""What this environment is, and which layers of vLLM 0.33 it cannot run.

The environment is vLLM 0.33's wheel without its dependencies, next to the
CPU torch; its other requirements come from ``requirements.txt``. These tests
keep the README's account of it true.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
# vLLM 0.33 requirements deliberately left out: torch and its CUDA companions (the
# Makefile installs the CPU torch, and torchvision without dependencies), and CUDA-only
# kernel, video-decoder and loader packages nothing here can use.
CUDA_ONLY = {
    "torch", "torchaudio", "torchvision", "torchcodec", "pynvvideocodec", "flashinfer-python",
    "apache-tvm-ffi", "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors",
    "instanttensor", "nvidia-cutlass-dsl", "quack-kernels", "tokenspeed-mla", "humming-kernels",
}  # fmt: skip


def requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_vllm_033_cuda_build_next_to_a_cpu_torch():
    assert importlib.metadata.version("vllm").startswith("0.33.")
    assert torch.version.cuda is None and not torch.cuda.is_available()


def test_every_vllm_requirement_is_installed_or_listed_as_cuda_only():
    wanted = {requirement_name(line) for line in importlib.metadata.requires("vllm") if "extra ==" not in line}
    listed = {
        requirement_name(line)
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert wanted - CUDA_ONLY == listed
    assert CUDA_ONLY <= wanted


@pytest.mark.parametrize("library", ["_C_stable_libtorch.abi3.so", "_moe_C_stable_libtorch.abi3.so"])
def test_compiled_cuda_ops_cannot_load_here(library):
    """The layer this environment cannot exercise: vLLM's compiled ops link the CUDA driver and
    CUDA torch (``libcuda.so.1``, ``libtorch_cuda.so``), which a machine without a GPU and a CPU
    torch do not have; so no engine (attention, sampling, the model's forward) runs on 0.33 here."""
    import vllm

    path = Path(vllm.__file__).with_name(library)
    assert path.exists()
    with pytest.raises(OSError):
        torch.ops.load_library(str(path))
    assert "libcuda.so.1" in path.read_bytes().decode("latin-1")
