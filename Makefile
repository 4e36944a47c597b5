# ftw — `make demo` runs a real job end to end; `make test` runs the whole suite.
# Both create .venv on a fresh machine first (torch==2.13.0 is the CPU wheel on local disk,
# installed before anything else so that nothing pulls a CUDA build).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The serving engine's own venv (vLLM's CPU build and its pins); the serve tests run vLLM from it.
VENV_VLLM ?= .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.installed
# axolotl's own data code (0.18.0 = its commit 067b021c for prompt strategies), the parity suite's reference.
VENV_AXOLOTL ?= .venv-axolotl
AXOLOTL_STAMP := $(VENV_AXOLOTL)/.installed

.PHONY: setup test demo demo-volume clean vllm-env axolotl-env parity lint lint-python lint-docker image-lock

# A side venv (serving engine, parity reference): the local CPU torch first, then a full lock with --no-deps.
define side_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q --no-deps -r $(2)
	touch $(1)/.installed
endef

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.lock  # deepspeed: an sdist built as pure Python, no ops compiled
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.lock
	$(call side_venv,$(VENV_VLLM),requirements-vllm.lock)

axolotl-env: $(AXOLOTL_STAMP)

$(AXOLOTL_STAMP): requirements-axolotl.lock
	$(call side_venv,$(VENV_AXOLOTL),requirements-axolotl.lock)

test: setup vllm-env axolotl-env
	$(PY) -m pytest -q -n 2  # two workers (CI has two cores), a file each at a time: tests/conftest.py schedules them

# ftw's preprocessing against axolotl's on the same rows: the tests, ending with the table of docs/parity.md
parity: setup axolotl-env
	FTW_PARITY_TABLE=1 $(PY) -m pytest -q -m parity tests/parity

demo: setup
	$(PY) -m worker.devtools.demo

# the inputs examples/demo_job.json names (tiny model, example data) in ./volume, for README's rehearsal;
# order-only on setup: an existing .venv is used as it is
demo-volume: | $(STAMP)
	$(PY) -m worker.devtools.demo --prepare

# what CI runs before the tests: Python lint, format and types, then the Dockerfiles
lint: lint-python lint-docker

# ruff (lint, then format --check) and mypy, as pyproject.toml configures them (requirements-dev.txt pins them)
lint-python: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# both images' Dockerfiles, by hadolint (requirements-dev.txt pins it)
lint-docker: setup
	$(VENV)/bin/hadolint Dockerfile Dockerfile.serve

# the images' whole Python closures, resolved for their platform (linux x86_64, Python 3.12) from PyPI
IMAGE_PLATFORM := --python-platform x86_64-manylinux_2_28 --python-version 3.12 --no-header -q
image-lock: setup
	$(VENV)/bin/uv pip compile requirements.txt requirements-image.txt $(IMAGE_PLATFORM) -o requirements-image.lock
	$(VENV)/bin/uv pip compile requirements-serve-image.txt $(IMAGE_PLATFORM) -o requirements-serve-image.lock

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VENV_AXOLOTL) volume .pytest_cache .hypothesis
