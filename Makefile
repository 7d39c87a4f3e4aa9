# The two commands of the quick start:
#   make run    set up .venv, then plan, validate and plot the built-in demo (configs/demo.toml)
#   make test   set up .venv, then lint (ruff, mypy) and run the whole test suite
# Both need only a Python >= 3.11 on PATH; everything else is installed into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out
PYTEST_ARGS ?=
LINT_PATHS := src tests $(wildcard benchmarks notebooks)
FORMAT_PATHS := src tests $(wildcard benchmarks)

.PHONY: run test lint format bench notebooks clean setup mutation

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sharding-roofline run configs/demo.toml --out-dir $(OUT) --force

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(FORMAT_PATHS)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(FORMAT_PATHS)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/planner_speed.py
	$(BIN)/python benchmarks/validation_speed.py
	$(BIN)/python benchmarks/xla_agreement.py --random 500
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/layer_speed.py
	$(BIN)/python benchmarks/model_search_speed.py
	$(BIN)/python benchmarks/model_search_recall.py
	$(BIN)/python benchmarks/cli_speed.py
	$(BIN)/python benchmarks/validate_512.py
	$(BIN)/python benchmarks/layer_agreement.py --random 300
	$(BIN)/python benchmarks/model_agreement.py

# Mutation testing of the cost core (collectives.py, mesh.py) with a fast test selection
# ([tool.mutmut] in pyproject.toml); about 10 minutes on 2 cores, so not part of `make test`.
# Surviving mutants and why: docs/mutation.md.
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet 'mutmut>=3.2,<4'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

notebooks: $(STAMP)
	$(BIN)/python -m sharding_roofline._notebooks notebooks/*.ipynb

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache mutants
