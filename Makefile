# Two commands a new user needs: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: install serve test lint typecheck unit integration contract bench lock clean grpc-proto

install: $(STAMP)

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip sync --quiet --python $(PY) requirements.lock requirements-dev.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Starts coordinator, workers and frontends under supervisord with the demo model.
# Loopback unless told otherwise: make serve HOST=0.0.0.0 WORKERS=2
HOST ?= $(or $(MODEL_SERVER_HOST),127.0.0.1)
serve: install
	MODEL_SERVER_HOST=$(HOST) $(if $(WORKERS),MODEL_SERVER_WORKERS=$(WORKERS)) $(VENV)/bin/model-server serve --demo

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q --ignore=tests/integration

integration: install
	$(PY) -m pytest -q tests/integration

contract: install
	$(PY) -m pytest -q tests/integration/test_contract.py

# Every peer, the cells issue 12's targets need (about 20-25 minutes on 2 cores). One row again:
# make bench BENCH_ARGS="--peers ours,pytriton --only mlp:v2-binary"
bench: install
	$(PY) -m bench.run --write-md BENCHMARKS.md $(BENCH_ARGS)

# Re-resolve the pinned versions (needs the network).
lock:
	$(UV) pip compile --quiet --python-version 3.11 requirements.in -o requirements.lock
	$(UV) pip compile --quiet --python-version 3.11 requirements-dev.in -o requirements-dev.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Regenerates frontend/grpc/ (checked in) from the KServe V2 / Triton protocol in tritonclient.
GRPC_OUT := frontend/grpc
grpc-proto: install
	$(PY) tools/triton_protoset.py $(GRPC_OUT)/triton.protoset
	$(PY) -m grpc_tools.protoc --descriptor_set_in=$(GRPC_OUT)/triton.protoset --python_out=$(GRPC_OUT) \
		--pyi_out=$(GRPC_OUT) --grpc_python_out=$(GRPC_OUT) model_config.proto grpc_service.proto
	sed -i -E 's/^import (model_config_pb2|grpc_service_pb2) as/from . import \1 as/' $(GRPC_OUT)/*_pb2*.py $(GRPC_OUT)/*.pyi
