# Every target does its own set-up: a fresh machine needs only Python >= 3.11.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint format install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -e ".[hf,dev,judge]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/pipeline.py --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

lint: $(STAMP)
	$(BIN)/ruff check jaxlm sae scripts tests tpu
	$(BIN)/ruff format --check jaxlm sae scripts tests tpu

format: $(STAMP)
	$(BIN)/ruff format jaxlm sae scripts tests tpu
	$(BIN)/ruff check --fix jaxlm sae scripts tests tpu

check: lint test

clean:
	rm -rf $(VENV) runs
