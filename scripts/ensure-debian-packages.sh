#!/usr/bin/env bash
# Installs the Debian packages the test suite needs when they are missing (idempotent, quiet when present).
#   promtool (package prometheus): `promtool test rules` for deploy/prometheus.
#   chromium: Playwright drives Debian's Chromium in the end-to-end tests (n8n forms, approval links).
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [[ ${#need[@]} -eq 0 ]]; then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
echo "ensure-debian-packages: installing ${need[*]}" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
