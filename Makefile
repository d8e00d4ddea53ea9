# The README's two commands: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench bench-signaling bench-fleet clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo 'python3 -m venv failed: on Debian, apt-get install python3-venv' >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,uvloop]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/p2pserver $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# TURN: one core side by side with coturn, expiry, control path, then 1 and 2 workers (as root,
# add the --cpu-per-worker runs of bench/README.md where the machine has too few cores).
bench: $(STAMP)
	$(BIN)/python bench/turn_core.py
	$(BIN)/python bench/turn_expiry.py
	$(BIN)/python bench/turn_control.py
	$(BIN)/python bench/turn_workers.py
	$(BIN)/python bench/turn_workers.py --mode peer

# Needs node and npm; installs PeerJS server into a temporary folder (bench/README.md).
bench-signaling: $(STAMP)
	$(BIN)/python bench/signaling.py $(ARGS)

# Needs node, npm and redis-server: same instance vs two instances through Redis (bench/README.md).
bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
