# Two commands matter: `make demo` and `make test`. Both bootstrap their own virtualenv.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf

.PHONY: venv lint unit molecule test clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/vermin --no-tips --violations --target=3.6- agent/heartbeat_agent.py

unit: venv
	$(BIN)/pytest -q tests

test: lint unit

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
