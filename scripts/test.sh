#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python and npm dependencies, lint, types, tests.
# Needs python3 (>= 3.11), node/npm, redis-server and chromium on PATH; with CI=1 nothing may
# be skipped (locally, tests whose tools are missing are skipped with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
for dir in tests/interop tests/browser tests/asyncapi benchmarks/node; do
  if [ -f "$dir/package.json" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done

.venv/bin/ruff check src tests examples benchmarks
.venv/bin/ruff format --check src tests examples benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"
