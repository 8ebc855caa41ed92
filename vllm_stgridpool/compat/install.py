"""Install the start-up hook file into the running interpreter's site-packages.

``python -m vllm_stgridpool.compat.install`` (``make setup`` runs it). pip
cannot place a ``.pth`` file from an editable install, so this writes one:
its single line, :data:`PTH_LINE`, is the content of
``patches/vllm_stgridpool_boot.pth`` (kept in the repository to be read; an
installed package has no ``patches/`` folder to copy from). ``--uninstall``
removes it.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

PTH_NAME = "vllm_stgridpool_boot.pth"
PTH_LINE = "import vllm_stgridpool.compat.boot\n"


def target() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uninstall", action="store_true")
    args = parser.parse_args(argv)
    path = target()
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    elif not path.exists() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
