"""The CLI import hook: patches P1 and P3 applied to vLLM's CLI modules as they are imported.

The ``vllm`` console script imports ``vllm.entrypoints.cli.main`` before any
plugin could run, so the two CLI patches are installed by a ``sys.meta_path``
finder (from ``compat/boot.py``): when a CLI module is first imported, its
real loader runs it, then each patch planned for it runs, each only if its
guard holds for the module as it now is. On an unsupported vLLM the plan is
only :func:`plugins_option.refuse_plugins_option`.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

from vllm_stgridpool.compat import (
    Guard,
    installed_vllm,
    is_supported,
    say_on_stderr,
    say_refusal_once,
    unsupported_message,
)
from vllm_stgridpool.compat.cli_version import CLI_MAIN, CLI_RUN_BATCH, P1_MAIN, P1_RUN_BATCH, read_vllm_version_from
from vllm_stgridpool.compat.plugins_option import P3, P3_HELP, accept_plugins_option, refuse_plugins_option

GUARDS = (P1_MAIN, P1_RUN_BATCH, P3, P3_HELP)


def guarded(guard: Guard, vllm_version: str, patch):
    """``patch(module)``, run only if ``guard`` holds once the module has been executed."""

    @functools.wraps(patch)
    def patch_if_guard_holds(module) -> None:
        if guard.applies(vllm_version, say_on_stderr):
            patch(module)

    return patch_if_guard_holds


def plan_patches(installed: tuple[str, str] | None) -> dict[str, list]:
    """The patches each CLI module gets, as decided by the version guard.

    An unsupported vLLM gets only :func:`refuse_plugins_option` and one line
    on stderr (once per server: the processes it starts stay quiet).
    """
    if installed is None:
        return {}
    dist_name, version = installed
    if not is_supported(version):
        say_refusal_once(
            f"{unsupported_message(version)}; the plugin is not active, vLLM runs without it",
            say_on_stderr,
        )
        return {CLI_MAIN: [refuse_plugins_option(version)]}
    plan: dict[str, list] = {CLI_MAIN: [guarded(P3, version, accept_plugins_option)], CLI_RUN_BATCH: []}
    if dist_name != "vllm":
        plan[CLI_MAIN].insert(0, guarded(P1_MAIN, version, read_vllm_version_from(dist_name)))
        plan[CLI_RUN_BATCH].insert(0, guarded(P1_RUN_BATCH, version, read_vllm_version_from(dist_name)))
    return {name: patches for name, patches in plan.items() if patches}


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the real loader, then the patches; everything else is delegated."""

    def __init__(self, loader, patches) -> None:
        self._loader = loader
        self._patches = patches

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        for patch in self._patches:
            try:
                patch(module)
            except Exception as exc:  # a broken patch must not break the import
                print(f"vllm_stgridpool: {module.__name__} not patched: {exc!r}", file=sys.stderr)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _VllmCliFinder(importlib.abc.MetaPathFinder):
    """Hands the CLI modules to :class:`_PatchAfterExec`; the guard is evaluated on first use."""

    def __init__(self) -> None:
        self._plan: dict[str, list] | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in (CLI_MAIN, CLI_RUN_BATCH):
            return None
        if self._plan is None:
            self._plan = plan_patches(installed_vllm())
        if not self._plan:
            sys.meta_path.remove(self)
            return None
        patches = self._plan.get(fullname)
        if not patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchAfterExec(spec.loader, patches)
        return spec


def install_import_hook() -> None:
    if CLI_MAIN in sys.modules:
        return
    if any(isinstance(f, _VllmCliFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _VllmCliFinder())
