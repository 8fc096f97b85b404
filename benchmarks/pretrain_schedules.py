"""Fixed growth schedules against the original model and its budget-matched versions (an oracle check).

AutoProg-One can only be as good as the best schedule in its growth space. This script trains, with the
settings of an existing run (``--like RUN_DIR``: its ``config.json``; a finished ``original`` run there is
reused as the reference row), fixed growth schedules (inline ``RESxDEPTH[@FRACTION]`` per stage, see
``autoprog pretrain --help``) and the original model stopped at fractions of its steps (learning rate
fully decayed there, as ``original@budget``), and prints wall-clock, FLOPs speed-up and top-1 side by side.
If no schedule of the growth space reaches the targets, no search over it can. Example, the DeiT
configuration of the README (about 4 minutes per run on 2 CPU cores):

    python benchmarks/pretrain_schedules.py --like runs/bench-deit-seeds/seed0/original --out runs/pt-schedules \
        --schedules 16x4,20x5,24x7,28x8 16x8,16x8,20x8,28x8 --budgets 0.55

Finished runs in ``--out`` are reused (their settings must match); ``--out/summary.md`` and
``summary.json`` get the table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from autoprog.classification.runner import RunSpec, run_differences, run_or_reuse, validate_spec
from autoprog.errors import ConfigError
from autoprog.report import schedule_string
from autoprog.schedules import Schedule


def load_reference(like: Path) -> tuple[RunSpec, dict | None]:
    """The settings of ``like`` as an ``original`` run, and its results if it is a finished one."""
    cfg = like / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"--like {like}: no config.json there; point it at a run directory")
    spec = RunSpec.from_dict(json.loads(cfg.read_text()))
    spec = replace(spec, method="original", schedule=None,
                   train=replace(spec.train, max_steps=None, stop_after_epochs=None))
    res = like / "results.json"
    done = res.is_file() and json.loads(res.read_text()).get("done")
    return spec, json.loads(res.read_text()) if done and not run_differences(like, spec) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", required=True, help="a run directory whose settings every run here copies")
    p.add_argument("--out", required=True)
    p.add_argument("--schedules", nargs="*", default=[], help="inline schedules, RESxDEPTH[@FRACTION] per stage")
    p.add_argument("--budgets", default="", help="fractions of the original's steps, comma-separated (e.g. 0.55)")
    p.add_argument("--seed", type=int, help="override the seed of --like")
    args = p.parse_args()
    out = Path(args.out)
    spec, reference = load_reference(Path(args.like))
    if args.seed is not None and args.seed != spec.train.seed:
        spec, reference = replace(spec, train=replace(spec.train, seed=args.seed)), None
    try:  # fail on a malformed schedule before training anything
        for text in args.schedules:
            validate_spec(replace(spec, method="fixed", schedule=text))
    except ConfigError as e:
        p.error(str(e))
    rows = [("original", reference or run_or_reuse(spec, out / "original", None))]
    total = rows[0][1]["summary"]["total_steps"]
    for frac in (float(f) for f in args.budgets.split(",") if f.strip()):
        steps = max(1, round(total * frac))
        rows.append((f"original, {steps} steps", run_or_reuse(replace(spec, train=replace(spec.train, max_steps=steps)),
                                                             out / f"original-{steps}", None)))
    for text in args.schedules:
        name = text.replace(",", "-").replace("@", "_")
        rows.append((schedule_string(Schedule.parse(text).to_dict()) + ("" if "@" not in text else f" ({text})"),
                     run_or_reuse(replace(spec, method="fixed", schedule=text), out / name, None)))
    ref = rows[0][1]["summary"]
    table = []
    for name, res in rows:
        s = res["summary"]
        table.append({"run": name, "wall_time_s": s["wall_time_s"], "speedup": ref["wall_time_s"] / s["wall_time_s"],
                      "flops_speedup": ref["flops_per_step"] * ref["steps"] / (s["flops_per_step"] * s["steps"])
                      if s["flops_per_step"] and ref["flops_per_step"] else None,  # None: run with --no-flops
                      "top1": s["top1"], "top1_ema": s["top1_ema"]})
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731 - None: no EMA or no FLOPs counted
    lines = ["| run | wall time (s) | speed-up | FLOPs speed-up | top-1 (%) | EMA top-1 (%) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['wall_time_s']:.1f} | {r['speedup']:.2f}× | {fmt(r['flops_speedup'])}× | "
              f"{r['top1']:.2f} | {fmt(r['top1_ema'])} |" for r in table]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
