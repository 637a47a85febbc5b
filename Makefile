# fastperc developer entry points. `make test` works on a machine that has only python3 and pip.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.fastperc-installed

.PHONY: test bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest
	$(PY) -m pytest benchmarks --benchmark-disable -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
