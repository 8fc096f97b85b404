#!/usr/bin/env bash
# Set up from nothing, then run the built-in default comparison (original vs prog vs autoprog-one, against the
# original's time-quality front, on Fashion-MNIST: 8 epochs on a 7x7 token grid, about 12 minutes on 2 cores).
# Extra arguments go to `autoprog compare` (`--preset cpu-plateau`: the 30-epoch plateau regime); with
# `--task finetune` it runs the fine-tuning default instead (every method on the shipped base DiT).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "${AUTOPROG_VENV:-$ROOT/.venv}/bin/autoprog" compare "$@"
