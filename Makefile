# One entry point for developers and CI.
#   make run     set everything up (system packages, venv, dev PKI, SoftHSM2 token, demo keys) and serve
#   make test    lint, type-check and run every test (what CI runs)
VENV := .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .kms

.PHONY: setup run test lint typecheck pytest proto lock bench clean

setup:
	bash .ci/bootstrap

run: setup
	$(VENV)/bin/kms init --state-dir $(STATE_DIR) --demo
	$(VENV)/bin/kms serve --config $(STATE_DIR)/kms.toml

test: setup lint typecheck pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q

proto:
	PATH=$(VENV)/bin:$$PATH bash proto/generate.sh

lock:
	rm -rf .lockvenv && python3 -m venv .lockvenv
	.lockvenv/bin/pip install -q ".[dev]"
	(echo "# Pinned dependencies (runtime + dev) for CI and 'make setup'. Regenerate with 'make lock'."; \
	 .lockvenv/bin/pip freeze --exclude firmware-kms) > requirements.lock
	rm -rf .lockvenv

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
