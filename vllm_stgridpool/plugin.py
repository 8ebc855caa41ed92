"""vLLM general plugin entry point (``vllm.general_plugins``: ``stgridpool``)."""


def register() -> None:
    """Called by vLLM in every process; filled in by the model integration."""
