# The README's commands: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: demo demo-segmenter test lint typecheck pytest bench install clean packages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# First run builds and caches the demo MVI model (about 80 s on 2 cores; the segmenter ships in
# model/weights); later runs ~30 s.
demo: $(STAMP)
	$(BIN)/mvi-node demo

# Rebuilds the demo segmenter shipped in model/weights (about 21 minutes on 2 cores): needed when
# tests/node/analysis/test_models.py says the shipped one no longer matches the code. Commit it.
demo-segmenter: $(STAMP)
	$(BIN)/mvi-node train-seg --phantoms 48 --force --out model/weights/demo_segmenter

lint: $(STAMP)
	$(BIN)/ruff check node model dicom_sr tests bench
	$(BIN)/ruff format --check node model dicom_sr tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The Debian packages the tests talk to (DCMTK, dicom3tools, Orthanc…): installed when missing and
# run as root; otherwise the script names what is missing and the tests that need it say so.
packages:
	@.ci/packages

pytest: $(STAMP) packages
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/phantom_bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .ruff_cache .pytest_cache
