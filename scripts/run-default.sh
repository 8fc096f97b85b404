#!/usr/bin/env bash
# Set up from nothing, then run the built-in default comparison (original vs prog vs autoprog-one vs the
# budget-matched original on Fashion-MNIST). Extra arguments go to `autoprog compare`; with
# `--task finetune` it runs the fine-tuning default instead (every method on the shipped base DiT).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "${AUTOPROG_VENV:-$ROOT/.venv}/bin/autoprog" compare "$@"
