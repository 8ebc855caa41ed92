"""vLLM model classes with ST-GridPool in their video path, one module per model family."""
