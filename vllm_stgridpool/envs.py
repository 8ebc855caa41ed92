"""Every environment variable the plugin reads, in one place (as vLLM's ``vllm.envs``).

Read them as attributes, ``envs.VLLM_PLUGINS``: each access reads the
environment anew, so a value set after import (``--plugins`` sets
``VLLM_PLUGINS`` while the command line is parsed) is seen. This module
imports nothing heavy: the start-up hooks import it in every process.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def _optional(name: str) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or None


environment_variables: dict[str, Callable[[], Any]] = {
    # vLLM's allowlist of general plugins (``--plugins a,b`` sets it). Naming
    # ``stgridpool`` activates ST-GridPool for every model the server loads.
    "VLLM_PLUGINS": _optional("VLLM_PLUGINS"),
    # vLLM's video loader choice. Set, the plugin leaves the server's loader alone.
    "VLLM_VIDEO_LOADER_BACKEND": _optional("VLLM_VIDEO_LOADER_BACKEND"),
    # Set by the plugin once it has said that this vLLM is unsupported, so the
    # processes a server spawns do not say it again.
    "STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED": lambda: os.environ.get("STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED") == "1",
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
