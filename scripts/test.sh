#!/usr/bin/env bash
# The whole suite: unit and integration tests in parallel, end-to-end n8n flows included.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
