# trailcam-reid: `make run` brings the whole system up on this machine, `make test` runs the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: help install run down test lint bench fuzz soak services monitoring clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools

run: $(STAMP) ## Start services, migrate, load demo data, start Ray, fine-tune the demo model (first run) and deploy; returns when ready
	@bash cluster/local/up.sh

down: ## Stop what `make run` started (and nothing else)
	@bash cluster/local/down.sh

services: $(STAMP) ## Make sure Postgres and Redis answer (start them, or embedded ones)
	@$(PY) cluster/local/services.py ensure

lint: $(STAMP) ## ruff (lint + format check) and mypy --strict on serve_app/, batch/ and benchmarks/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy serve_app batch benchmarks

test: $(STAMP) ## Services up, chromium for the browser tests, lint, then the whole pytest suite (slow cases included)
	@test -x /usr/lib/chromium/chromium || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	@$(PY) cluster/local/services.py ensure --system
	@bash cluster/monitoring/install.sh || echo "promtool unavailable: its checks will be skipped"
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest

bench: $(STAMP) ## Side-by-side benchmarks; prints one table, JSON under benchmarks/results/
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@$(PY) cluster/local/services.py ensure
	$(PY) -m benchmarks.run

fuzz: $(STAMP) ## schemathesis against the live app, 500 examples per operation (25 in make test)
	@$(PY) cluster/local/services.py ensure
	TRAILCAM_FUZZ_EXAMPLES=$${TRAILCAM_FUZZ_EXAMPLES:-500} $(VENV)/bin/pytest tests/hardening/test_fuzz.py -q

soak: $(STAMP) ## 10 minutes of mixed load on 127.0.0.1 (not in CI; SOAK_S, SOAK_ARGS); report in benchmarks/results/soak.md
	@$(PY) cluster/local/services.py ensure
	$(PY) -m benchmarks.soak --duration-s $${SOAK_S:-600} $(SOAK_ARGS)

monitoring: $(STAMP) ## Prometheus (+ Grafana when installed) against the local head; stopped by `make down`
	@bash cluster/monitoring/start.sh

clean: down ## Stop everything and remove .data/
	rm -rf .data
