# make demo: train the tiny model on the embedded corpus (CPU, two to three minutes). make test: the test suite.
# Both share one idempotent set-up: .venv is created and installed once, and again only when pyproject.toml changes.

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test

setup: $(STAMP)

$(BIN)/python:
	python3 -m venv $(VENV)

# torch pinned first: 2.13.0 is the CPU wheel cached locally (any other version downloads gigabytes).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gsa train --preset tiny --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/pytest
