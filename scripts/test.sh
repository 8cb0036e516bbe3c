#!/usr/bin/env bash
# Runs the whole test suite. Expects ./scripts/setup.sh --system to have run (make test does it).
# PostgreSQL tests run against RANKGUARD_TEST_POSTGRES_URL (default: the local server on
# 127.0.0.1:5432, user postgres, database test); an unreachable PostgreSQL fails them.
set -euo pipefail
cd "$(dirname "$0")/.."

export RANKGUARD_TEST_POSTGRES_URL=${RANKGUARD_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
# Two cores: two xdist workers with one torch thread each beat one worker with two threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export PYTHONHASHSEED=0

.venv/bin/ruff check .
.venv/bin/ruff format --check .
./scripts/typecheck.sh

set +e
.venv/bin/pytest -n "${RANKGUARD_TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
# pytest exit 5 means no test was collected: that is a failure, never a pass.
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
