"""What the tests' real ``vllm serve`` processes share: a tiny float32 server's CPU flags, a client,
and the prompt tokens a chat turn spends besides its video."""

from __future__ import annotations


def cpu_server_args(max_model_len: int = 16384, kv_cache_bytes: int = 1 << 30) -> tuple[str, ...]:
    """Flags for a tiny checkpoint on 2 CPU cores: an explicit KV cache (vLLM's CPU default reserves most of
    memory), float32 like the references, no graph capture."""
    return (
        "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--dtype", "float32",
        "--enforce-eager",
    )


def openai_client(server):
    """The ``openai`` client a user would point at ``server``; no retries, so every error is seen once."""
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)


def text_tokens(checkpoint, question: str) -> int:
    """Prompt tokens of a one-video chat turn other than its ``<video>`` placeholder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<video>") == 1
    return len(tokenizer(rendered)["input_ids"]) - 1


def serving(model, tmp_path_factory, name: str, *args: str, timeout: float = 600, **kwargs):
    """A module-scoped server fixture's body, ``yield from serving(...)``: ``vllm serve model *args`` with its
    log in a fresh folder ``name``, stopped (with every process it started) when the module is done."""
    from vllm_stgridpool_testing.launch import start_server

    log_path = tmp_path_factory.mktemp(name) / "server.log"
    with start_server(model, *args, log_path=log_path, timeout=timeout, **kwargs) as running:
        yield running
