# Two commands work on a fresh machine: `make demo` and `make test`.
# Override TORCH_SPEC for another build, e.g. `make test TORCH_SPEC="torch==2.13.0+cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,plot
PY := $(VENV)/bin/python
# The offline data beside the checkout (see ../shared/data/README.md); override to point elsewhere.
LIGHTNING_ROME_DATA ?= $(abspath ../shared/data)
export LIGHTNING_ROME_DATA
PIP := $(PY) -m pip

.PHONY: install demo test test-slow lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $@

$(VENV)/.pkg-installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.pkg-installed

demo: install
	$(VENV)/bin/lightning-rome demo

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check lightning_rome tests examples benchmarks

format: install
	$(VENV)/bin/ruff format lightning_rome tests examples benchmarks

bench: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info
