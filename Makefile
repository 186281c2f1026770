# Every target does its own set-up: a fresh machine needs only Python >= 3.11 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev
PIP := $(BIN)/python -m pip install -q

.PHONY: demo test check lint format install clean

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) "torch==2.13.0" || $(PIP) torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) -e ".[hf]"
	touch $(BASE)

# Tests also need the dev tools, the LLM SDK and libtpu (ahead-of-time TPU compiles in CI).
$(DEV): $(BASE)
	$(PIP) -e ".[hf,dev,judge,tpu]"
	touch $(DEV)

install: $(DEV)

demo: $(BASE)
	$(BIN)/python scripts/pipeline.py --workdir runs/demo

test: $(DEV)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 -q tests

lint: $(DEV)
	$(BIN)/ruff check jaxlm scripts tests tpu
	$(BIN)/ruff format --check jaxlm scripts tests tpu

format: $(DEV)
	$(BIN)/ruff format jaxlm scripts tests tpu
	$(BIN)/ruff check --fix jaxlm scripts tests tpu

check: lint test

clean:
	rm -rf $(VENV) runs
