"""Host-device synchronisations inside the training steps of a real run on a GPU (#26).

``tests/test_host_sync.py`` counts, on the CPU, the tensor calls of autoprog's code that would wait for a GPU.
It cannot see a wait that only a CUDA run makes (a blocking copy, an index moved by the indexing, an event read).
This runs one ``autoprog`` command in-process under torch's sync debug mode (``torch.cuda.set_sync_debug_mode``),
which warns at every synchronising CUDA call, and counts the warnings raised inside the engine's steps: in
stage entries (a search, a growth: decisions, not steady-state steps) apart from the rest, each with the
autoprog line that made it. (A search's scoring inside a step, AutoProg-One's, counts as steady: read the lines.) Target: at most steps / 50 (the health check) + a few in the steady-state steps.

    python benchmarks/cuda_sync_count.py --out runs/sync_pretrain.json -- pretrain --method prog --epochs 1

On a machine without CUDA nothing warns (the counts are 0); the command still runs, which the smoke check uses.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

SYNC_WARNING = "synchroniz"  # "called a synchronizing CUDA operation"


def count_syncs(argv: list[str]) -> dict:
    """Run ``autoprog argv`` in this process; the synchronisations in its steps and where they come from."""
    import autoprog.engine as engine
    from autoprog.cli import main as autoprog_main

    where = {"step": 0, "stage": 0}  # nesting depth inside a training step / a stage entry
    counted = {"steps": 0}
    sites = {"steady": collections.Counter(), "stage entries": collections.Counter()}
    real_step, real_enter = engine.RunTemplate._train_one, engine.enter_due_stage

    def train_one(self, *a, **k):
        where["step"] += 1
        counted["steps"] += 1
        try:
            return real_step(self, *a, **k)
        finally:
            where["step"] -= 1

    def enter(*a, **k):
        where["stage"] += 1
        try:
            return real_enter(*a, **k)
        finally:
            where["stage"] -= 1

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return shown(message, category, filename, lineno, file, line)  # every other warning, as before
        if not where["step"]:
            return
        ours = [f for f in traceback.extract_stack()[:-1] if "/autoprog/" in f.filename]
        site = (f"{ours[-1].filename.rsplit('/autoprog/', 1)[-1]}:{ours[-1].lineno} {ours[-1].name}" if ours
                else f"{filename}:{lineno}")
        sites["stage entries" if where["stage"] else "steady"][site] += 1

    cuda = torch.cuda.is_available() and "--cpu" not in argv
    with warnings.catch_warnings():  # (restores the filters and showwarning after)
        shown = warnings.showwarning
        warnings.showwarning = show
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}.*")
        engine.RunTemplate._train_one, engine.enter_due_stage = train_one, enter
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            rc = autoprog_main(argv)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            engine.RunTemplate._train_one, engine.enter_due_stage = real_step, real_enter
    return {"command": ["autoprog", *argv], "exit": rc,
            "device": torch.cuda.get_device_name() if cuda else "cpu (nothing is counted)",
            "steps": counted["steps"], "syncs_in_steady_steps": sum(sites["steady"].values()),
            "syncs_in_stage_entries": sum(sites["stage entries"].values()),
            "steady_sites": sites["steady"].most_common(15), "stage_entry_sites": sites["stage entries"].most_common(15)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s [--out FILE] -- AUTOPROG_ARGS...")
    ap.add_argument("--out", help="write the counts as JSON here")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="the autoprog command, after --")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        ap.error("give the autoprog command after --")
    res = count_syncs(argv)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return int(res["exit"] or 0)


if __name__ == "__main__":
    sys.exit(main())
