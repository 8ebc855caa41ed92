"""Version-guarded fixes for the environment vLLM runs in (see patches/README.md).

Nothing here changes vLLM's behaviour on a version it was not written for: each
fix checks its guard, and on a mismatch does nothing and logs why, once.
"""
