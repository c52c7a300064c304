# The only entry point: CI, hooks and people all call these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test test-fast test-cluster chaos lint format unasync bench bench-micro demo clean

help:
	@echo "make demo        run a producer and a worker fleet end to end against Redis"
	@echo "make test        the whole suite: unit, Lua (fakeredis + real Redis), integration, cluster, chaos"
	@echo "make test-fast   unit and Lua-on-fakeredis tests (seconds)"
	@echo "make lint        ruff, mypy --strict, unasync check"
	@echo "make bench       benchmarks against the Redis ceiling measured in the same run"
	@echo "make bench-micro pytest-benchmark of each script call and of the sans-I/O core"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/lua -k "not redis]" -m "not cluster and not chaos"

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

chaos: $(STAMP)
	$(BIN)/python -m pytest -q -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict qsync
	$(BIN)/python .ci/unasync.py --check

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

unasync: $(STAMP)
	$(BIN)/python .ci/unasync.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-micro: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider benchmarks/test_micro.py --benchmark-columns=median,iqr,ops --benchmark-sort=name

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
