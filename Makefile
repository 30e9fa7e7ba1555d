# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

# torch is pinned here (not in pyproject) to the CPU wheel; pyproject keeps torch>=2.4 for GPU users.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

demo: $(STAMP)
	$(VENV)/bin/clip-etl demo

bench: $(STAMP)
	$(PY) benchmarks/encoders.py

clean:
	rm -rf $(VENV) demo_output
