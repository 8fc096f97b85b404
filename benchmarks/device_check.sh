#!/usr/bin/env bash
# The prepared GPU check for a session that is lent a device machine: one command, about 8-10 minutes on an
# H100 (never run on one yet; DEADLINE below keeps it inside the device tool's 600 s). It measures what a CPU
# cannot show and runs both commands on CUDA, the most wanted first:
#   1. per-step speed of Prog's stages for timm DeiT-S at 224 px, bf16 (pre-training, benchmarks/step_speed.py);
#   2. the real trainer: `autoprog compare --methods original,prog` for DeiT-S at 224 px with the defaults
#      (bf16, loader workers) on a generated ImageFolder of 224-px JPEGs: prog's realised fraction of its
#      FLOPs speed-up and images/s (summary in deit_trainer.md);
#   2b. host-device synchronisations inside the steps of a real run, by torch's sync debug mode
#      (benchmarks/cuda_sync_count.py): Fashion-MNIST pre-training and DiT fine-tuning, prog, 100 steps each;
#   3. the ImageFolder loader's images/s with the defaults against the old loader, both cropping at 224 px
#      (benchmarks/loader_speed.py);
#   4. per-step speed and peak memory of the unfreezing stages for DiT-XL/2 on 32x32x4 latents (256-px
#      images), bf16, the uniform linear schedule: as the paper trains it, and with --layout tail
#      --frozen-prefix no-grad;
#   4b. one EMA update per unfreezing stage of DiT-XL/2: timm's (every weight) against autoprog's LazyEma (the
#      frozen weights' updates deferred), benchmarks/ema_update_speed.py;
#   5. `autoprog finetune --method autoprog-zero` (60 steps) on the GPU;
#   6. Fashion-MNIST pre-training by AutoProg-One with the paper's recipe (host RandAugment, Mixup/CutMix, erasing;
#      the supernet steps timed by CUDA events), stopped after an epoch and resumed.
#   7. (run only, last) Fashion-MNIST prog pre-training with --compile (inductor), through its growth.
# At most 8 files: gpu.txt, device_check.log (every step's output, the sync counts' JSON too) and one JSON or
# table per other measurement.
#
# Here, first (downloads the diffusers wheel, which the device image lacks, and copies Fashion-MNIST):
#     bash benchmarks/device_check.sh prepare
# then through the device tool, carrying what prepare made:
#     run(command="bash benchmarks/device_check.sh run", carry=[".whl", ".data"], timeout_s=600)
# Every figure, log and JSON lands in $OUT (the device tool brings it back); quote them with the card's name.
# `bash benchmarks/device_check.sh smoke` runs the same steps at toy sizes on this CPU (OUT=runs/device-smoke).
# CHECKS=deit_trainer,sync_pretrain (step names, as the log prints them) runs only those; STEP_LIMIT=240 caps each
# step's seconds (a stuck step is stopped and counted as failed, the next one runs); DEADLINE=570 skips the steps
# that would start with less than 30 s left of it, so the summary line comes back inside the tool's 600 s.
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
  # the FD feature classifier, trained on the CPU once (the same weights anywhere): the device need not train it
  mkdir -p .data/cache
  cp "${AUTOPROG_CACHE:-$HOME/.cache/autoprog}"/feature-net-* .data/cache/ 2>/dev/null \
    || echo "no cached feature classifier: the device machine trains it on its CPU (about a minute)"
  du -sh .whl .data
  ;;
