"""Where progressive learning pays: time-to-quality speed-up against the baseline's front, per regime.

Each *cell* is one regime (pre-training: training length in epochs × patch size, i.e. the token grid;
fine-tuning: optimizer steps). In each cell the script runs ``autoprog compare`` with the baseline's front and
``--seeds``, then tabulates every method's time-to-quality speed-up (mean ± std over the seeds, ``<``/``>``
when outside the front), its FLOPs speed-up and its quality, in ``--out/regime.md`` and ``regime.json``.

    python benchmarks/regime_study.py --cells 8x4,30x4,8x2 --methods prog,autoprog-one --seeds 0,1,2 \\
        --out runs/regime-pretrain
    python benchmarks/regime_study.py --task finetune --cells 300,600,1200 --methods prog,autoprog-zero \\
        --seeds 0,1,2 --out runs/regime-finetune

Cells already run (their ``summary.json`` is there) are read, not run again; ``--reuse DIR=CELL`` takes a
cell from an earlier ``compare --seeds`` run with the same settings (e.g. the default front comparison).
Extra arguments after ``--`` go to every ``autoprog compare`` (e.g. ``-- --subset 5000``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def parse_cells(text: str, task: str) -> list[dict]:
    cells = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if task == "finetune":
                cells.append({"name": f"{int(part)}steps", "args": ["--steps", str(int(part))], "steps": int(part)})
            else:
                epochs, patch = part.lower().split("x")
                cells.append({"name": f"{int(epochs)}ep-p{int(patch)}", "epochs": int(epochs), "patch": int(patch),
                              "args": ["--epochs", str(int(epochs)), "--patch-size", str(int(patch))]})
        except ValueError:
            raise SystemExit(f"regime_study: a cell is EPOCHSxPATCH (pre-training) or STEPS (fine-tuning), got "
                             f"{part!r}") from None
    return cells


def run_cell(cell: dict, args, extra: list[str]) -> Path:
    out = args.out / cell["name"]
    if (out / "summary.json").is_file():
        print(f"{cell['name']}: reusing {out}")
        return out
    cmd = [sys.executable, "-m", "autoprog.cli", "compare", "--task", args.task, "--methods",
           ",".join([args.baseline, *args.methods]), "--front", args.front, "--seeds", args.seeds, "--out", str(out),
           *cell["args"], *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def cell_rows(summary: Path, baseline: str) -> dict[str, dict]:
    rows = json.loads(summary.read_text())
    return {r["method"]: r for r in rows if r["method"] == baseline or "@" not in r["method"]}


def speedup_text(r: dict) -> str:
    if r.get("tq_speedup") is None:
        return "–"
    bound = {"=": "", None: ""}.get(r.get("tq_bound"), r.get("tq_bound"))
    std = r.get("tq_speedup_std")
    return f"{bound}{r['tq_speedup']:.2f}" + (f" ± {std:.2f}" if std else "") + "×"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("classification", "finetune"), default="classification")
    p.add_argument("--cells", required=True, help="EPOCHSxPATCH,... (pre-training) or STEPS,... (fine-tuning)")
    p.add_argument("--methods", default="prog,autoprog-one", help="methods besides the baseline")
    p.add_argument("--front", default="0.25,0.5,1", help="the baseline's front, as compare --front")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR=CELL",
                   help="take CELL from an earlier compare --seeds output DIR")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.baseline = "full" if args.task == "finetune" else "original"
    cells = parse_cells(args.cells, args.task)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.reuse:
        src, _, name = spec.partition("=")
        dst = args.out / name
        if not (dst / "summary.json").is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(src) / "summary.json", dst / "summary.json")
            (dst / "REUSED_FROM").write_text(src + "\n")
    table, quality = [], "fd" if args.task == "finetune" else "top1"
    for cell in cells:
        rows = cell_rows(run_cell(cell, args, extra) / "summary.json", args.baseline)
        base = rows[args.baseline]
        for m in [args.baseline, *args.methods]:
            r = rows.get(m)
            if r is None:
                continue
            table.append({"cell": cell["name"], "method": m, "tq_speedup": r.get("tq_speedup"),
                          "tq_speedup_std": r.get("tq_speedup_std"), "tq_bound": r.get("tq_bound"),
                          "flops_speedup": r.get("flops_speedup") or (1 / r["flops_ratio"] if r.get("flops_ratio")
                                                                        else None),
                          "wall_time_s": r.get("wall_time_s"), quality: r.get(quality),
                          f"{quality}_std": r.get(f"{quality}_std"), "baseline_" + quality: base.get(quality)})
    (args.out / "regime.json").write_text(json.dumps(table, indent=1))
    head = f"| cell | method | time-to-quality speed-up | FLOPs speed-up | wall-clock (s) | {quality} |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for t in table:
        q = t[quality]
        qs = "–" if q is None else f"{q:.2f}" + (f" ± {t[quality + '_std']:.2f}" if t.get(quality + "_std") else "")
        fl = f"{t['flops_speedup']:.2f}×" if t["flops_speedup"] else "–"
        lines.append(f"| {t['cell']} | {t['method']} | {speedup_text(t)} | {fl} | {t['wall_time_s']:.1f} | {qs} |")
    (args.out / "regime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
