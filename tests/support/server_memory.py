"""A running server's memory as the machine sees it: the resident set of every process in its group.

``vllm serve`` runs as a process group (API server, engine core, workers, decode workers), and a
leak or a decoded size bomb can land in any of them, so the tests sum them all.
"""

from __future__ import annotations

import os
from pathlib import Path


def group_rss_bytes(pgid: int) -> int:
    """Summed VmRSS of every process in the process group ``pgid``."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) != pgid:
                continue
            for line in Path(f"/proc/{name}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return total
