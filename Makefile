# ossnet: bootstrap .venv and run the main entry points.
#   make quickstart   set up and run the main job on the embedded default
#   make test         set up (with the dev extra) and run the whole test suite
#   make bench        run every benchmark in --quick mode
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: quickstart test test-unit test-ray test-e2e bench lint clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

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
	$(PY) -m ruff check ossnet ossnet_cli pipelines tune bench tests
	$(PY) -m mypy

clean:
	rm -rf .ossnet build *.egg-info
