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


class PeakSampler:
    """``with PeakSampler(pgid) as memory:``: the group's RSS every 20 ms on a thread; ``memory.idle`` on
    entry, ``memory.peak`` the highest seen, ``memory.rise`` the difference."""

    def __init__(self, pgid: int):
        import threading

        self.pgid, self.idle, self.peak = pgid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def rise(self) -> int:
        return self.peak - self.idle

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, group_rss_bytes(self.pgid))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakSampler:
        self.idle = self.peak = group_rss_bytes(self.pgid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, group_rss_bytes(self.pgid))
