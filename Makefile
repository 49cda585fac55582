# d2moe: `make demo` runs the embedded model under a memory budget; `make test` runs the test suite.
# Both set themselves up (a local venv in .venv; torch CPU from the pinned local wheel when no torch is present).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2moe-installed

.PHONY: setup test test-all demo lint bench clean check-cuda gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider tests

test-all: setup
	$(PY) -m pytest -q tests

# every CUDA kernel to PTX for sm_80/sm_87/sm_90 through NVRTC (no GPU needed; also a test in `make test`)
check-cuda: setup
	$(PY) scripts/check_cuda.py

# on a machine with an NVIDIA GPU: every GPU test and benchmark, tables into gpu_results/
gpu-check: setup
	bash scripts/gpu_check.sh gpu_results

demo: setup
	$(PY) -m d2moe demo

lint: setup
	$(VENV)/bin/ruff check d2moe_cli quantize router_train runtime kernels tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
