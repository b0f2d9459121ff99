# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without CUDA install the CPU wheel first, so that resolving the
# package's `torch>=2.10` never pulls a multi-GB CUDA build. Override with
# `make setup TORCH_SPEC=...` to pick another build.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH_SPEC ?= torch>=2.10
else
TORCH_SPEC ?= torch==2.13.0
endif

MIRROR ?= https://www.gutenberg.org
DEMO_BOOKS ?= 24
DEMO_MINUTES ?= 5
DATA ?= data
RUNS ?= runs

.PHONY: setup demo test bench clean help

help:
	@echo "make demo   # download books, prepare, train the tiny model, generate Portuguese text"
	@echo "make test   # run the test suite"
	@echo "make setup  # create .venv with CPU torch (or CUDA torch where nvidia-smi exists)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash scripts/demo.sh "$(MIRROR)" "$(DEMO_BOOKS)" "$(DEMO_MINUTES)" "$(DATA)" "$(RUNS)"

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(DATA)/demo-raw $(DATA)/demo $(RUNS)/demo