run|smoke)
  # smoke: the same steps at toy sizes on this CPU (about 1-2 minutes), so that a lent GPU's minutes are not
  # spent on a flag that no longer parses; its figures mean nothing
  OUT=${OUT:-runs/device$([ "$1" = smoke ] && echo -smoke)}
  mkdir -p "$OUT"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  if [ "$1" = smoke ]; then
    py=.venv/bin/python cpu=--cpu img=64 batch=8 images=64 steps=2 epochs=2 dit=DiT-S/2 dit_batch=2 ft_steps=8 fd=16
    sync_steps=4
    data=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist} ft_extra="--curve-samples 16 --sample-steps 2 --feature-epochs 1"
    fm_extra="--subset 256 --batch-size 32"
  else
    py=python3 cpu= img=224 batch=256 images=4096 steps=20 epochs=3 dit=DiT-XL/2 dit_batch=32 ft_steps=60 fd=500
    sync_steps=100
    data=.data/fashion-mnist ft_extra= fm_extra=
  fi
  if ls .whl/*.whl >/dev/null 2>&1 && ! $py -c "import diffusers" 2>/dev/null; then  # only what is missing
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  if [ "$1" = run ]; then export AUTOPROG_CACHE=${AUTOPROG_CACHE:-$PWD/.data/cache}; fi
  names=",deit_s_step_speed,deit_trainer,sync_pretrain,sync_finetune,loader_speed,dit_xl_step_speed,\
dit_xl_tail_no_grad,ema_update_speed,finetune_autoprog_zero,fmnist_recipe,fmnist_recipe_resume,fmnist_compile,"
  checks=${CHECKS:-}  # (unset: every step)
  for name in ${checks//,/ }; do
    if [[ "$names" != *",$name,"* ]]; then echo "CHECKS: no step named $name (the steps: ${names//,/ })" >&2; exit 2; fi
  done
  fails=0 skipped=0 deadline=${DEADLINE:-570}  # the device tool stops a call at 600 s: end inside it, reporting
  step() {  # name, command...: run it (at most STEP_LIMIT s), log it, count a failure but go on with the next
    local name=$1; shift
    if [ -n "${CHECKS:-}" ] && [[ ",$CHECKS," != *",$name,"* ]]; then return; fi  # CHECKS=a,b: only those
    local left=$((deadline - SECONDS)) limit=${STEP_LIMIT:-240}
    if [ "$left" -lt 30 ]; then
      echo "=== $name: skipped, $left s left before DEADLINE ($deadline s)"; skipped=$((skipped + 1)); return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name"
    local t0=$SECONDS
    # SIGTERM first (autoprog stops cleanly), SIGKILL 20 s later (a process stuck in C++ or a collective)
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$OUT/device_check.log" | grep -v -E "it/s\]|s/it\]" | tail -25
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || fails=$((fails + 1))
  }
  if [ "$1" = run ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    # the libraries the checks ran with (the image's, not the versions pyproject.toml pins), the cores, and /dev/shm,
    # through which the loader workers' batches travel
    { $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
      $py -m pip list 2>/dev/null | grep -iE "^(torchvision|timm|accelerate|diffusers|transformers|peft|pillow|numpy) "
      nproc; df -h /dev/shm; } 2>&1 | tee -a "$OUT/gpu.txt"
  else
    echo "smoke: CPU" > "$OUT/gpu.txt"
  fi
  step deit_s_step_speed $py benchmarks/step_speed.py --model timm:deit_small_patch16_224 --img-size $img \
    --batch-size $batch --amp bf16 --steps $steps --out "$OUT/deit_s_step_speed.json"
  work=$(mktemp -d)  # the generated images and every run's folder (GBs): removed when the script ends
  trap 'rm -rf "$work"' EXIT
  jpegs=$work/jpegs
  $py -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from loader_speed import make_folder; make_folder(Path('$jpegs'), $images, $img, classes=10)"
  step deit_trainer $py -m autoprog.cli compare --methods original,prog --model timm:deit_small_patch16_224 --img-size $img \
    --patch-size 16 --dataset "$jpegs" --epochs $epochs --batch-size $((batch / 2)) --front 1 --no-budget-baseline \
    --out "$jpegs-compare" $cpu
  cp "$jpegs-compare/summary.md" "$OUT/deit_trainer.md" 2>/dev/null
  # the waits for the GPU inside the steps, by torch's sync debug mode: Fashion-MNIST on the device (prog, 100 steps)
  # and DiT fine-tuning (prog, with its SID; 100 steps); their JSON is in device_check.log
  step sync_pretrain $py benchmarks/cuda_sync_count.py -- pretrain --method prog \
    --epochs 1 --subset $((sync_steps * 128)) --batch-size 128 --data-root "$data" --out "$jpegs-sync-pre" $cpu
  step sync_finetune $py benchmarks/cuda_sync_count.py -- finetune --method prog \
    --steps $sync_steps --eval-points 1 --fd-samples 64 --curve-samples 16 --sample-steps 5 $ft_extra \
    --data-root "$data" --out "$jpegs-sync-ft" $cpu
  step loader_speed $py benchmarks/loader_speed.py --device "$([ "$1" = run ] && echo cuda || echo cpu)" \
    --images $((images / 2)) --batch-size $((batch / 2)) --model none --out "$OUT/loader_speed.json"
  step dit_xl_step_speed $py benchmarks/finetune_step_speed.py --preset $dit --batch-size $dit_batch --amp bf16 \
    --steps $steps --out "$OUT/dit_xl_step_speed.json"
  step dit_xl_tail_no_grad $py benchmarks/finetune_step_speed.py --preset $dit --batch-size $dit_batch --amp bf16 \
    --steps $steps --layout tail --frozen-prefix no-grad --out "$OUT/dit_xl_tail_no_grad.json"
  step ema_update_speed $py benchmarks/ema_update_speed.py --preset $dit --updates $((steps / 2)) \
    --out "$OUT/ema_update_speed.json"
  step finetune_autoprog_zero $py -m autoprog.cli finetune --method autoprog-zero --steps $ft_steps --eval-points 1 \
    --fd-samples $fd $ft_extra --data-root "$data" --out "$jpegs-finetune" $cpu
  # in-memory data with the paper's recipe (RandAugment on the host, each batch copied after it) and AutoProg-One's
  # supernet steps timed by CUDA events, stopped after an epoch and resumed on the device
  step fmnist_recipe $py -m autoprog.cli pretrain --method autoprog-one --randaugment rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 \
    --random-erasing 0.25 --epochs 2 --stop-after-epochs 1 $fm_extra --data-root "$data" --out "$jpegs-recipe" $cpu
  step fmnist_recipe_resume $py -m autoprog.cli pretrain --resume "$jpegs-recipe" $cpu
  if [ "$1" = run ]; then  # last, as it may take longest: torch.compile (inductor) through a growing prog run
    step fmnist_compile $py -m autoprog.cli pretrain --method prog --compile --epochs 2 --subset 4096 \
      --data-root "$data" --out "$jpegs-compile"
  fi
  echo "device check: $fails check(s) failed, $skipped skipped for time"
  exit "$fails"
  ;;
*)
  echo "usage: bash benchmarks/device_check.sh prepare|run|smoke" >&2
  exit 2
  ;;
esac
