# One command runs Metis (make up), one passes its tests (make test); make down stops what make up started.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: up down status test venv n8n debian-packages lint clean

# The venv is rebuilt whenever pyproject.toml changes (the stamp carries its hash).
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# n8n and its Node runtime live in a cache outside the clone ($$METIS_CACHE, default ~/.cache/metis), keyed by version.
n8n:
	@bash scripts/install-n8n.sh >/dev/null

up: venv n8n
	@$(VENV)/bin/python -m devstack up

down:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python -m devstack down; else echo "Nothing was running."; fi

status: venv
	@$(VENV)/bin/python -m devstack status

# Debian packages the suite drives (Chromium for n8n forms, promtool), installed once before pytest
# starts, so two xdist workers never race for apt's lock.
debian-packages:
	@bash scripts/ensure-debian-packages.sh

test: venv n8n debian-packages
	bash scripts/test.sh

lint: venv
	$(VENV)/bin/mypy --strict shared

clean: down
	rm -rf $(VENV) .run
