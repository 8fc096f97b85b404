#!/usr/bin/env bash
# Set up from nothing, then run the whole test suite. Extra arguments go to pytest.
# The tests run in one pytest-xdist worker per core, at most 4 (each test's torch uses one thread);
# AUTOPROG_TEST_WORKERS=0 runs them in this process.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
cores=$(nproc 2>/dev/null || echo 1)
workers=${AUTOPROG_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers"); fi
exec "${AUTOPROG_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "${parallel[@]}" "$@"
