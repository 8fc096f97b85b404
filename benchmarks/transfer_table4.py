"""Table 4's question on the CPU: does growth in pre-training hurt transfer? One seed per call.

Pre-trains the built-in default (Fashion-MNIST, 10,000 images, 8 epochs, the built-in ViT on a 7x7 grid) with each
method, then fine-tunes each pre-trained model in full on scikit-learn digits (``autoprog finetune --task
classification``'s defaults: 10 epochs, batch 64, lr 5e-4), with the same seed. Finished runs are reused.
``original-eN`` is the original pre-trained for N epochs (its learning rate decayed within them): a point of its
front, to compare transfer at equal pre-training quality.

    python benchmarks/transfer_table4.py SEED [--methods original,prog,autoprog-one] [--out runs/table4]

Prints one JSON line per method: pre-training top-1 and wall time, transfer top-1 (online and EMA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def done(run: Path) -> dict | None:
    f = run / "results.json"
    if f.is_file():
        res = json.loads(f.read_text())
        if res.get("done"):
            return res["summary"]
    return None


def autoprog(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "autoprog.cli", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed", type=int)
    p.add_argument("--methods", default="original,prog,autoprog-one")
    p.add_argument("--out", default="runs/table4")
    a = p.parse_args()
    root = Path(a.out) / f"seed{a.seed}"
    for method in a.methods.split(","):
        pre, ft = root / "pretrain" / method, root / "transfer" / method
        if done(pre) is None:
            base, _, epochs = method.partition("-e")
            args = ["--method", base] + (["--epochs", epochs] if epochs else [])
            autoprog("pretrain", *args, "--seed", str(a.seed), "--out", str(pre), "--overwrite")
        if done(ft) is None:
            autoprog("finetune", "--task", "classification", "--method", "full", "--base", str(pre / "model"),
                     "--seed", str(a.seed), "--out", str(ft), "--overwrite")
        s_pre, s_ft = done(pre), done(ft)
        print(json.dumps({"seed": a.seed, "method": method, "pretrain_top1": s_pre["top1"],
                          "pretrain_wall_s": s_pre["wall_time_s"], "transfer_top1": s_ft["top1"],
                          "transfer_top1_ema": s_ft["top1_ema"], "transfer_wall_s": s_ft["wall_time_s"]}),
              flush=True)


if __name__ == "__main__":
    main()
