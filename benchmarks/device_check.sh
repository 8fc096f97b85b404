#!/usr/bin/env bash
# The prepared GPU check for a session that is lent a device machine: one command, about 8 minutes on
# an H100. It measures what a CPU cannot show and runs both commands on CUDA:
#   1. per-step speed of Prog's stages for timm DeiT-S at 224 px, bf16 (pre-training, benchmarks/step_speed.py);
#   2. the real trainer: `autoprog compare --methods original,prog` for DeiT-S at 224 px with the defaults
#      (bf16, loader workers) on a generated ImageFolder of 224-px JPEGs: prog's realised fraction of its
#      FLOPs speed-up and images/s (summary in deit_trainer.md);
#   3. the ImageFolder loader's images/s with the defaults against the old loader (benchmarks/loader_speed.py);
#   4. per-step speed and peak memory of the unfreezing stages for DiT-XL/2 on 32x32x4 latents (256-px
#      images), bf16, the uniform linear schedule: as the paper trains it, and with --layout tail
#      --frozen-prefix no-grad;
#   5. `autoprog finetune --method autoprog-zero` (60 steps) on the GPU.
# At most 8 files: gpu.txt, device_check.log (every step's output) and one JSON or table per measurement.
#
# Here, first (downloads the diffusers wheel, which the device image lacks, and copies Fashion-MNIST):
#     bash benchmarks/device_check.sh prepare
# then through the device tool, carrying what prepare made:
#     run(command="bash benchmarks/device_check.sh run", carry=[".whl", ".data"], timeout_s=600)
# Every figure, log and JSON lands in $OUT (the device tool brings it back); quote them with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
  set -e
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('diffusers'))")
  rm -rf .whl && mkdir -p .whl .data
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==$version"
  cp -r "${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}" .data/
  du -sh .whl .data
  ;;
run)
  OUT=${OUT:-runs/device}
  mkdir -p "$OUT"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then  # only what is missing
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  autoprog() { python3 -m autoprog.cli "$@"; }
  fails=0
  step() {  # name, command...: run it, log it, count a failure but go on with the next check
    local name=$1; shift
    echo "=== $name"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/device_check.log" | grep -v -E "it/s\]|s/it\]" | tail -25
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || fails=$((fails + 1))
  }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  step deit_s_step_speed python3 benchmarks/step_speed.py --model timm:deit_small_patch16_224 --batch-size 256 \
    --amp bf16 --steps 20 --out "$OUT/deit_s_step_speed.json"
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from loader_speed import make_folder; make_folder(Path('/tmp/jpegs'), 4096, 224, classes=10)"
  step deit_trainer autoprog compare --methods original,prog --model timm:deit_small_patch16_224 --img-size 224 \
    --patch-size 16 --dataset /tmp/jpegs --epochs 3 --batch-size 128 --front 1 --no-budget-baseline \
    --out /tmp/device-deit
  cp /tmp/device-deit/summary.md "$OUT/deit_trainer.md" 2>/dev/null
  step loader_speed python3 benchmarks/loader_speed.py --device cuda --images 2048 --batch-size 128 --model none \
    --out "$OUT/loader_speed.json"
  step dit_xl_step_speed python3 benchmarks/finetune_step_speed.py --preset DiT-XL/2 --batch-size 32 --amp bf16 \
    --steps 20 --out "$OUT/dit_xl_step_speed.json"
  step dit_xl_tail_no_grad python3 benchmarks/finetune_step_speed.py --preset DiT-XL/2 --batch-size 32 --amp bf16 \
    --steps 20 --layout tail --frozen-prefix no-grad --out "$OUT/dit_xl_tail_no_grad.json"
  step finetune_autoprog_zero autoprog finetune --method autoprog-zero --steps 60 --eval-points 1 --fd-samples 500 \
    --data-root .data/fashion-mnist --out /tmp/device-finetune
  echo "device check: $fails check(s) failed"
  exit "$fails"
  ;;
*)
  echo "usage: bash benchmarks/device_check.sh prepare|run" >&2
  exit 2
  ;;
esac
