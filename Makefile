# torchdrr quick start. `make demo` and `make test` each do the whole setup on a fresh machine:
# a virtual environment in .venv, PyTorch, the other dependencies, and the compiled extension.
#
#   make demo   renders the bundled chest CT to drr.png
#   make test   runs the test suite
#
# Variables: PYTHON (interpreter that makes the venv, default python3), VENV (default .venv),
# TORCH (pip requirement for PyTorch, default torch==2.13.0; any torch>=2.4 works, e.g. TORCH="torch==2.11.0").
# The extension is built with --no-build-isolation so that it is compiled against the torch in the venv.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchdrr-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install lint bench peers clean

demo: $(STAMP)
	$(PY) -m torchdrr render --noise radiography --out drr.png

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf build torchdrr/_C*.so *.egg-info

# The peers (DiffDRR, nanodrr) in their own venv, for `make bench` (benchmarks/peers/README.md).
peers:
	bash benchmarks/peers/setup_peers.sh
