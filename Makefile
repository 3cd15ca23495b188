# The two quickstart commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast bench clean

$(BIN)/dpft: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/dpft

install: $(BIN)/dpft

demo: install
	$(BIN)/dpft demo --workdir ./dpft-demo

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not slow" tests

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) dpft-demo *.egg-info
