#!/usr/bin/env bash
# Set up, lint, type-check, then run the whole test suite (unit, 2-rank gloo, smoke runs)
# on CPU; the 15 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check capscale tests bench
"$PY" -m mypy  # [tool.mypy] in pyproject.toml: capscale/, check_untyped_defs
exec "$PY" -m pytest -q -ra --durations=15 "$@"
