"""Fixtures for the tests, the demo and the benchmarks; never imported by the plugin at run time.

Nothing can be fetched from a model hub here, so these build what the
plugin is exercised with: tiny local checkpoints (``tiny_models``), real
encoded mp4s (``sample_videos``), and a real ``vllm serve`` process
(``launch``).
"""
