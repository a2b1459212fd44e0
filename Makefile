# The two commands the README promises: `make demo` and `make test`. Both build their own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { echo "python3 -m venv failed: run 'sudo apt-get install python3-venv'"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,controlplane]'
	@touch $@

lint: venv
	$(BIN)/ruff check bootstrap doctor hostsim controlplane tests benchmarks
	$(BIN)/ruff format --check bootstrap doctor hostsim controlplane tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q

test: lint typecheck unit

bench: venv
	$(BIN)/pytest -q --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,max,rounds benchmarks

demo: venv
	$(BIN)/python -m hostsim.demo

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
