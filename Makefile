# The README's two commands are `make run` and `make test`; both create or reuse .venv.
# constraints.txt keeps torch on the local CPU build (2.13.0+cpu) on machines of this kind;
# PIP_CONSTRAINT applies it to every pip call, build isolation included.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seqmoe-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed's compiled ops live with this venv: two venvs sharing ~/.cache/torch_extensions
# rebuild the op on every run (~80 s against ~7 s), each for its own torch
# (the code sets the same folder and pins pip's ninja for the build: parallel/op_build.py)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# DeepSpeed: select the CPU accelerator explicitly where there is no GPU (silences auto-detection)
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: install run test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,mpich]"
	touch $@

# The main job: see README "Quickstart".
# resume=auto: a second `make run` continues runs/tiny-cpu (or says it is done) instead of
# refusing to write a fresh run over the first one's history (a run folder belongs to one run)
run: install
	$(BIN)/seqmoe launch configs/tiny-cpu.toml --train.resume=auto

# The whole suite, multi-process cases included (CI runs this through .ci/run); the 25 slowest
# cases are listed at the end, so a CI log shows where the suite's time goes.
test: install
	$(BIN)/python -m pytest -q --durations=25

# The fast loop: skips cases marked slow.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
