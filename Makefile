# fayt-portals: make demo | make test | make clean
# (make test TESTS=tests/test_cli.py runs a part of the suite.)
# make sdist: dist/fayt_portals-VERSION.tar.gz; make sdist-check: that sdist
# unpacked, installed and tested in a venv of its own (.ci/sdist says how).
#
# Everything runs from a virtual environment in .venv, made with $(PYTHON)
# and set up once (again when setup.py or the C sources change).  On Debian,
# `python3 -m venv` needs python3-venv and the C extensions need python3-dev
# (Python.h) and gcc: `make deps` installs the first two with apt-get when run
# as root, or says what to install.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.fayt-installed
TESTS  ?= tests
SOURCES := setup.py pyproject.toml libportal/_build.py libportal/_versions.py \
           $(wildcard libportal/src/*.c) $(wildcard libportal/src/*.h) \
           $(wildcard libportal/include/fayt/*.h) $(wildcard libportal/include/fayt/common/*.h) \
           faytd/_build.py $(wildcard faytd/core/*.c) $(wildcard faytd/core/*.h)

.PHONY: all demo test docs deps venv sdist sdist-check clean

all: test

demo: $(STAMP)
	$(PY) -m servers.demo

test: $(STAMP)
	$(PY) tools/apidoc.py --check
	$(PY) -m pytest -v $(TESTS)
	@if [ -f bench/__main__.py ]; then \
		echo "$(PY) -m bench --quick"; $(PY) -m bench --quick; \
	else \
		echo "make: bench/__main__.py does not exist yet: benchmark smoke run skipped"; \
	fi

venv: $(STAMP)

# docs/api.md from the public API's docstrings and annotations; fails on a
# warning: a public name without a docstring or a readable signature, a
# broken reference (tools/apidoc.py).  `make test` runs it with --check (it
# also fails when docs/api.md is stale), so CI builds the reference.
docs: $(STAMP)
	$(PY) tools/apidoc.py

$(STAMP): $(SOURCES)
	@$(MAKE) --no-print-directory deps
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
		echo "$(PYTHON) -m venv $(VENV)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(PIP) install "setuptools>=77" "cffi>=1.15"
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $@

# The sdist through setuptools' PEP 517 hook (what `python -m build --sdist`
# calls), with the venv's setuptools: no package beyond the venv's is needed.
# Its log is dist/sdist.log, whose last line is the tarball's name.
sdist: $(STAMP)
	@mkdir -p dist
	@echo "make: building the sdist (log: dist/sdist.log)"
	@$(PY) -c 'import sys; from setuptools import build_meta; \
	    print(build_meta.build_sdist(sys.argv[1]))' dist >dist/sdist.log 2>&1 \
	    || { cat dist/sdist.log; exit 1; }
	@echo "make: dist/$$(tail -1 dist/sdist.log)"

# That sdist unpacked, installed and tested in a venv of its own: .ci/sdist.
sdist-check: sdist
	PYTHON=$(PYTHON) TESTS="$(TESTS)" bash .ci/sdist "dist/$$(tail -1 dist/sdist.log)"

# What a fresh Debian (python3 and gcc only) lacks: python3-venv, python3-dev.
deps:
	@if $(PYTHON) -c 'import ensurepip, os, sysconfig, sys; \
	    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	    2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: $(PYTHON) lacks venv/ensurepip or Python.h: installing python3-venv python3-dev"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv python3-dev; \
	else \
		echo "make: $(PYTHON) needs the venv module and its C headers (Python.h)." >&2; \
		echo "make: on Debian: apt-get install python3-venv python3-dev" >&2; exit 1; \
	fi
	@$(PYTHON) -c 'import ensurepip, os, sysconfig, sys; \
	    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	    || { echo "make: $(PYTHON) still lacks venv/ensurepip or Python.h" >&2; exit 1; }
	@command -v gcc >/dev/null 2>&1 || command -v cc >/dev/null 2>&1 || \
		{ echo "make: a C compiler (gcc) is needed to build libportal's C code" >&2; exit 1; }

clean:
	rm -rf $(VENV) .venv-* build dist *.egg-info .pytest_cache libportal/_fayt_cffi.c \
		libportal/*.so faytd/_core.c faytd/*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
