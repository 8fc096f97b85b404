"""FLOPs-to-quality speed-up: the time-to-quality figure with training FLOPs in place of seconds.

The baseline's front is drawn from its runs' FLOPs instead of their wall-clock, so the figure does not depend on
how busy the machine was, nor on which session trained which run (a comparison that reuses the front of an
earlier session, or shares the machine, keeps a fair FLOPs figure). It leaves out what FLOPs do not see
(a search's scoring passes, data loading, small-kernel overheads), so it complements the measured figure.

    python benchmarks/flops_to_quality.py runs/cell8 runs/cell8-b           # pre-training compare folders

Each folder is a ``compare`` output with ``seed<N>/summary.json`` (or one seed's ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from autoprog.front import Front, Speedup, mean_speedup


def seed_summaries(folder: Path) -> dict[str, list[dict]]:
    """seed name → that comparison's rows."""
    seeds = sorted(p for p in folder.glob("seed*/summary.json"))
    files = seeds or [folder / "summary.json"]
    return {f.parent.name: json.loads(f.read_text()) for f in files if f.is_file()}


def flops_speedups(rows: list[dict], baseline: str = "original") -> dict[str, Speedup]:
    """Each row's FLOPs-to-quality speed-up against ``baseline``'s front (its ``@`` runs and itself)."""
    # FLOPs in units of the baseline's whole run: a row's flops_speedup is the baseline's FLOPs ÷ the run's
    front = Front([(1.0 / r["flops_speedup"], r["top1"]) for r in rows if r.get("flops_speedup")
                   and (r["method"] == baseline or r["method"].startswith(baseline + "@"))])
    return {r["method"]: front.speedup(1.0 / r["flops_speedup"], r["top1"]) for r in rows if r.get("flops_speedup")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    a = p.parse_args()
    for folder in a.folders:
        summaries = seed_summaries(folder)
        if not summaries:
            p.error(f"{folder}: no summary.json (a compare output, or its seed<N> folders)")
        per_seed = {s: flops_speedups(rows) for s, rows in summaries.items()}
        methods = list(dict.fromkeys(m for sp in per_seed.values() for m in sp))
        print(f"## {folder} ({', '.join(per_seed)})\n")
        print("| method | FLOPs-to-quality speed-up | per seed |")
        print("|---|---:|---|")
        for m in methods:
            vals = [per_seed[s][m] for s in per_seed if m in per_seed[s]]
            mean = mean_speedup(vals)
            spread = statistics.stdev([v.value for v in vals]) if len(vals) > 1 else 0.0
            print(f"| {m} | {mean} ± {spread:.2f} | {', '.join(str(v) for v in vals)} |")
        print()


if __name__ == "__main__":
    main()
