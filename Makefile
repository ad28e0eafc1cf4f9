# One command runs Metis (make up), one passes its tests (make test).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: up down test venv n8n status lint clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

n8n:
	@bash scripts/install-n8n.sh >/dev/null

up: venv n8n
	$(VENV)/bin/python -m devstack up

down:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python -m devstack down; else echo "nothing to stop"; fi

status: venv
	$(VENV)/bin/metis status

test: venv n8n
	bash scripts/test.sh

lint: venv
	$(VENV)/bin/mypy --strict shared

clean: down
	rm -rf $(VENV) .run
