#!/usr/bin/env bash
# Set up (idempotent), build the embedded demo bundle once, and serve it on :8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/repair-proxy demo --host "${HOST:-127.0.0.1}" --port "${PORT:-8080}"
