# The only entry point: CI, hooks and people all call these targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test test-compat test-compat-venvs test-fast test-cluster chaos lint format unasync bench bench-micro bench-peers demo clean

help:
	@echo "make demo        run a producer and a worker fleet end to end against Redis"
	@echo "make test        the whole suite: unit, Lua (fakeredis + real Redis), integration, cluster, chaos;"
	@echo "                 then again with older redis-py versions (make test-compat: only those)"
	@echo "make test-fast   unit and Lua-on-fakeredis tests (seconds)"
	@echo "make lint        ruff, mypy --strict, unasync check"
	@echo "make bench       benchmarks against the Redis ceiling measured in the same run"
	@echo "make bench-micro pytest-benchmark of each script call and of the sans-I/O core"
	@echo "make bench-peers qsync beside SAQ and arq, measured in the same run (own venv, from PyPI)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Other redis-py versions get a venv each (.venv-redis-<version>), with qsync from this checkout.
# The oldest qsync supports (pyproject's lower bound) runs the whole suite, so the bound stays
# true; the last before 8 (whose pools and cluster nodes differ from both) runs the tests that
# drive redis-py: unit, cluster and integration.
REDIS_PY_OLDEST := $(shell sed -n 's/^ *"redis>=\([0-9.]*\)",/\1/p' pyproject.toml)
REDIS_PY_7 := 7.4.1
OLDEST := .venv-redis-$(REDIS_PY_OLDEST)
SEVEN := .venv-redis-$(REDIS_PY_7)
DRIVER_TESTS := tests/unit tests/cluster tests/integration --ignore=tests/integration/test_packaging.py

.venv-redis-%/.installed: pyproject.toml
	@test -x .venv-redis-$*/bin/python || $(PYTHON) -m venv .venv-redis-$*
	.venv-redis-$*/bin/python -m pip install -q --upgrade pip
	.venv-redis-$*/bin/python -m pip install -q -e '.[test]' 'redis[hiredis]==$*'
	@touch $@

test: $(STAMP) test-compat-venvs
	$(BIN)/python -m pytest -q
	@$(MAKE) --no-print-directory test-compat

test-compat-venvs: $(OLDEST)/.installed $(SEVEN)/.installed

# The two older versions' runs go side by side (most of a run waits on Redis and on worker
# processes, so together they take little longer than the longer one); the second one's output
# is kept and printed after the first's.
test-compat: test-compat-venvs
	@echo "== the suite again with redis-py $(REDIS_PY_OLDEST), the oldest supported; beside it,"
	@echo "== the tests that drive redis-py with redis-py $(REDIS_PY_7), the last before 8 (printed after)"
	@log=$$(mktemp); \
	$(SEVEN)/bin/python -m pytest -q -p no:cacheprovider $(DRIVER_TESTS) > $$log 2>&1 & seven=$$!; \
	$(OLDEST)/bin/python -m pytest -q; oldest=$$?; \
	wait $$seven; seven=$$?; \
	echo "== redis-py $(REDIS_PY_7): $(DRIVER_TESTS)"; cat $$log; rm -f $$log; \
	test $$oldest -eq 0 && test $$seven -eq 0

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

# The peers need a redis-py older than qsync's venv has (arq: < 6), so they get their own venv,
# with qsync installed from this checkout beside them.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): pyproject.toml benchmarks/peers/requirements.txt
	@test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt -e .
	@touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS)/bin/python benchmarks/peers/compare.py

demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) .venv-redis-* $(PEERS) build dist .pytest_cache .mypy_cache .ruff_cache
