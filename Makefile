# Two commands matter: `make demo` and `make test`. Both bootstrap their own virtualenv.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf
# Molecule runs ansible-playbook and friends from PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export NO_COLOR := 1
SCENARIOS ?= default check bad_inventory upgrade token remove cron switch resilience status

.PHONY: venv lint unit images molecule test clean
.PHONY: demo demo-status demo-outage demo-restore demo-down demo-check

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/vermin --no-tips --violations --target=3.6- agent/heartbeat_agent.py \
		receiver/stacksense_receiver.py
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint

unit: venv
	$(BIN)/pytest -q tests

images:
	scripts/build-images.sh

molecule: venv images
	set -e; for scenario in $(SCENARIOS); do \
		echo "=== molecule test -s $$scenario"; \
		$(BIN)/molecule test -s $$scenario; \
	done

test: lint unit molecule demo-check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Local fleet demo (docs/DEMO.md). DEMO_HOSTS (3), DEMO_PORT (8480), DEMO_INTERVAL (5)
# and DEMO_OFFLINE_AFTER (30) reach scripts/demo.sh from the command line:
#   make demo DEMO_HOSTS=6
demo:
	scripts/demo.sh up

demo-status:
	scripts/demo.sh status

demo-outage:
	scripts/demo.sh outage "$(HOST)"

demo-restore:
	scripts/demo.sh restore "$(HOST)"

demo-down:
	scripts/demo.sh down

demo-check:
	scripts/demo.sh check
