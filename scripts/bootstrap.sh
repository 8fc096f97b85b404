#!/usr/bin/env bash
# Make a ready environment from nothing: a virtual environment with autoprog installed (editable, with
# test extras) and, when missing and possible, the Fashion-MNIST Debian package. Safe to re-run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${AUTOPROG_VENV:-$ROOT/.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[autoprog] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.autoprog-installed"
want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[autoprog] installing autoprog and its dependencies (torch from local disk where available)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$want" > "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[autoprog] installing the dataset-fashion-mnist Debian package"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "[autoprog] warning: could not install dataset-fashion-mnist; pass --data-root DIR to autoprog" >&2
  else
    echo "[autoprog] warning: Fashion-MNIST is not at $FMNIST; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-root DIR" >&2
  fi
fi
