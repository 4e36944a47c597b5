# ftw — `make demo` runs a real job end to end; `make test` runs the whole suite.
# Both create .venv on a fresh machine first (torch==2.13.0 is the CPU wheel on local disk,
# installed before anything else so that nothing pulls a CUDA build).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m worker.demo

clean:
	rm -rf $(VENV) volume .pytest_cache .hypothesis
