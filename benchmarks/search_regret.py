"""Search regret: the best fixed schedule of a search's growth space, at no more FLOPs, minus what the search found.

Give it a finished searched run (``--like RUN_DIR``: pre-training ``autoprog-one`` / ``autoprog-zero[-gain]``, or
fine-tuning ``autoprog-zero[-gain]`` / ``autoprog-one``). With the run's own settings it trains fixed schedules of
the same growth space (same stages and fractions, the last stage the full model):

* the found schedule replayed (its quality without the search's cost),
* every neighbour of it: one searched stage moved one step up or down in resolution or in depth, stages kept
  monotone (a local oracle: if a neighbour is better at no more FLOPs, the search left quality behind),
* the paper's manual schedule (prog) and any ``--schedules`` given.

Regret = best quality among the fixed schedules whose training FLOPs are at most the searched run's (+1 %)
minus the searched run's quality: top-1 points in pre-training, FD in fine-tuning (searched − best, so a
positive regret is always a loss). A sampled sweep, so the true oracle's regret is at least this.

    python benchmarks/search_regret.py --like runs/front-pretrain/seed0/autoprog-one --out runs/regret-ap1

Finished runs in ``--out`` are reused; ``--out/regret.md`` and ``regret.json`` get the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

from autoprog.errors import ConfigError
from autoprog.report import schedule_string
from autoprog.schedules import Schedule, Stage, prog
from autoprog.space import GrowthSpace, SubNet

FLOPS_TOLERANCE = 1.01


class Task:
    """How to rebuild, replay and judge runs of the searched run's task."""

    def __init__(self, like: Path):
        cfg = json.loads((like / "config.json").read_text())
        self.finetune = "spec" in cfg
        if self.finetune:
            from autoprog.diffusion.runner import FinetuneSpec

            self.spec = FinetuneSpec.from_dict(cfg["spec"])
        else:
            from autoprog.classification.runner import RunSpec

            self.spec = RunSpec.from_dict(cfg)
        self.higher = not self.finetune
        self.metric = "fd" if self.finetune else "top1"

    def space(self) -> GrowthSpace:
        if self.finetune:
            from autoprog.diffusion.runner import build_finetune

            _, _, _, unfreezer, _ = build_finetune(replace(self.spec, method="prog", schedule=None))
            return unfreezer.space(self.spec.num_stages, self.spec.start_ratio)
        from autoprog.classification.runner import build_run

        _, net, _, _ = build_run(replace(self.spec, method="prog", schedule=None))
        return net.growth_space(self.spec.num_stages, self.spec.start_ratio)

    def run(self, schedule_file: Path, out: Path) -> dict:
        """The finished (or reused) fixed-schedule run of ``schedule_file`` in ``out``: its summary."""
        if self.finetune:
            from accelerate import Accelerator

            from autoprog.diffusion.runner import _run_once
            from autoprog.methods import FINETUNE, get_method

            sid = get_method(self.spec.method, FINETUNE).options.get("sid", True)  # -nosid replays without SID
            spec = replace(self.spec, method="prog" if sid else "prog-nosid", schedule=str(schedule_file))
            return _run_once(spec, out, Accelerator(), None)["summary"]
        from autoprog.classification.runner import run_or_reuse

        spec = replace(self.spec, method="fixed", schedule=str(schedule_file))
        return run_or_reuse(spec, out, None)["summary"]

    def gain(self, a: float, b: float) -> float:
        """How much better quality ``a`` is than ``b`` (positive: better)."""
        return a - b if self.higher else b - a


def neighbours(found: Schedule, space: GrowthSpace) -> list[Schedule]:
    """Each searched stage (all but the last) moved one step in resolution or depth, the stages kept monotone."""
    res, dep = space.resolutions(), space.depths()
    stages = [Stage(SubNet(s.subnet.resolution, s.subnet.depth), s.fraction) for s in found.stages]
    out = []
    for k in range(len(stages) - 1):
        sub = stages[k].subnet
        for axis, values in (("resolution", res), ("depth", dep)):
            here = getattr(sub, axis)
            if here not in values:
                continue
            for step in (-1, 1):
                i = values.index(here) + step
                if not 0 <= i < len(values):
                    continue
                moved = replace(sub, **{axis: values[i]})
                new = [*stages[:k], Stage(moved, stages[k].fraction), *stages[k + 1:]]
                if all(b.subnet.resolution >= a.subnet.resolution and b.subnet.depth >= a.subnet.depth
                       for a, b in zip(new, new[1:])):
                    out.append(Schedule("fixed", tuple(new)))
    return out


