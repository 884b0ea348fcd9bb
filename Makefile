# Two commands: `make demo` (the offline main job) and `make test`. Each sets up its own venv on first use.
# On a CPU-only box torch/torchvision are pinned by constraints/cpu.txt; on a GPU box install your CUDA torch
# into the venv first and run `make install CONSTRAINTS=` (no pins).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS ?= onnx,dev,kernels,serve
BIN := $(VENV)/bin
STAMP := $(VENV)/.zsad-installed
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_C) -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py --out demo_out

test: $(STAMP)
	$(BIN)/ruff check --select F,E9 .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check --select F,E9 .

clean:
	rm -rf demo_out .pytest_cache
