"""Model aliases (patch P7): ``llava-video`` and friends name the published checkpoints.

Nothing is downloaded: the resolution is checked directly, and a real
``vllm serve`` runs with ``HF_HUB_OFFLINE=1`` and an empty hub cache, where
it must name the published checkpoint (in its log, then in its error)
before it gives up. ``tests/test_replicas.py`` serves an alias end to end
from a hub cache holding a replica; ``tests/test_server.py`` serves
``llava-video`` through a redirect file, which wins over the alias.
"""

from __future__ import annotations

import json
import logging

import pytest

from vllm_stgridpool.compat import model_aliases
from vllm_stgridpool_testing.launch import start_server

PUBLISHED = {  # the table, written out independently of the module
    "llava-video": "llava-hf/LLaVA-Video-7B-Qwen2-hf",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-next-video": "llava-hf/LLaVA-NeXT-Video-7B-hf",
}


@pytest.fixture(autouse=True)
def fresh_redirects():
    """vLLM caches each name's redirect for the life of the process; these tests change the file."""
    from vllm.transformers_utils.utils import maybe_model_redirect

    maybe_model_redirect.cache_clear()
    yield
    maybe_model_redirect.cache_clear()


@pytest.fixture
def log_lines(monkeypatch):
    """Messages the plugin's logger emits during the test (each alias is logged once per process)."""
    monkeypatch.setattr(model_aliases, "_logged", set())
    lines: list[str] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vllm.stgridpool")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture
def no_redirect(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_MODEL_REDIRECT_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no local folder named like an alias


@pytest.mark.parametrize(("alias", "checkpoint"), sorted(PUBLISHED.items()))
def test_each_alias_names_its_published_checkpoint_and_says_so(no_redirect, log_lines, alias, checkpoint):
    assert model_aliases.resolve(alias) == checkpoint
    assert model_aliases.resolve(alias) == checkpoint
    assert log_lines == [f"model alias: {alias} -> {checkpoint}"]


def test_a_redirect_file_wins(monkeypatch, tmp_path, log_lines):
    redirect = tmp_path / "redirect.json"
    redirect.write_text(json.dumps({"llava-video": str(tmp_path / "local-checkpoint")}))
    monkeypatch.setenv("VLLM_MODEL_REDIRECT_PATH", str(redirect))
    assert model_aliases.resolve("llava-video") == str(tmp_path / "local-checkpoint")
    assert model_aliases.resolve("llava-onevision") == PUBLISHED["llava-onevision"]  # not in the file
    assert log_lines == ["model alias: llava-onevision -> llava-hf/llava-onevision-qwen2-7b-ov-hf"]


def test_a_local_folder_of_that_name_wins(no_redirect, tmp_path, log_lines):
    (tmp_path / "llava-video").mkdir()
    assert model_aliases.resolve("llava-video") == "llava-video"
    assert log_lines == []


@pytest.mark.parametrize("name", ["llava-hf/LLaVA-Video-7B-Qwen2-hf", "Qwen/Qwen2-0.5B", "LLAVA-VIDEO", "llava_video"])
def test_other_names_pass_through(no_redirect, log_lines, name):
    assert model_aliases.resolve(name) == name
    assert log_lines == []


def test_other_vllm_versions_are_left_alone():
    from vllm.engine import arg_utils

    probe, get_model_path = arg_utils.maybe_override_with_speculators, arg_utils.get_model_path
    assert model_aliases.apply("0.31.2") is False
    assert (arg_utils.maybe_override_with_speculators, arg_utils.get_model_path) == (probe, get_model_path)


@pytest.mark.engine
def test_vllm_serve_names_the_published_checkpoint_before_loading_it(tmp_path):
    """Offline and with an empty cache the server cannot start, but it must be the published id it looks for."""
    env = {"VLLM_MODEL_REDIRECT_PATH": "", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    log_path = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="vllm serve exited"):
        start_server("llava-next-video", "--plugins", "stgridpool", env=env, log_path=log_path, timeout=300)
    log = log_path.read_text()
    resolved = log.index("model alias: llava-next-video -> llava-hf/LLaVA-NeXT-Video-7B-hf")
    assert resolved < log.index("LocalEntryNotFoundError")  # resolved first, then looked up (offline: not found)
    assert "llava-next-video/" not in log  # never asked for a repository named like the alias


def test_a_redirect_file_applies_before_the_speculators_probe(tmp_path, monkeypatch):
    """vLLM 0.32 and 0.33 probe the typed name on the hub before ModelConfig applies the redirect
    file; the probe wrapper hands the probe the redirected folder instead (what P4 did alone)."""
    redirect = tmp_path / "redirect.json"
    redirect.write_text('{"llava-video": "/models/llava-video-7b"}')
    monkeypatch.setenv("VLLM_MODEL_REDIRECT_PATH", str(redirect))
    seen = {}

    def probe(*, model, tokenizer, **kwargs):
        seen.update(model=model, tokenizer=tokenizer, **kwargs)
        return model, tokenizer, None

    wrapped = model_aliases._resolving_probe(probe)
    assert wrapped(model="llava-video", tokenizer="llava-video", revision=None)[0] == "/models/llava-video-7b"
    assert seen == {"model": "/models/llava-video-7b", "tokenizer": "/models/llava-video-7b", "revision": None}
    assert wrapped(model="other", tokenizer=None)[:2] == ("other", None)


def test_wrappers_pass_arguments_they_do_not_know_through():
    """A keyword or positional argument a later vLLM adds reaches vLLM's function unchanged."""
    calls = []

    def get_model_path(model, revision, *, new_keyword=None):
        calls.append((model, revision, new_keyword))
        return model

    def probe(*args, model, tokenizer, new_keyword=None, **kwargs):
        calls.append((args, model, tokenizer, new_keyword))
        return model, tokenizer, None

    model_aliases._resolving_get_model_path(get_model_path)("some/model", "main", new_keyword=1)
    model_aliases._resolving_probe(probe)("positional", model="some/model", tokenizer="t", new_keyword=2)
    assert calls == [("some/model", "main", 1), (("positional",), "some/model", "t", 2)]
