# Quick start: `make run` (main job on the embedded default) and `make test`.
# Each target creates and uses the local virtual environment .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# Test processes of `make test` / `make test-slow` (pytest-xdist; 1: no workers).  Each
# module runs whole in one worker (--dist loadfile), so module fixtures are built once.
TEST_WORKERS ?= 2
TEST_PARALLEL := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: run test test-slow device-check venv clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m resnorm_jax.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_PARALLEL) $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(TEST_PARALLEL) $(ARGS)

# Numerics, speed ratios and a report for this host's backend (benchmarks/device_check.py);
# e.g. ARGS='--out /tmp/check'.  On the GPU machine, without the venv: see README "Speed".
device-check: $(STAMP)
	$(PY) benchmarks/device_check.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
