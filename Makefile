# Two commands do all the set-up: `make demo` and `make test` (each creates .venv if it is missing).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DERMLAB := $(VENV)/bin/dermlab
STAMP := $(VENV)/.dermlab-installed
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DERMLAB) synth --out $(DEMO_DIR)/data --images 2000 --size 128 --seed 0 --overwrite
	rm -rf $(DEMO_DIR)/run
	$(DERMLAB) train $(DEMO_DIR)/data --config configs/demo.yaml --out $(DEMO_DIR)/run

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
