# Targets work on a fresh clone: `make test` and `make run` create .venv on first use.
# torch is pinned by constraints.txt so pip never swaps the installed build (CPU wheel here,
# CUDA wheel on GPU machines) for another one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
ARGS ?=

.PHONY: install test lint run dry-run bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

test: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# The embedded task (tiny model + data under data/) is made on first use.
run: install
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m distflow_mc.main experiment=cpu_tiny_grpo $(ARGS)

dry-run: install
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m distflow_mc.main algo=ppo trainer.dry_run=true $(ARGS)

bench: install
	$(BIN)/python scripts/bench_planner.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache .hypothesis
