# Two commands matter: `make demo` and `make test`. Both bootstrap their own virtualenv.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export CONTAINERS_CONF := $(CURDIR)/molecule/containers.conf
# Molecule runs ansible-playbook and friends from PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export NO_COLOR := 1
# What Ansible keeps (Molecule's install of stacksense.fleet and its scenario state, temporary
# files, ansible-galaxy's cache) stays in the clone, not in ~/.ansible: make test checks it.
export ANSIBLE_HOME := $(CURDIR)/.cache/ansible-home
# Longest first (README: what each costs), so that make molecule's lanes end together.
SCENARIOS ?= fleet remove cron upgrade default network status token resilience enroll
# Scenarios side by side (scripts/run_scenarios.py): each has its own containers and ports.
MOLECULE_JOBS ?= 1

.PHONY: venv prereqs lint gates unit images molecule collection-test ee-test changelog test clean
.PHONY: demo demo-status demo-outage demo-restore demo-down demo-check

# The clone is the collection stacksense.fleet: ansible.cfg (and every Molecule scenario)
# puts .collections first in the collections path, where the committed link
# .collections/ansible_collections/stacksense/fleet -> ../../.. names the repository, so that
# the role's stacksense.fleet.* plugins are the clone's own files.
venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# What make test needs on the machine (podman, runc, debootstrap, iptables, ssh-keygen, the
# Debian keyring, python3-venv): apt-get installs the missing ones, once. Root.
prereqs:
	scripts/demo.sh prereqs

lint: venv
	$(BIN)/ruff check .
	$(BIN)/vermin --no-tips --violations --target=3.6- agent/heartbeat_agent.py \
		receiver/stacksense_receiver.py plugins/modules/agent_files.py
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint
	$(BIN)/antsibull-changelog lint

# The Ansible ecosystem's own gates (scripts/gates.py): shellcheck on every shell script,
# ansible-test sanity and galaxy-importer on the built collection. Offline but for PyPI.
gates: venv
	$(BIN)/python scripts/gates.py shellcheck
	$(BIN)/python scripts/gates.py sanity
	$(BIN)/python scripts/gates.py importer

unit: venv
	$(BIN)/pytest -q tests

images:
	scripts/build-images.sh

molecule: venv images
	$(BIN)/python scripts/run_scenarios.py --jobs $(MOLECULE_JOBS) $(SCENARIOS)

# The artifact of `ansible-galaxy collection build`, installed, deploys a host from a
# playbook outside the repository (scripts/delivery_test.py; about 2 min).
collection-test: venv images
	$(BIN)/python scripts/delivery_test.py collection

# The test EE (execution-environment-test.yml) built with ansible-builder on a debootstrap
# Debian base, then playbooks/deploy.yml through ansible-runner (process isolation, worker
# mode) over SSH with sudo. Images are reused while their inputs are unchanged.
# EE_CA_BUNDLE: a CA bundle mounted into the EE build so that pip trusts this network's
# certificates; empty by default, set here only when this machine has a system bundle.
EE_CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
ee-test: venv images
	EE_CA_BUNDLE="$(EE_CA_BUNDLE)" $(BIN)/python scripts/delivery_test.py ee

# Release the fragments in changelogs/fragments as VERSION (galaxy.yml's version):
#   make changelog VERSION=1.2.0
changelog: venv
	@test -n "$(VERSION)" || { echo "make changelog: set VERSION, e.g. VERSION=1.2.0" >&2; exit 2; }
	$(BIN)/antsibull-changelog release --version "$(VERSION)"

# ~/.ansible before and after must hold the same (scripts/home_check.py).
test:
	python3 scripts/home_check.py snapshot build/home-before.txt
	$(MAKE) --no-print-directory prereqs lint gates unit molecule collection-test ee-test \
		demo-check
	python3 scripts/home_check.py compare build/home-before.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache/ansible-test-home .cache/ansible-home

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
