# ossnet: bootstrap .venv and run the main entry points.
#   make quickstart   set up and run the main job on the embedded default
#   make test         set up and run the whole test suite
#   make bench        run every benchmark in --quick mode
#   make lock         regenerate the hash-pinned lock files from pyproject.toml and requirements/pins.txt
#
# Every target installs the environment from requirements/lock-dev.txt (versions and hashes,
# pip --require-hashes), then the project itself without dependencies.
#   TORCH=cuda (default)  torch from PyPI: on Linux x86_64 the CUDA 13.0 build (~4 GB with its
#                         CUDA libraries; a GPU needs an NVIDIA driver >= 580)
#   TORCH=cpu             the CPU build of the same torch release from PyTorch's CPU index, no
#                         CUDA download: make quickstart TORCH=cpu
#                         (TORCH_VERSION=X takes another release, e.g. a CPU wheel that pip
#                         already finds on local disk; the build is checked to be CPU-only)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= cuda
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PY     := $(VENV)/bin/python
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements/pins.txt)
ifeq ($(TORCH),cuda)
LOCK := requirements/lock-dev.txt
else ifeq ($(TORCH),cpu)
LOCK := requirements/lock-dev-cpu.txt
else
$(error TORCH must be cuda or cpu, not '$(TORCH)')
endif
STAMP  := $(VENV)/.installed-$(TORCH)-$(TORCH_VERSION)-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

.PHONY: quickstart test test-unit test-ray test-e2e bench lint lock clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
ifeq ($(TORCH),cpu)
	$(PY) -m pip install --quiet --no-deps --index-url $(TORCH_CPU_INDEX) 'torch==$(TORCH_VERSION)'
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda and f'TORCH=cpu: torch {torch.__version__} is a CUDA build')"
endif
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

lock: $(STAMP)
	$(PY) requirements/lock.py

quickstart: $(STAMP)
	$(PY) -m ossnet_cli quickstart

# Lint first (seconds), then one pytest process per tier: the ray tier's in-process Ray instance
# must be gone before the e2e tier starts a multi-node cluster on the same host (tests/conftest.py
# refuses a mixed run).
test: lint
	$(PY) -m pytest tests/unit -q
	$(PY) -m pytest tests/ray -q
	$(PY) -m pytest tests/e2e -q

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-ray: $(STAMP)
	$(PY) -m pytest tests/ray -q

test-e2e: $(STAMP)
	$(PY) -m pytest tests/e2e -q

bench: $(STAMP)
	$(PY) -m ossnet.phantoms --report
	$(PY) -m ossnet_bench.paper --quick
	$(PY) -m ossnet_bench.mise --quick
	$(PY) -m ossnet_bench.memory --quick
	$(PY) -m ossnet_bench.ingest --quick
	$(PY) -m ossnet_bench.data --quick
	$(PY) -m ossnet_bench.train --quick
	$(PY) -m ossnet_bench.infer --quick
	$(PY) -m ossnet_bench.multiclass --quick
	$(PY) -m ossnet_bench.cli --quick

lint: $(STAMP)
	$(PY) -m ruff check ossnet ossnet_cli pipelines tune bench tests requirements
	$(PY) -m mypy

clean:
	rm -rf .ossnet build *.egg-info
