"""The largest value vLLM's gauges reach while a block runs, sampled in a thread.

Both load benchmarks need it: the serving one reads a server's /metrics,
the batch one the offline ``LLM.get_metrics()``.
"""

from __future__ import annotations

import threading
from typing import Callable

KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
RUNNING_REQUESTS = "vllm:num_requests_running"


class GaugePeaks:
    """``with GaugePeaks(read, interval) as gauges: ...`` then ``gauges.peaks[name]``.

    ``read()`` returns the current value of each gauge (a mapping name ->
    float); a read that fails with ``OSError`` (the server busy or gone) is
    skipped.
    """

    def __init__(self, read: Callable[[], dict[str, float]], interval: float):
        self.read, self.interval = read, interval
        self.peaks = {KV_CACHE_USAGE: 0.0, RUNNING_REQUESTS: 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                values = self.read()
            except OSError:
                values = {}
            for name, value in values.items():
                if name in self.peaks:
                    self.peaks[name] = max(self.peaks[name], value)
            self._stop.wait(self.interval)

    def __enter__(self) -> GaugePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
