"""Start-up hooks, run in every Python process of the venv by ``vllm_stgridpool_boot.pth``.

Only cheap work happens here: each fix installs a lazy import hook that fires
when the module it fixes is first imported, so a process that never imports
vLLM or torchvision pays for nothing. A failing hook never stops Python from
starting.
"""

from __future__ import annotations


def _install_hooks() -> None:
    from vllm_stgridpool.compat import torchvision_ops, vllm_cli

    torchvision_ops.install_import_hook()
    vllm_cli.install_import_hook()


try:
    _install_hooks()
except Exception as exc:  # pragma: no cover - start-up must never fail
    import sys

    print(f"vllm_stgridpool: start-up hooks not installed: {exc!r}", file=sys.stderr)
