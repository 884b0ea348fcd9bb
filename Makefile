# Two commands: `make demo` (the offline main job) and `make test`. Each sets up its own venv on first use.
# On a CPU-only box torch/torchvision are pinned by constraints/cpu.txt; on a GPU box install your CUDA torch
# into the venv first and run `make install CONSTRAINTS=` (no pins).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS ?= onnx,dev,kernels,serve,openvino
BIN := $(VENV)/bin
STAMP := $(VENV)/.zsad-installed
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install demo test test-fast test-portable lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_C) -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py --out demo_out

# TEST_WORKERS pytest-xdist processes (tests/conftest.py gives each its share of torch threads): on 2 cores the serial
# suite keeps ~1.3 of them busy (waits on servers, subprocesses, Python); two workers cut its time by ~36% (README).
# TEST_WORKERS=0 runs it in one process (pytest's own output, pdb). worksteal: one slow test does not idle a worker.
# (Not loadgroup: pytest-xdist 3.8 marks a group by rewriting item._nodeid, which pytest 9 no longer reads, so its
# groups are silently ignored.)
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# the developer's tier (under 3 minutes on 2 cores): no lint, no slow / server / gpu tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not server and not gpu"

# the fast tier on other kernels than this CPU's best (torch's scalar path, OpenBLAS for a pre-AVX core, MKL at
# SSE4.2, oneDNN at AVX): float sums are ordered as on another box, so a tolerance fitted to one box fails here.
# Not oneDNN at SSE41: OpenVINO's CPU plugin then fails to compile its MVN ("bad combination").
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Prescott MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=AVX \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not server and not gpu"

# ruff rules and mypy settings: [tool.ruff.lint] / [tool.mypy] in pyproject.toml. mypy runs through
# tools/typecheck.py, which names the stage folders' modules as installed (zsad.export, ...).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tools/typecheck.py

clean:
	rm -rf demo_out .pytest_cache

# GPU check (bench/gpu_check.py): `make gpu-check OUT=dir [DEVICE=cuda|cpu] [WHEELS=dir] [STEPS=a,b]`. Runs with the
# venv's Python where there is one (CI, a dev box), else the machine's python3 (a GPU box with its own torch).
OUT ?= gpu_check_out
DEVICE ?= cuda
WHEELS ?=
STEPS ?=
PY ?= 3.12
RUN_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: gpu-check wheelhouse
gpu-check:
	$(RUN_PYTHON) bench/gpu_check.py --out $(OUT) --device $(DEVICE) $(if $(WHEELS),--wheels $(WHEELS)) \
		$(if $(STEPS),--steps $(STEPS))

# needs PyPI: wheels for CPython $(PY) on x86-64 Linux, split in OUT/core, OUT/client, OUT/server (see gpu_check.py)
wheelhouse:
	$(RUN_PYTHON) bench/gpu_check.py --wheelhouse $(OUT) --python-version $(PY)

# Mutation testing (tools/mutants.py, list in tools/mutants.toml): one-line bugs applied to a temp COPY of the tree,
# each against the tests it names (slow ones too; --no-slow leaves them out); report in tools/mutants_out/mutants.{md,json}.
# Slow (over an hour for the whole list): not in CI.
.PHONY: mutants
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py --out tools/mutants_out
