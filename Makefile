# The two-command contract: `make setup` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup test test-gpu lint bench clean

setup: ## create .venv, pin torch first (CPU build here, CUDA build on a CUDA machine), then the project
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"

test: ## the whole suite (GPU tests skip themselves without CUDA)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-gpu: ## only the tests that need CUDA
	$(PY) -m pytest -q -m gpu

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: ## optimizer step benchmark; appends to benchmarks/RESULTS.md
	$(PY) benchmarks/optimizer_step.py --record

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
