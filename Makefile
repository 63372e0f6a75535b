# One-command set-up for a fresh machine. torch is installed first, pinned to the CPU wheel, only
# when the venv has none: a bare `torch` requirement would pull a multi-GB CUDA build.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
# accelerate launch gives CPU-only runs one thread per process unless told otherwise.
THREADS ?= $(shell nproc)

.PHONY: venv test test-all pretrain benchmarks clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

pretrain: venv
	$(BIN)/accelerate launch --num_cpu_threads_per_process $(THREADS) scripts/pretrain.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
