# The two commands a newcomer needs: `make book` and `make test`. Each creates .venv when
# missing and installs what it needs with the exact pins in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Chapter notebooks, in table-of-contents order (read from _toc.yml when a recipe runs).
NOTEBOOKS = $(shell $(BIN)/python tests/toc.py)
JOBS ?= 2

.PHONY: book test lint unit nbval build-book notebooks bench clean help

help:
	@echo "make book       build the HTML book into _build/html"
	@echo "make test       lint, unit tests, strict nbval on every chapter, warning-free book build"
	@echo "make notebooks  re-execute every chapter notebook in place (after changing kvlib)"
	@echo "make bench      python -m kvlib.bench (side-by-side measurements)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.book: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[book]"
	@touch $@

$(VENV)/.test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[book,test]"
	@touch $@

book: $(VENV)/.book
	$(BIN)/jupyter-book build . --all
	@echo "Open $(CURDIR)/_build/html/index.html"

test: $(VENV)/.test lint unit nbval build-book

lint: $(VENV)/.test
	$(BIN)/ruff check kvlib tests notebooks _ext
	$(BIN)/ruff format --check kvlib tests notebooks _ext

unit: $(VENV)/.test
	$(BIN)/pytest -n $(JOBS) tests

nbval: $(VENV)/.test
	$(BIN)/pytest -n $(JOBS) --dist loadfile --nbval --nbval-current-env \
		--nbval-sanitize-with tests/sanitize.cfg $(NOTEBOOKS)

build-book: $(VENV)/.test
	$(BIN)/jupyter-book build . --all -W -n --keep-going

notebooks: $(VENV)/.test
	for nb in $(NOTEBOOKS); do \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=600 $$nb || exit 1; \
	done

bench: $(VENV)/.test
	$(BIN)/python -m kvlib.bench

clean:
	rm -rf _build .pytest_cache
