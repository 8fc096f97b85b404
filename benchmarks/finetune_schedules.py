"""Fixed unfreezing schedules against full fine-tuning and its budget-matched versions (an oracle check).

A schedule search can only be as good as the best schedule in its growth space. This script replays
fixed schedules (resolution x learnable blocks per stage, equal stages) and full fine-tuning stopped at
fractions of its steps (cosine learning rate ending there, as ``full@budget``), each a normal ``finetune``
run on the default transfer task, and prints wall-clock and FD side by side. If no schedule beats the
budget-matched full fine-tuning of the same wall-clock, no search over that space can. Example (about
12 minutes on 2 CPU cores):

    python benchmarks/finetune_schedules.py --out runs/schedules \
        --schedules 8x6,8x6,8x6,28x6 16x6,16x6,16x6,28x6 20x6,20x6,20x6,28x6 16x6,20x6,24x6,28x6 \
        --budgets 0.4,0.7

Finished runs in ``--out`` are reused; ``--out/summary.md`` gets the table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from autoprog.diffusion.runner import FinetuneSpec, finetune
from autoprog.diffusion.trainer import DiffusionConfig
from autoprog.errors import ConfigError
from autoprog.report import schedule_string
from autoprog.schedules import Schedule


def run(spec: FinetuneSpec, out: Path) -> dict:
    res = out / "results.json"
    if res.is_file() and json.loads(res.read_text()).get("done"):
        return json.loads(res.read_text())["summary"]
    return finetune(spec, out)["summary"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--schedules", nargs="+", required=True, help="inline schedules, RESxBLOCKS[@FRACTION] per stage, comma-separated")
    p.add_argument("--budgets", default="0.4,0.7", help="fractions of full fine-tuning's steps (default: 0.4,0.7)")
    p.add_argument("--steps", type=int, default=DiffusionConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-points", type=int, default=1)
    args = p.parse_args()
    out = Path(args.out)
    train = replace(DiffusionConfig(), steps=args.steps, seed=args.seed, eval_points=args.eval_points)
    base = FinetuneSpec(method="full", train=train)
    try:  # fail on a malformed schedule before training anything
        schedules = [Schedule.parse(text) for text in args.schedules]
    except ConfigError as e:
        p.error(str(e))
    rows = [("full", run(base, out / "full"))]
    for frac in (float(f) for f in args.budgets.split(",") if f):
        steps = max(1, round(args.steps * frac))
        rows.append((f"full, {steps} steps", run(replace(base, train=replace(train, steps=steps)),
                                                 out / f"full-{steps}")))
    for text, sched in zip(args.schedules, schedules):
        rows.append((schedule_string(sched.to_dict()),
                     run(replace(base, method="prog", schedule=text), out / text.replace(",", "-").replace("@", "_"))))
    full_t = rows[0][1]["wall_time_s"]
    lines = [f"| run | wall time (s) | speed-up | {rows[0][1]['metric']} |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['wall_time_s']:.1f} | {full_t / s['wall_time_s']:.2f}× | {s['fd']:.1f} |"
              for name, s in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
