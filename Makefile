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
# `make notebooks` reads books from a local mirror: MIRROR when given (command line or environment), else ../shared's.
NB_MIRROR := $(if $(filter command line environment,$(origin MIRROR)),$(MIRROR),../shared/gutenberg-mirror)
NB_OUT ?= build/notebooks

.PHONY: setup demo test notebooks bench clean help

help:
	@echo "make demo   # download books, prepare, train the tiny model, generate Portuguese text"
	@echo "make test   # run the test suite"
	@echo "make notebooks  # run notebooks/train.ipynb then explore.ipynb at the CI scale (executed copies in $(NB_OUT))"
	@echo "make setup  # create .venv with CPU torch (or CUDA torch where nvidia-smi exists)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# llama-cpp-python (tests/test_gguf.py) builds llama.cpp from source once (minutes on 2 cores; pip caches the
	# wheel). GGML_NATIVE=OFF: a portable build (AVX2/FMA on x86), so a cached wheel runs on any such CPU.
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash scripts/demo.sh "$(MIRROR)" "$(DEMO_BOOKS)" "$(DEMO_MINUTES)" "$(DATA)" "$(RUNS)"

test: setup
	$(PY) -m pytest

# train.ipynb at the CI scale of notebooks/ci.yaml (tiny preset, six books, CPU), then explore.ipynb on the run it
# trained, both in the notebooks folder with the .venv kernel; a failing cell fails the target.
notebooks: setup
	rm -rf $(NB_OUT)/work
	mkdir -p $(NB_OUT)
	cd notebooks && JUPYTER_PREFER_ENV_PATH=1 $(abspath $(PY)) -m papermill train.ipynb $(abspath $(NB_OUT))/train.ipynb \
		-f ci.yaml -p mirror "$(if $(findstring ://,$(NB_MIRROR)),$(NB_MIRROR),$(abspath $(NB_MIRROR)))" \
		-p workdir $(abspath $(NB_OUT))/work
	if [ -f notebooks/explore.ipynb ]; then \
		cd notebooks && JUPYTER_PREFER_ENV_PATH=1 $(abspath $(PY)) -m papermill explore.ipynb $(abspath $(NB_OUT))/explore.ipynb \
			-p run $(abspath $(NB_OUT))/work/runs/notebook -p max_tokens 5000; \
	else echo "notebooks/explore.ipynb not found: skipped"; fi
	@echo "executed notebooks in $(NB_OUT)"

clean:
	rm -rf $(DATA)/demo-raw $(DATA)/demo $(RUNS)/demo
