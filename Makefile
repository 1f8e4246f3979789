# mmserve — developer commands. `make demo` and `make test` work on a fresh machine (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The oldest transformers release we support; `make test-compat` runs the suite against it.
COMPAT_TRANSFORMERS := 5.17.0
COMPAT_VENV := .venv-compat
# `make demo FAMILY=llava_next` (or any family in the README table): the demo on a tiny checkpoint of that family.
FAMILY ?= llava
MINUTES ?= 10
DEMO_MODEL := .cache/models/demo-$(FAMILY)-tiny
BENCH_MODEL := .cache/models/bench
PROTOS := protos/encoder.proto protos/generator.proto

.PHONY: help install proto proto-check lint typecheck check test test-compat test-faults test-compiled fuzz soak gpu-check demo demo-model bench bench-encoder bench-engine bench-serve up down clean

help:
	@echo "make demo        build the demo checkpoint, start both services, send an image twice, stop"
	@echo "                 (FAMILY=<a family of the README table> picks the model family; default llava)"
	@echo "make test        run the test suite (installs dependencies first)"
	@echo "make test-compat the test suite against transformers $(COMPAT_TRANSFORMERS) (oldest supported)"
	@echo "make test-faults the fault suite alone (Redis, encoder, engine, client and SIGTERM faults; also in make test)"
	@echo "make test-compiled the engine and family exactness suites with the language model compiled"
	@echo "make fuzz        long property-based fuzzing of image intake and request validation (FUZZ_EXAMPLES=N)"
	@echo "make soak        $(MINUTES)-minute soak of both services + Redis (MINUTES=N); exits 1 on a leak or an error"
	@echo "make gpu-check   on a CUDA machine: correctness vs HF and a timing table on a 7B-shaped checkpoint"
	@echo "                 (GPU_PY=<a python with CUDA torch>; results in gpu-check.json)"
	@echo "make install     create $(VENV) with the pinned dependencies"
	@echo "make proto       regenerate the gRPC stubs in protos/"
	@echo "make check       proto freshness, ruff and mypy (what CI runs before the tests)"
	@echo "make bench       run the benchmarks (figures go to BENCHMARKS.md by hand)"
	@echo "make up / down   start / stop the docker-compose stack"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

install: $(VENV)/.installed

proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

# Regenerates the stubs into a scratch directory and fails if the committed ones differ.
proto-check: install
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/protos && cp $(PROTOS) $$tmp/protos/ && \
	  (cd $$tmp && $(CURDIR)/$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)) && \
	  for f in encoder_pb2.py encoder_pb2.pyi encoder_pb2_grpc.py generator_pb2.py generator_pb2.pyi generator_pb2_grpc.py; do \
	    cmp -s $$tmp/protos/$$f protos/$$f || { echo "protos/$$f is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	  done; rm -rf $$tmp; echo "proto stubs are up to date"

lint: install
	$(PY) -m ruff check .

typecheck: install
	$(PY) -m mypy

check: proto-check lint typecheck

test: install
	$(PY) -m pytest -q

$(COMPAT_VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check transformers==$(COMPAT_TRANSFORMERS)
	@touch $@

test-faults: install
	$(PY) -m pytest -q -m faults

# The exactness suites with the language model compiled (`make test` builds engines eagerly, except
# tests/engine/test_compiled_exactness.py, which is always compiled).
test-compiled: install
	MMSERVE_TEST_COMPILED=1 $(PY) -m pytest -q tests/engine/test_engine_exactness.py tests/engine/test_llm.py tests/families

# Property-based fuzzing, long: random examples (a short, fixed-seed run is part of `make test`), then atheris on
# image intake for FUZZ_SECONDS (installed on demand: it is not needed by the test suite).
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS ?= 120
fuzz: install
	MMSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz -m fuzz -q --hypothesis-show-statistics
	$(PY) -m pip install --quiet --disable-pip-version-check atheris==3.0.0
	@corpus=$$(mktemp -d) && $(PY) tests/fuzz/atheris_intake.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	  -max_len=65536 -rss_limit_mb=4096 $$corpus; status=$$?; rm -rf $$corpus; exit $$status

# No `install` prerequisite: a GPU host may have no index to install from, and .venv holds the CPU build of torch;
# GPU_PY points at a Python with CUDA torch and this repository's requirements.
GPU_PY ?= $(PY)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out gpu-check.json

soak: install $(DEMO_MODEL)/config.json
	$(PY) -m benchmarks.soak --model $(DEMO_MODEL) --minutes $(MINUTES)

# The fault suite and the fuzzers do not depend on the transformers release: `make test` runs them once.
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -m "not faults and not fuzz"

$(DEMO_MODEL)/config.json: common/demo_model.py $(wildcard common/demo_checkpoints/*.py) common/assets/corpus.txt | install
	$(PY) -m common.demo_model $(DEMO_MODEL) --family $(FAMILY) --size tiny --seed 0

demo-model: install $(DEMO_MODEL)/config.json

demo: install $(DEMO_MODEL)/config.json
	$(PY) -m examples.demo --model $(DEMO_MODEL) --image examples/cat.jpg

$(BENCH_MODEL)/config.json: common/demo_model.py $(wildcard common/demo_checkpoints/*.py) common/assets/corpus.txt | install
	$(PY) -m common.demo_model $(BENCH_MODEL) --size bench --seed 0

bench: bench-encoder bench-engine

bench-encoder: install $(BENCH_MODEL)/config.json
	$(PY) -m benchmarks.encoder_bench --model $(BENCH_MODEL)

bench-engine: install $(BENCH_MODEL)/config.json
	$(PY) -m benchmarks.engine_bench --model $(BENCH_MODEL)

bench-serve: install $(BENCH_MODEL)/config.json
	$(PY) -m benchmarks.serve_bench --model $(BENCH_MODEL)

up:
	docker compose up -d --build

down:
	docker compose down

clean:
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache
