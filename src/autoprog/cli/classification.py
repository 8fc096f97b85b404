"""Pre-training (classification) commands of the ``autoprog`` CLI: ``autoprog pretrain`` and ``autoprog compare``
with a ViT and a growth schedule."""

from __future__ import annotations

import argparse

from ..classification.runner import RunSpec
from ..methods import PRETRAIN
from ..options import add_options, from_args
from .common import (
    add_front_flag,
    add_out_flags,
    add_run_flags,
    front_of,
    refuse_unused,
    run_compare,
    run_one,
)

DEFAULT_COMPARE_METHODS = "original,prog,autoprog-one"


GROUPS = ("model", "data", "growth", "AutoProg-One search", "AutoProg-Zero search", "optimisation")


def add_run_options(p: argparse.ArgumentParser, command: str) -> None:
    """Every :class:`RunSpec` option (generated from its fields), in the help's groups."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    exclude = {"method", "train.stop_after_epochs"} if command == "compare" else set()
    add_options(p, RunSpec, exclude=exclude, groups=groups)
    add_run_flags(groups["optimisation"], command)


def add_pretrain_options(p: argparse.ArgumentParser) -> None:
    add_out_flags(p)
    add_run_options(p, "pretrain")


def add_compare_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--methods", default=DEFAULT_COMPARE_METHODS,
                   help=f"comma-separated methods; original is always included (default: {DEFAULT_COMPARE_METHODS})")
    c.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    c.add_argument("--no-budget-baseline", action="store_true",
                   help="skip original@budget: the original trained for the wall-clock of the fastest "
                        "progressive method, with its learning rate fully decayed in that time")
    c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, and mean ± std "
                                  "in OUT/summary.json and summary.md (overrides --seed)")
    add_front_flag(c, "original")
    add_run_options(c, "compare")


def spec_from_args(args: argparse.Namespace, method: str) -> RunSpec:
    return from_args(RunSpec, args, method=method)


def run_classification(args, acc) -> None:
    from ..classification import runner

    refuse_unused(args, PRETRAIN, runner.OPTION_USERS, baseline="original")
    if args.command == "pretrain":
        run_one(args, acc, "pretrain", runner.pretrain, lambda: spec_from_args(args, args.method),
                lambda s: f"done: top-1 {s['top1']:.2f} (EMA {s['top1_ema']:.2f}) in {s['wall_time_s']:.1f}s of "
                          f"training; results in {args.out}/results.json")
        return
    base, front = spec_from_args(args, "original"), front_of(args)
    run_compare(args, acc, lambda methods, budget: runner.compare(base, methods, args.out, budget, acc, front),
                lambda methods, seeds, budget: runner.compare_seeds(base, methods, args.out, seeds, budget, acc,
                                                                    front),
                "curves.png, front.png")
