"""AutoProg-Zero on the default transfer task (600 steps, one evaluation point), the paper's backward pass against
--learnable-layout tail --frozen-prefix no-grad, one seed per call: the settings of the runs of docs/results.md's
"The default transfer task with the time ballot ranked exactly" (every default but --eval-points 1).

    python benchmarks/frozen_prefix_quality.py SEED default|tail-nograd     # writes runs/ft-prefix/VARIANT-sSEED

Prints one JSON line: FD, training wall time, search time, FLOPs per step and the schedule.
"""

import dataclasses
import json
import sys
from pathlib import Path

from autoprog.diffusion.runner import FinetuneSpec, finetune

seed, variant = int(sys.argv[1]), sys.argv[2]
if variant not in ("default", "tail-nograd"):
    sys.exit("usage: frozen_prefix_quality.py SEED default|tail-nograd")
spec = FinetuneSpec(method="autoprog-zero")
spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, eval_points=1, seed=seed))
if variant == "tail-nograd":
    spec = dataclasses.replace(spec, learnable_layout="tail", frozen_prefix="no-grad")
out = Path(f"runs/ft-prefix/{variant}-s{seed}")
res = finetune(spec, out)
s = res["summary"]
print(json.dumps({"seed": seed, "variant": variant, "fd": s.get("fd"), "wall": s.get("wall_time_s"),
                  "search": s.get("search_time_s"), "flops_per_step": s.get("flops_per_step"),
                  "schedule": [(st["resolution"], st["depth"]) for st in s["schedule"]["stages"]]}))
