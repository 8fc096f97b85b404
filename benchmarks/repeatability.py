"""Repeatability of the searches: does one seed on one machine always choose the same schedule?

Runs each searching method several times with one seed, with the step-time source ``measured`` (the paper's
rule) and ``flops``, on the machine as it is ("idle": run nothing else meanwhile) and under bursty load from
background processes that burn CPU in random on/off bursts ("busy"). Prints, per method, time source and
load, how many distinct schedules the repeats chose.

    python benchmarks/repeatability.py --repeats 3 --out runs/repeat      # figures go to docs/results.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

PRETRAIN = ["--subset", "2048", "--epochs", "4", "--batch-size", "64", "--embed-dim", "32", "--depth", "6",
            "--num-heads", "2", "--patch-size", "4", "--eval-samples", "256", "--no-flops", "--cpu"]
FINETUNE = ["--steps", "60", "--batch-size", "16", "--eval-points", "1", "--curve-samples", "8",
            "--fd-samples", "16", "--sample-steps", "2", "--feature-epochs", "1", "--subset", "512", "--cpu"]
RUNS = {  # the searching methods, in configurations small enough to repeat
    "pretrain autoprog-one": ["pretrain", "--method", "autoprog-one", "--search-epochs", "0.5", *PRETRAIN],
    "pretrain autoprog-zero": ["pretrain", "--method", "autoprog-zero", *PRETRAIN],
    "finetune autoprog-zero": ["finetune", "--method", "autoprog-zero", *FINETUNE],
    "finetune autoprog-one": ["finetune", "--method", "autoprog-one", *FINETUNE],
}


def _burn(seed: int) -> None:
    """Busy-loop in random bursts (0.1–1.5 s on, 0.1–0.8 s off) until terminated."""
    rng = random.Random(seed)
    while True:
        end = time.perf_counter() + rng.uniform(0.1, 1.5)
        while time.perf_counter() < end:
            pass
        time.sleep(rng.uniform(0.1, 0.8))


class Load:
    """``with Load(n):`` ``n`` background processes burning CPU in bursts (none for n = 0)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [mp.Process(target=_burn, args=(i,), daemon=True) for i in range(self.n)]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            p.join()


def schedule_of(run: Path) -> str:
    res = json.loads((run / "results.json").read_text())
    stages = res["summary"]["schedule"]["stages"]
    return " → ".join(f"{s['resolution']}px·{s['depth']}" + (f"{s['blocks']}" if s.get("blocks") else "")
                      for s in stages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--sources", default="measured,flops")
    p.add_argument("--loads", default="idle,busy")
    p.add_argument("--burners", type=int, default=2, help="background processes under 'busy' (default: 2)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for load in a.loads.split(","):
        with Load(a.burners if load == "busy" else 0):
            for method in a.methods.split(","):
                for source in a.sources.split(","):
                    chosen = []
                    for i in range(a.repeats):
                        run = out / f"{method.replace(' ', '-')}-{source}-{load}-{i}"
                        shutil.rmtree(run, ignore_errors=True)
                        cmd = [sys.executable, "-m", "autoprog.cli", *RUNS[method], "--time-source", source,
                               "--out", str(run)]
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
                        chosen.append(schedule_of(run))
                    distinct = sorted(set(chosen))
                    rows.append({"method": method, "time source": source, "load": load, "runs": a.repeats,
                                 "distinct schedules": len(distinct), "same": len(distinct) == 1,
                                 "schedules": " | ".join(f"{chosen.count(s)}× {s}" for s in distinct)})
                    print(json.dumps(rows[-1]), flush=True)
    (out / "repeatability.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "repeatability.md").write_text("\n".join(lines) + "\n")
    print((out / "repeatability.md").read_text())


if __name__ == "__main__":
    main()
