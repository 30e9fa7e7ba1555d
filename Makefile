# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Every dependency (runtime and dev extras) pinned for every supported Python; `make lock` rewrites it.
LOCK := requirements-lock.txt
# torch is pinned here (not in pyproject) to the CPU wheel; pyproject keeps torch>=2.4 for GPU users.
TORCH := torch==2.13.0
PIP_VERSION := pip==26.3
UV_VERSION := uv==0.13.9

.PHONY: venv lock test test-fast demo bench clean

venv: $(STAMP)

# The lock is used as a constraints file: pip installs exactly the locked versions with no
# backtracking, and locked packages that this platform does not need (CUDA wheels) stay out.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade $(PIP_VERSION)
	$(PIP) install --quiet -c $(LOCK) $(TORCH)
	$(PIP) install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Re-resolve pyproject.toml (with the dev extras and the torch pin) into the lock, for Python 3.10+.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(UV_VERSION)
	echo '$(TORCH)' | $(VENV)/bin/uv pip compile pyproject.toml --extra dev --constraint - \
		--universal --python-version 3.10 --custom-compile-command 'make lock' --quiet -o $(LOCK)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

demo: $(STAMP)
	$(VENV)/bin/clip-etl demo

bench: $(STAMP)
	$(PY) benchmarks/encoders.py

clean:
	rm -rf $(VENV) .venv-airflow demo_output
