"""The video path: the loader vLLM calls, its decode pool of worker processes, the decoder they run, and
the limits checked before any frame is decoded."""
