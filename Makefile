# Makefile: set up the host and the virtualenv, run the daemon, run the tests. Every target is idempotent.
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=
# When this make started: setup reports its total time.
MAKE_START := $(shell date +%s)

.PHONY: setup setup-test host host-test host-vm run test lint unit kernel check bench bench-state clean install uninstall \
	image test-kernels test-kernels-signals test-fresh screenshot bench-tables

# sudo make ...: what root made in the clone (.venv, tcpstate.egg-info, the C counter, caches) goes back to
# the clone's owner, the user who ran sudo, so that their own git clean or rebuild works. A clone
# that root owns is left as it is.
GIVE_BACK = if [ "$$(id -u)" = 0 ] && [ "$$(stat -c %u .)" != 0 ]; then chown -R --from=0 "$$(stat -c %u:%g .)" .; fi

# What make run and make check need: the daemon's OS packages and Python dependencies.
setup: host $(STAMP)
	@$(GIVE_BACK)
	@echo "setup: done in $$(($$(date +%s) - $(MAKE_START))) s"

# What the tests need as well: their OS tools and the test extras.
setup-test: host-test $(TEST_STAMP)
	@$(GIVE_BACK)
	@echo "setup: done in $$(($$(date +%s) - $(MAKE_START))) s"


host:
	@bash deploy/setup-host.sh

host-test:
	@bash deploy/setup-host.sh --test

# QEMU and the rest for the machines that test-kernels and test-fresh boot.
host-vm:
	@bash deploy/setup-host.sh --test --vm

