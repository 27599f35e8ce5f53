# `make demo` and `make test` do all the set-up on a fresh Debian 12 machine.
# Debian's own python3 (PGO and LTO, linked statically) runs the daemon's hot paths faster than a default
# pyenv build (docs/gdb.md); taken where it can make a venv. PYTHON=... picks another.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

tools:
	@sh scripts/ensure-tools.sh

test: tools $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: tools $(STAMP)
	$(PY) -m probed.front.demo

bench: tools $(STAMP)
	$(PY) bench/hits.py
	$(PY) bench/retprobe.py
	$(PY) bench/fetch.py
	$(PY) bench/gdb_proxy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache
