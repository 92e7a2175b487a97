# The two entry points a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PREFIX ?= /usr/local

.PHONY: setup test test-fast test-e2e demo bench install uninstall clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,pycryptodome,plot]'
	touch $(STAMP)

# Everything: engine tests natively, ublk end-to-end tests inside a QEMU VM.
test: setup
	$(PY) -m pytest -q -ra tests

# Engine only (no VM).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not e2e and not slow" tests

test-e2e: setup
	$(PY) -m pytest -q -ra -m e2e tests

demo: setup
	$(PY) -m tools.demo

bench: setup
	$(PY) -m tools.bench

# sworndisk-ublk on PATH, root's too (sudo's secure_path has /usr/local/bin): a link to
# the command in .venv, which keeps working as long as the checkout does.
install: setup
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sfn $(abspath $(VENV))/bin/sworndisk-ublk $(DESTDIR)$(PREFIX)/bin/sworndisk-ublk

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/sworndisk-ublk

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
