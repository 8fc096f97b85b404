#!/bin/bash
# A fine-tuning evaluation under several processes: the final point's eval_time_s and FD, on a commit (or the
# working tree), one run. Each process has one thread, so N processes have N cores' worth of sampling.
#   bash benchmarks/eval_split.sh 2              # the working tree, two gloo processes
#   bash benchmarks/eval_split.sh 2 9b78d20      # a commit (before: the main process sampled alone)
#   bash benchmarks/eval_split.sh 1              # one process
# Needs the project's .venv; about 2 minutes on 2 CPU cores. Writes runs/eval-split/<commit>-n<N>.
set -euo pipefail
n=${1:?usage: eval_split.sh NPROC [COMMIT]}
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/src name=tree
if [ -n "${2:-}" ]; then
  tree=$(mktemp -d)/src-tree
  git -C "$root" worktree add -f -q "$tree" "$2"
  trap 'git -C "$root" worktree remove --force "$tree"' EXIT
  src=$tree/src name=$2
fi
out=$root/runs/eval-split/$name-n$n
rm -rf "$out"; mkdir -p "$(dirname "$out")"
export PYTHONPATH=$src OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
args=(finetune --method full --steps 4 --batch-size 8 --eval-points 1 --fd-samples 1000 --curve-samples 1000
      --sample-steps 20 --cpu --out "$out")
if [ "$n" = 1 ]; then
  "$root/.venv/bin/python" -m autoprog.cli "${args[@]}" > "$out.log" 2>&1
else
  "$root/.venv/bin/python" -m torch.distributed.run --standalone --nproc_per_node="$n" -m autoprog.cli "${args[@]}" \
    > "$out.log" 2>&1
fi
"$root/.venv/bin/python" -c "import json, sys; p = json.load(open(sys.argv[1]))['curve'][-1]; \
print(f\"$name, {sys.argv[2]} process(es): eval_time_s {p['eval_time_s']}, fd {p['fd']} ({p['fd_samples']} images)\")" \
  "$out/results.json" "$n"
