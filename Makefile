# Two commands work on a fresh machine: `make demo` and `make test`.
# Both install from the lock file `requirements.lock` (the exact versions the suite passed with),
# so a fresh machine gets what was tested. `make test-latest` runs the suite against the newest
# versions that pyproject.toml allows, in a separate venv; `make lock` regenerates the lock file.
# Override TORCH_SPEC for another build, e.g. `make test TORCH_SPEC="torch==2.13.0+cu128"`
# (torch is installed from TORCH_SPEC and is therefore not in the lock file).
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
LOCK ?= requirements.lock
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,plot
PY := $(VENV)/bin/python
# The offline data beside the checkout (see ../shared/data/README.md); override to point elsewhere.
LIGHTNING_ROME_DATA ?= $(abspath ../shared/data)
export LIGHTNING_ROME_DATA
PIP := $(PY) -m pip

.PHONY: install demo test test-slow test-latest lock lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $@

$(VENV)/.pkg-installed: pyproject.toml $(LOCK) $(VENV)/.torch-installed
	$(PIP) install -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.pkg-installed

demo: install
	$(VENV)/bin/lightning-rome demo

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# The newest versions pyproject.toml allows, in their own venv (never the lock file);
# torch stays at TORCH_SPEC.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-spec.txt  # torch stays the build this machine uses
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager \
	    -c $(LATEST_VENV)/torch-spec.txt -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|lightning|torchmetrics|datasets|tokenizers|jsonargparse|torch)=='
	$(LATEST_VENV)/bin/python -m pytest

# Resolve the newest allowed versions afresh and write them to the lock file.
# Run `make test` (and `make test-latest`) before committing a new lock file.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -e ".[$(EXTRAS)]"
	{ echo "# Exact versions the test suite passed with; pip constraints format."; \
	  echo "# Regenerate with 'make lock'. torch comes from TORCH_SPEC (Makefile) and is not listed."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9_-]+|cuda-[a-z0-9_-]+|triton|lightning-rome)==' ; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

lint: install
	$(VENV)/bin/ruff check lightning_rome tests examples benchmarks

format: install
	$(VENV)/bin/ruff format lightning_rome tests examples benchmarks

bench: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) build *.egg-info
