# Makefile: set up the host and the virtualenv, run the daemon, run the tests. Every target is idempotent.
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed
NATIVE := monitor/_tally.so
ARGS ?=

.PHONY: setup host run test unit kernel check bench-state clean

setup: host $(STAMP) $(NATIVE)

# The C counter of socket-table dumps (ctypes; no Python headers needed). Without it the
# daemon still runs, counting in Python at more CPU per poll, and says so. No fused
# multiply-add: endpoint ranks must round exactly as Python's do.
$(NATIVE): monitor/_tally.c
	gcc -O2 -Wall -Wextra -ffp-contract=off -shared -fPIC -o $@ $<

host:
	@bash deploy/setup-host.sh

# bcc comes from the OS (python3-bpfcc), hence --system-site-packages.
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/tcpstate run $(ARGS)

check: setup
	$(VENV)/bin/tcpstate check

test: setup
	$(VENV)/bin/python -m pytest -ra tests

unit: $(STAMP) $(NATIVE)
	$(VENV)/bin/python -m pytest -ra tests/unit

kernel: setup
	$(VENV)/bin/python -m pytest -ra tests/kernel

# CPU time of a socket-table poll at 1k, 10k and 130k TIME_WAIT sockets (root; namespaces).
bench-state: setup
	$(VENV)/bin/python tests/load/statepoll_bench.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(NATIVE)
