# Every target does its own set-up: a fresh machine needs only Python >= 3.11 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev
PIP := $(BIN)/python -m pip install -q

.PHONY: demo test check lint types format install clean chromium

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
	# SAELens as the SAE parity reference: its SAE classes import only these (no wandb, datasets).
	$(PIP) --no-deps "sae-lens==6.54.12" "transformer-lens==3.9.0" "einops==0.8.2" \
		"jaxtyping==0.3.11" "wadler-lindig==0.1.8" "better-abc==0.0.3"
	touch $(DEV)

install: $(DEV)

demo: $(BASE)
	$(BIN)/jaxlm pipeline --config configs/pipeline/demo.yaml --workdir runs/demo

# The report's browser test renders pages in Debian's chromium: installed here when missing (as
# root, or with passwordless sudo); where it cannot be, that test skips as "environment: ...".
CHROMIUM_INSTALL = $$([ "$$(id -u)" = 0 ] || echo sudo -n) env DEBIAN_FRONTEND=noninteractive
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(CHROMIUM_INSTALL) apt-get update -qq && \
		$(CHROMIUM_INSTALL) apt-get install -y -qq chromium; } || \
		echo "chromium could not be installed: the report's browser test will be skipped"

# CI's gate (.ci/run): lint, format, types, then the tests; any failure fails it. Native
# tracebacks: pytest's own formatting re-parses sources, which CPython 3.11.7 can crash on
# (gh-106905), taking the whole xdist run down with one failure. Work stealing: an idle worker takes
# tests queued on the busy one (the slow modules run first; tests/conftest.py).
test: lint types $(DEV) chromium
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 --dist worksteal -q --tb=native tests

lint: $(DEV)
	$(BIN)/ruff check jaxlm sae scripts tests tpu
	$(BIN)/ruff format --check jaxlm sae scripts tests tpu

types: $(DEV)
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff format jaxlm sae scripts tests tpu
	$(BIN)/ruff check --fix jaxlm sae scripts tests tpu

check: test

clean:
	rm -rf $(VENV) runs
