# The README's commands: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: demo demo-segmenter test lint typecheck pytest bench install clean packages lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the project's metadata or its lock changes. Every package at the version
# and hash requirements-dev.lock names (what CI tested), then the project itself.
$(STAMP): pyproject.toml requirements-dev.lock | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml into the two locks (runtime with the cluster extra for the image,
# runtime + cluster + dev for make install), with hashes, for Python 3.11 on x86_64 Linux; capped
# as this machine's pip is when it has a cap file. Review the diff and run `make test` before committing them.
LOCK_FLAGS := --generate-hashes --no-header --no-annotate --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(wildcard /etc/xdg/pip/constraints.txt),-c /etc/xdg/pip/constraints.txt)
lock: | $(BIN)/python
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra cluster $(LOCK_FLAGS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o requirements-dev.lock

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

# The slowest tests are listed at the end: what to trim when `make test` passes 30 minutes.
pytest: $(STAMP) packages
	$(BIN)/pytest -q --durations=25

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/phantom_bench.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .ruff_cache .pytest_cache
