"""P3: ``vllm ... --plugins a,b`` means ``VLLM_PLUGINS=a,b`` (ledger: patches/README.md, P3).

The allowlist holds for that command and every process it starts. vLLM
applies it while it builds the ``serve`` parser (``AsyncEngineArgs.add_cli_args``
loads the general plugins), so the option cannot be an ordinary argparse
argument: it is taken out of ``sys.argv`` and exported before vLLM's
``main`` runs. The ``serve`` parser only gets a help entry for it. On an
unsupported vLLM a ``--plugins`` on the command line is refused with a
message naming the supported versions, instead of vLLM's bare
"unrecognized arguments". Installed by the CLI import hook
(:mod:`vllm_stgridpool.compat.vllm_cli`).
"""

from __future__ import annotations

import functools
import os
import sys

from vllm_stgridpool.compat import Feature, Guard, installed_vllm, say_on_stderr, unsupported_message
from vllm_stgridpool.compat.cli_version import CLI_MAIN

PLUGINS_OPTION = "--plugins"
SERVE = "vllm.entrypoints.cli.serve"
P3 = Guard("P3", "--plugins option of the vllm command", (Feature(CLI_MAIN, "main"),))
P3_HELP = Guard("P3", "--plugins listed in vllm serve --help", (Feature(SERVE, "ServeSubcommand.subparser_init"),))
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
