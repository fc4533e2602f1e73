# The two-command contract: `make setup` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

CALIBRATE := $(VENV)/bin/root-calibrate
# The bundled calibrated tables: one command per architecture, defaults otherwise (ratio 1:3, 16 samples
# per shape, clip at q=0.9, per-step rows, 5 steps, max gain 1.25, seed 0).
TABLE_ARCHS := llama-3.2-1b llama-2-7b llama-3-8b qwen2.5-0.5b

.PHONY: setup test test-gpu lint bench demo tables tables-auto notebooks clean

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

demo: ## a one-minute calibration of one small shape into out/demo, then its summary
	$(CALIBRATE) --shapes 256x1024 --ratio 1:3 --samples 8 --out out/demo --name demo

tables: ## regenerate the bundled calibrated tables in coeff_tables/ (next free version each)
	for arch in $(TABLE_ARCHS); do $(CALIBRATE) --arch $$arch --name $$arch --out coeff_tables || exit 1; done
	for arch in $(TABLE_ARCHS); do $(CALIBRATE) --arch $$arch --name $$arch-shared --schedule shared \
		--check-samples 1 --out coeff_tables || exit 1; done
	$(MAKE) tables-auto

# <arch>-auto: per shape the fewest steps (2-10) that reach the default target, Polar Express's 5-step
# error (calibrate/fitting/steps.py). One architecture: make tables-auto TABLE_ARCHS=qwen2.5-0.5b
tables-auto: ## the bundled auto-step tables alone (next free version each)
	for arch in $(TABLE_ARCHS); do $(CALIBRATE) --arch $$arch --name $$arch-auto --steps auto \
		--out coeff_tables || exit 1; done

notebooks: ## execute both notebooks top to bottom (small sizes, as the suite does)
	$(PY) -m pytest -q tests/test_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
