"""ST-GridPool for vLLM: fewer, better visual tokens per video, no retraining.

The public surface is two names, ``STGridPoolConfig`` and ``st_gridpool``.
They are resolved lazily so that importing a submodule (the start-up hooks
in ``vllm_stgridpool.compat`` run in every Python process of the venv)
does not import torch.
"""

__all__ = ["STGridPoolConfig", "st_gridpool"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "STGridPoolConfig":
        from vllm_stgridpool.config import STGridPoolConfig

        return STGridPoolConfig
    if name == "st_gridpool":
        from vllm_stgridpool.stage import st_gridpool

        return st_gridpool
    raise AttributeError(f"module 'vllm_stgridpool' has no attribute {name!r}")
