#!/bin/bash
# The same four short runs on an older commit and on the working tree; the trained weights, per-point losses
# and evaluations (FD, top-1) must be identical (a refactor of the engine changes no number).
#   bash benchmarks/engine_equivalence.sh a2b6190      # the commit before the one training engine
#   bash benchmarks/engine_equivalence.sh b27b20f HEAD # two commits (the working tree stays free to edit)
# Needs the project's .venv; about 6 minutes on 2 CPU cores. Writes runs/engine-equivalence/{old,new}.
set -euo pipefail
ref=${1:?usage: engine_equivalence.sh COMMIT [NEW_COMMIT]}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/runs/engine-equivalence
tree=$(mktemp -d)/old
git -C "$root" worktree add -f -q "$tree" "$ref"
new_src=$root/src
if [ -n "${2:-}" ]; then
  new_tree=$(dirname "$tree")/new
  git -C "$root" worktree add -f -q "$new_tree" "$2"
  new_src=$new_tree/src
fi
trap 'git -C "$root" worktree remove --force "$tree"; [ -z "${new_tree:-}" ] || git -C "$root" worktree remove --force "$new_tree"' EXIT
source "$root/.venv/bin/activate"
run() { python -c "import sys; from autoprog.cli import main; sys.exit(main())" "$@"; }
for ver in old new; do
  if [ $ver = old ]; then export PYTHONPATH=$tree/src; else export PYTHONPATH=$new_src; fi
  o=$out/$ver; rm -rf "$o"; mkdir -p "$o"
  run pretrain --method prog --epochs 2 --subset 2000 --out "$o/prog" --cpu > "$o/prog.log" 2>&1
  run pretrain --method autoprog-one --epochs 2 --subset 2000 --time-source flops --out "$o/ap1" --cpu > "$o/ap1.log" 2>&1
  for m in autoprog-zero autoprog-one; do
    run finetune --method $m --steps 40 --eval-points 2 --curve-samples 50 --fd-samples 50 --time-source flops \
      --out "$o/ft-$m" --cpu > "$o/ft-$m.log" 2>&1
  done
done
python - "$out" <<'PY'
import json, sys
import torch
from safetensors.torch import load_file
out = sys.argv[1]
ok = True
for run, f in [("prog", "checkpoint/model.safetensors"), ("ap1", "checkpoint/model.safetensors"),
               ("ft-autoprog-zero", "model/model.safetensors"), ("ft-autoprog-one", "model/model.safetensors")]:
    a, b = (load_file(f"{out}/{v}/{run}/{f}") for v in ("old", "new"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(f"{out}/{v}/{run}/results.json")) for v in ("old", "new"))
    key = "epochs" if "epochs" in ra else "curve"
    la, lb = ([p.get("train_loss") for p in r[key]] for r in (ra, rb))
    sched = ra["summary"]["schedule"] == rb["summary"]["schedule"]
    qa, qb = ([p.get("fd", p.get("top1")) for p in r[key]] for r in (ra, rb))  # evaluations: FD or top-1
    ok &= same and la == lb and sched and qa == qb
    print(f"{run}: weights identical {same}, losses {la} vs {lb}, schedule identical {sched}, "
          f"evaluations {qa} vs {qb}")
sys.exit(0 if ok else 1)
PY
