"""Version-guarded fixes for the environment vLLM runs in (see patches/README.md).

Nothing here changes vLLM's behaviour on a version it was not written for: each
fix checks :func:`is_supported`, and on a mismatch does nothing and logs why, once.
This module stays import-free: the start-up hook imports it in every process.
"""

import re

SUPPORTED_SERIES = (0, 32)  # the vLLM release series the plugin and its patches were written for


def is_supported(version: str) -> bool:
    """True for a vLLM version of :data:`SUPPORTED_SERIES` (``0.32.0``, ``0.32.1+cpu``, ``0.32.0rc1``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) == SUPPORTED_SERIES
