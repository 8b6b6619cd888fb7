# The two commands of the README: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SHARED ?= ../shared
NIH    ?= $(SHARED)/data/nih
DEMO   ?= build/demo
# the suite's processes (pytest-xdist; each test file runs whole in one of them, handed out in the order
# tests/conftest.py gives: end-to-end files first)
TEST_WORKERS ?= 2

.PHONY: install lint test test-fast demo bench clean web-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; quick when the venv is current.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# pip byte-compiles installed packages but not an editable install's own modules: where PYTHONDONTWRITEBYTECODE
# is set (CI here, many container images) every process — each rank, each tool, each test's child — compiled
# what it imported again (0.25 CPU s to import cxr.train, cxr.evaluate and cxr.tools.explain here). Quick when
# the .pyc files are current.
install: $(STAMP)
	$(BIN)/python -m compileall -q cxrbase shards cxr launch scripts bench tests

# ruff: lint, then the formatter's check (pre-commit runs the same two); mypy: the typed modules ([tool.mypy] files)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# DeepSpeed's CPU comm op, built once before the suite rather than by its first DeepSpeed test
# (scripts/build_deepspeed_ops.py says why); where the tests and the demo look for it
OPS_STAMP := .torch_extensions/.ops-stamp
$(OPS_STAMP): $(STAMP)
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions $(BIN)/python scripts/build_deepspeed_ops.py
	touch $(OPS_STAMP)

test: install lint $(OPS_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the unit tier: no shards, no training, no subprocess (tests/conftest.py assigns the tiers)
test-fast: install
	$(BIN)/python -m pytest -m unit

# The product tour (scripts/demo.sh) → $(DEMO)/index.html; sizes via DEMO_N, DEMO_EPOCHS, … in the
# environment. Its browser stage needs `make web-deps` once (else it is skipped, saying so).
demo: install
	CXR_NIH=$(NIH) DEMO=$(DEMO) BIN=$(BIN) bash scripts/demo.sh

# onnxruntime-web (npm, into build/npm) for `cxr.tools.export --web`, and Debian's chromium for tests/test_web.py
web-deps:
	bash scripts/web-deps.sh all

clean:
	rm -rf build .pytest_cache
