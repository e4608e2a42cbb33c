# Everyday commands. `make test` is what CI runs (.ci/run), on a fresh Debian 12.
#   make test PYTEST_ARGS='-m "not integration" -x'
#   make dev DEV_ARGS='--instances 5'

SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=
DEV_ARGS ?=
# A hung test must not hang CI forever: the whole run gets this many seconds.
TEST_TIMEOUT_S ?= 1800

.PHONY: install dev test lint clean dist lock simulate

install:
	VENV=$(VENV) bash scripts/install.sh

dev: install
	$(VENV)/bin/linechatd dev $(DEV_ARGS)

# --foreground keeps Ctrl-C working interactively; -k follows the TERM with a KILL.
test: install
	timeout --foreground -k 30 $(TEST_TIMEOUT_S) $(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy linechatd tests/support benchmarks/scale

# A release: the wheel and the sdist (which carries requirements.lock, the
# production install script, the units, the example configs and the docs).
dist: install
	rm -rf dist
	$(VENV)/bin/python -m build --outdir dist .

# requirements.lock from the test virtualenv (see scripts/lock-requirements.sh).
lock: install
	VENV=$(VENV) bash scripts/lock-requirements.sh

clean:
	rm -rf $(VENV) build dist *.egg-info clients/js/node_modules clients/js/dist .pytest_cache .mypy_cache .ruff_cache .hypothesis test-artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# --- benchmarks (see docs/performance.md) ---------------------------------------------
# `make bench` takes 10-20 minutes on 2 cores and writes bench-results/;
# `make bench-smoke` runs every phase with tiny counts in about a minute.
#   make bench BENCH_ARGS='--systems linechatd --no-failover'
# scripts/install.sh installs the `bench` extra and Debian's redis-server (the peer).
BENCH_ARGS ?=
BENCH_OUT ?= bench-results
# Hard stop for a wedged run (every phase is bounded on its own as well).
BENCH_TIMEOUT_S ?= 3600

.PHONY: bench bench-smoke bench-transport bench-fanout bench-codec bench-abuse bench-faults bench-kafka bench-handshakes

bench: install
	timeout --foreground -k 30 $(BENCH_TIMEOUT_S) $(VENV)/bin/python -m benchmarks.run --out $(BENCH_OUT) $(BENCH_ARGS)

bench-smoke: install
	timeout --foreground -k 30 600 $(VENV)/bin/python -m benchmarks.run --smoke --out $(BENCH_OUT)-smoke $(BENCH_ARGS)

# The WebSocket transports alone (echo, CPU per message, RSS per idle connection).
bench-transport: install
	timeout --foreground -k 30 900 $(VENV)/bin/python -m benchmarks.transport --out $(BENCH_OUT)/transport.json

# --- the control plane at scale, in virtual time (see docs/capacity.md) ------------------
# `make simulate` runs 200 instances x 1,024 partitions through the scenarios of
# docs/capacity.md (about 6 minutes) and writes scale-results/;
#   make simulate SIM_ARGS='--instances 50 --partitions 256'    # every scenario, about 2 minutes
#   make simulate SIM_ARGS='--instances 1000 --partitions 4096 --scenarios cold-start,grow,drain,crash,zk-pause,reload,isolate,zombie'
#                                                               # hours (the cold start alone: 15 CPU-minutes)
SIM_ARGS ?= --instances 200 --partitions 1024 --rolling-limit 20 \
	--scenarios cold-start,grow,drain,crash,zk-pause,reload,isolate,zombie,rolling-restart
SIM_OUT ?= scale-results
SIM_TIMEOUT_S ?= 43200

simulate: install
	timeout --foreground -k 30 $(SIM_TIMEOUT_S) $(VENV)/bin/python -m benchmarks.scale --out $(SIM_OUT) $(SIM_ARGS)
# Group sends, server publishes and presence: records, CPU per recipient, latencies.
bench-fanout: install
	timeout --foreground -k 30 900 $(VENV)/bin/python -m benchmarks.fanout $(BENCH_ARGS)
# The WebSocket frame codecs and the JSON paths alone, in-process: CPU-µs per message.
bench-codec: install
	timeout --foreground -k 30 900 $(VENV)/bin/python -m benchmarks.codec --out $(BENCH_OUT)/codec.json
# One attacker per scenario against 50 honest pairs at 500 msg/s (docs/security.md):
# prints a table and writes $(BENCH_OUT)/abuse.json; about 5 minutes.
#   make bench-abuse BENCH_ARGS='--scenarios ping_flood,half_open --duration 5'
bench-abuse: install
	timeout --foreground -k 30 1800 $(VENV)/bin/python -m benchmarks.abuse --out $(BENCH_OUT) $(BENCH_ARGS)
# Broker and ZooKeeper faults under traffic, one cluster each (docs/operations.md):
# prints a table (stopped, resumed, unavailable, acked, lost); about 5 minutes.
#   make bench-faults BENCH_ARGS='--scenarios blackhole-5,leader-kill'
bench-faults: install
	timeout --foreground -k 30 1800 $(VENV)/bin/python -m benchmarks.faults --out $(BENCH_OUT) $(BENCH_ARGS)
# Broker and gateway CPU per message against linger_ms and fetch_wait_max_ms (a fresh broker each).
bench-kafka: install
	timeout --foreground -k 30 3000 $(VENV)/bin/python -m benchmarks.kafka_settings --out $(BENCH_OUT)/kafka-settings.json $(BENCH_ARGS)
# connection-url + upgrade per second, RSS per idle connection, and where each goes (py-spy, tracemalloc).
bench-handshakes: install
	timeout --foreground -k 30 900 $(VENV)/bin/python -m benchmarks.handshakes --profile --out $(BENCH_OUT)/handshakes.json $(BENCH_ARGS)