# bcc comes from the OS (python3-bpfcc), hence --system-site-packages. The install compiles the
# socket-table counter (setup.py): a change to its C source reinstalls. The bytecode is compiled
# here, by whoever owns the clone in the end, so that the daemon run as root writes none into it.
$(STAMP): pyproject.toml setup.py monitor/sockets/_tally.c
	@test -x $(VENV)/bin/python || { echo "setup: creating $(VENV) (--system-site-packages: bcc comes from the OS)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); }
	@echo "setup: pip install -e . (tcpstate and its Python dependencies)"
	$(VENV)/bin/pip install --disable-pip-version-check -e .
	@$(VENV)/bin/python -m compileall -q monitor
	@touch $@

$(TEST_STAMP): $(STAMP)
	@echo "setup: pip install -e '.[test]' (the test extras)"
	$(VENV)/bin/pip install --disable-pip-version-check -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/tcpstate run $(ARGS)

check: setup
	$(VENV)/bin/tcpstate check

# TESTS: what pytest runs (make test-fresh's guest runs a part of it).
TESTS ?= tests
test: setup-test lint
	@$(VENV)/bin/python -m pytest -ra $(TESTS); status=$$?; $(GIVE_BACK); exit $$status

# ruff, configured in pyproject.toml: the Python of monitor/, tests/, deploy/ and setup.py.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check monitor tests deploy setup.py

unit: $(TEST_STAMP)
	@$(VENV)/bin/python -m pytest -ra tests/unit; status=$$?; $(GIVE_BACK); exit $$status

kernel: setup-test
	@$(VENV)/bin/python -m pytest -ra tests/kernel; status=$$?; $(GIVE_BACK); exit $$status

# The kernel tests (all but the host_only ones) inside Debian's 5.10, 6.1 and 6.12 kernels, booted
# under QEMU (root; kernels cached in ~/.cache/tcpstate/kernels; KERNELS="6.1 5.10" for some;
# KERNELS_ARGS="-- -k counts -x" passes pytest arguments; README, "Tests").
KERNELS ?=
KERNELS_ARGS ?=
test-kernels: host-vm setup-test
	$(VENV)/bin/python tests/vm/kernels.py $(foreach k,$(KERNELS),--kernel $(k)) $(KERNELS_ARGS)

# A quicker check while working on bpf/: on every kernel of the matrix, the tests of what each
# kernel's tracepoints and BTF give (transitions, resets, failures, port reuse, retransmissions
# against tshark, the struct offsets). CI runs the whole make test-kernels (.ci/run).
SIGNAL_TESTS = tests/kernel/test_counts.py tests/kernel/test_reuse.py tests/kernel/test_wireshark.py \
	tests/kernel/test_btf.py
test-kernels-signals: host-vm setup-test
	$(VENV)/bin/python tests/vm/kernels.py $(foreach k,$(KERNELS),--kernel $(k)) $(KERNELS_ARGS) -- $(SIGNAL_TESTS)

# A fresh Debian 12 booted under QEMU with systemd as PID 1 runs a new user's steps: sudo make run,
# sudo make test, sudo make install and the unit under the real systemd (root; the image is cached in
# ~/.cache/tcpstate/fresh; FRESH_ARGS="--timeout 3600" etc., --help lists them; README, "Tests").
FRESH_ARGS ?=
test-fresh: host-vm
	$(PYTHON) tests/fresh/run.py $(FRESH_ARGS)

# Short-connection churn with no monitor, tcpstate run and bcc's tcpstates: BENCHMARKS.md and
# BENCHMARKS.png (root; namespaces; about 10 minutes; BENCH_ARGS="--rounds 2" etc., --help lists them).
BENCH_ARGS ?=
bench: setup-test
	$(VENV)/bin/python tests/load/bench.py $(BENCH_ARGS)

# What each in-kernel table costs per program run: tests/load/overhead.sh with one table off (or
# resized) at a time, the variants alternating (root; namespaces; about 2.5 minutes with
# TABLES_ARGS="--seconds 4 --rounds 2", about 4-5 with the defaults).
TABLES_ARGS ?=
bench-tables: setup-test
	$(VENV)/bin/python tests/load/table_costs.py $(TABLES_ARGS)

# CPU time of a socket-table poll at 1k, 10k and 130k TIME_WAIT sockets (root; namespaces).
bench-state: setup-test
	$(VENV)/bin/python tests/load/statepoll_bench.py

# docs/tcpstate-page.png, README's picture of the page: taken by the page's browser test under its
# traffic (root; namespaces; about 30 s).
screenshot: setup-test
	@mkdir -p docs
	TCPSTATE_SCREENSHOT=$(CURDIR)/docs/tcpstate-page.png $(VENV)/bin/python -m pytest -q tests/kernel/test_page.py

# The PrometheusRule carries deploy/prometheus/alerts.yml; tests/unit/test_kubernetes.py fails when they differ.
deploy/kubernetes/prometheusrule.yaml: deploy/prometheus/alerts.yml deploy/kubernetes/gen-prometheusrule.py
	$(VENV)/bin/python deploy/kubernetes/gen-prometheusrule.py

# The container image (needs a Docker engine; deploy/README.md, "Container").
image:
	docker build -f deploy/container/Dockerfile -t tcpstate:$$($(PYTHON) -c 'import re; print(re.search(r"^version = \"(.+)\"", open("pyproject.toml").read(), re.M).group(1))') .

# sudo make install: the daemon in its own virtualenv under PREFIX, the systemd unit, a defaults
# file (kept when it exists), the tcpstate system user; enabled, and started when systemd runs.
# The variables exist so that a test can install into a scratch tree; hosts keep the defaults.
PREFIX := /opt/tcpstate
BINDIR := /usr/local/bin
UNITDIR := /etc/systemd/system
SYSCONFDIR := /etc
ACCOUNT := tcpstate
SYSTEMCTL := systemctl
SYSTEMD_RUNNING := $(shell test -d /run/systemd/system && echo yes)
UNIT_SUBST := sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@ACCOUNT@|$(ACCOUNT)|g'

# Only what the daemon needs goes on the host: not the test tools of `make setup`.
install:
	@test "$$(id -u)" -eq 0 || { echo "install: must run as root (sudo make install)" >&2; exit 1; }
	@bash deploy/setup-host.sh
	@test -x $(PREFIX)/bin/python || $(PYTHON) -m venv --system-site-packages $(PREFIX)
	@echo "install: pip install . into $(PREFIX)"
	$(PREFIX)/bin/pip install --disable-pip-version-check --upgrade .
	@$(GIVE_BACK)
	install -d $(PREFIX)/share/doc/tcpstate $(BINDIR) $(UNITDIR) $(SYSCONFDIR)/default
	install -m 0644 README.md $(PREFIX)/share/doc/tcpstate/README.md
	install -m 0644 deploy/README.md $(PREFIX)/share/doc/tcpstate/operators-guide.md
	ln -sfn $(PREFIX)/bin/tcpstate $(BINDIR)/tcpstate
	@id -u $(ACCOUNT) >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin --comment "tcpstate daemon" $(ACCOUNT)
	$(UNIT_SUBST) deploy/systemd/tcpstate.service > $(UNITDIR)/tcpstate.service
	@test -e $(SYSCONFDIR)/default/tcpstate || install -m 0644 deploy/systemd/tcpstate.default $(SYSCONFDIR)/default/tcpstate
ifeq ($(SYSTEMD_RUNNING),yes)
	$(SYSTEMCTL) daemon-reload
	$(SYSTEMCTL) enable tcpstate.service
	$(SYSTEMCTL) restart tcpstate.service
	@echo "install: tcpstate.service enabled and (re)started; journalctl -u tcpstate follows it"
else
	$(SYSTEMCTL) enable tcpstate.service
	@echo "install: systemd is not running here: tcpstate.service is enabled for the next boot, not started"
endif

# sudo make uninstall: stops and removes what install added. The defaults file goes only when
# it is unchanged; the tcpstate user stays, as packages leave system users.
uninstall:
	@test "$$(id -u)" -eq 0 || { echo "uninstall: must run as root (sudo make uninstall)" >&2; exit 1; }
ifeq ($(SYSTEMD_RUNNING),yes)
	-$(SYSTEMCTL) disable --now tcpstate.service
else
	-$(SYSTEMCTL) disable tcpstate.service
endif
	rm -f $(UNITDIR)/tcpstate.service
	@if [ "$$(readlink $(BINDIR)/tcpstate)" = "$(PREFIX)/bin/tcpstate" ]; then rm -f $(BINDIR)/tcpstate; fi
	@if [ -f $(PREFIX)/pyvenv.cfg ]; then rm -rf $(PREFIX); \
	elif [ -e $(PREFIX) ]; then echo "uninstall: left $(PREFIX) alone: it is not a tcpstate virtualenv" >&2; fi
	@if cmp -s deploy/systemd/tcpstate.default $(SYSCONFDIR)/default/tcpstate; then rm -f $(SYSCONFDIR)/default/tcpstate; \
	elif [ -e $(SYSCONFDIR)/default/tcpstate ]; then echo "uninstall: kept $(SYSCONFDIR)/default/tcpstate (changed)"; fi
ifeq ($(SYSTEMD_RUNNING),yes)
	$(SYSTEMCTL) daemon-reload
endif

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build monitor/sockets/_tally*.so
