"""Tests for the vLLM 0.33 layer; collected only where vLLM 0.33 is installed (``make test-vllm-next``).

That environment holds the CUDA wheel of vLLM 0.33 without its dependencies,
next to the CPU build of torch: everything in vLLM's Python code runs, its
compiled CUDA ops do not (test_environment.py states which and why).
"""

from vllm_stgridpool.compat import installed_vllm, release_series

NEXT_SERIES = (0, 33)
_installed = installed_vllm()
if _installed is None or release_series(_installed[1]) != NEXT_SERIES:
    collect_ignore_glob = ["test_*.py"]
