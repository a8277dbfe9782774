# The two commands a newcomer needs: `make up` (the system on this machine) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install services up test test-unit chaos check fmt bench clean screenshots

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

services:
	bash .ci/services.sh

up: install services
	$(BIN)/iot up --simulate 20 --faults

test: install services
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

# The fault suite with its long cases; prints a table of each fault and its recovery.
chaos: install services
	$(BIN)/pytest tests/faults --chaos -v

# The dashboard's screenshots in docs/screenshots, from its browser tests' run.
screenshots: install services
	IOT_SCREENSHOTS=docs/screenshots $(BIN)/pytest -q tests/e2e/test_dashboard.py

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install services
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
