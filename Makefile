# The two quickstart commands: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
# --dist loadscope: a module's tests run in one worker, so its module-scoped fixtures (a trained
# workdir, a benchmark run) are computed once, not once per worker. --no-loadscope-reorder: modules
# start in collection order, which tests/conftest.py sorts longest first (xdist's default order,
# most tests first, left a 3-minute multi-host module running alone at the end).
PYTEST_DIST ?= --dist loadscope --no-loadscope-reorder
# A worker that dies (a segfault, an abort) fails its test and ends the run at once, naming the test in
# the summary: pytest-xdist 3.8's loadscope scheduler re-queues a dead worker's finished modules for
# its replacement, which then waits forever (pytest-dev/pytest-xdist#1378; one CI run of ours hung
# so until its 90-minute limit).
PYTEST_CRASH ?= --max-worker-restart=0

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
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_DIST) $(PYTEST_CRASH) --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_DIST) $(PYTEST_CRASH) -m "not slow" tests

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) dpft-demo *.egg-info
