#!/usr/bin/env bash
# Set up from nothing, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "${AUTOPROG_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
