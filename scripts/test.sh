#!/usr/bin/env bash
# The whole suite: unit and integration tests in parallel, end-to-end n8n flows included.
# Tests that drive n8n share the xdist group "n8n" (--dist loadgroup), so one n8n starts per run.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -n "${METIS_TEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  # pytest's "no tests collected" must never pass as green.
  echo "scripts/test.sh: pytest collected no tests (exit 5) — treating as a failure" >&2
  exit 1
fi
exit $rc
