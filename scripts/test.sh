#!/usr/bin/env bash
# Set up, lint, type-check, then run the whole test suite (unit, 2-rank gloo, smoke runs)
# on CPU; the 15 slowest tests are listed at the end.
# Two pytest workers (CAPSCALE_TEST_WORKERS; 0 runs in one process): every test holds
# torch to one thread, so one process leaves a core idle whenever no 2-rank check runs.
# Each test module goes to one worker as a whole (tests/conftest.py: its module
# fixtures are made once; modules sharing a session product go together).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check capscale tests bench
"$PY" -m mypy  # [tool.mypy] in pyproject.toml: capscale/, check_untyped_defs
WORKERS=${CAPSCALE_TEST_WORKERS:-2}
PARALLEL=()
if [[ "$WORKERS" != 0 ]]; then
  PARALLEL=(-n "$WORKERS" --dist loadgroup --no-loadscope-reorder)
fi
exec "$PY" -m pytest -q -ra --durations=15 ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