def flops(summary: dict) -> float | None:
    return summary["flops_per_step"] * summary["steps"] if summary.get("flops_per_step") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", required=True, help="a finished searched run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--schedules", nargs="*", default=[], help="more inline schedules to try, RESxDEPTH[@FRACTION]")
    p.add_argument("--max", type=int, default=0, help="train at most this many schedules besides the replay (0: all)")
    a = p.parse_args()
    like, out = Path(a.like), Path(a.out)
    res_file = like / "results.json"
    if not res_file.is_file() or not json.loads(res_file.read_text()).get("done"):
        p.error(f"--like {like}: not a finished run")
    searched = json.loads(res_file.read_text())["summary"]
    task = Task(like)
    if flops(searched) is None:
        p.error(f"--like {like}: the run counted no FLOPs (--no-flops); regret is judged at no more FLOPs")
    try:
        found = Schedule.load(like / "schedule.json")
        space = task.space()
        tried = [("found schedule, replayed", found)] + [(None, s) for s in neighbours(found, space)]
        tried.append(("prog", replace(prog(space), method="fixed")))
        tried += [(None, Schedule.parse(t)) for t in a.schedules]
    except ConfigError as e:
        p.error(str(e))
    if a.max:
        tried = tried[:1 + a.max]
    out.mkdir(parents=True, exist_ok=True)
    rows, seen = [], set()
    for label, sched in tried:
        key = tuple((s.subnet.resolution, s.subnet.depth, s.subnet.blocks, round(s.fraction, 6)) for s in sched.stages)
        if key in seen:
            continue
        seen.add(key)
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]  # fractions and blocks too: one name per schedule
        name = "-".join(f"{r}x{d}" for r, d, _, _ in key) + f"-{digest}"
        sched_file = out / f"{name}.schedule.json"
        sched.save(sched_file)
        s = task.run(sched_file, out / name)
        rows.append({"schedule": label or schedule_string(sched.to_dict()), "stages": schedule_string(sched.to_dict()),
                     "wall_time_s": s["wall_time_s"], "flops": flops(s), task.metric: s[task.metric],
                     "within_flops": flops(s) is not None and flops(s) <= flops(searched) * FLOPS_TOLERANCE})
    eligible = [r for r in rows if r["within_flops"] and r[task.metric] is not None]
    best = max(eligible, key=lambda r: task.gain(r[task.metric], 0.0)) if eligible else None
    regret = round(task.gain(best[task.metric], searched[task.metric]), 4) if best else None
    result = {"searched": {"run": str(like), "method": searched.get("method") or task.spec.method,
                           "schedule": schedule_string(searched["schedule"]), "wall_time_s": searched["wall_time_s"],
                           "flops": flops(searched), task.metric: searched[task.metric]},
              "metric": task.metric, "regret": regret, "best": best, "fixed": rows}
    (out / "regret.json").write_text(json.dumps(result, indent=2) + "\n")
    m = task.metric
    lines = [f"searched {result['searched']['method']}: {result['searched']['schedule']}, {m} {searched[m]:.3f}; "
             f"regret {regret if regret is not None else '–'} ({m}, best fixed at no more FLOPs − searched)", "",
             f"| schedule | stages | wall time (s) | FLOPs vs searched | {m} | at no more FLOPs |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['schedule']} | {r['stages']} | {r['wall_time_s']:.1f} | {r['flops'] / flops(searched):.2f}× | "
              f"{r[m]:.3f} | {'yes' if r['within_flops'] else 'no'} |" for r in rows]
    (out / "regret.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
