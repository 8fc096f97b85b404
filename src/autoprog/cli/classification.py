"""Pre-training (classification) commands of the ``autoprog`` CLI: ``autoprog pretrain`` and ``autoprog compare``
with a ViT and a growth schedule."""

from __future__ import annotations

import argparse

from ..classification.runner import SEARCH_SETTINGS, TRANSFER_EXCLUDE, RunSpec, TransferSpec
from ..methods import PRETRAIN, TRANSFER
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
DEFAULT_TRANSFER_METHODS = "full,prog,autoprog-zero"


GROUPS = ("model", "data", "growth", "AutoProg-One search", "AutoProg-Zero search", "optimisation")


def add_run_options(p: argparse.ArgumentParser, command: str, transfer: bool = False) -> None:
    """Every :class:`RunSpec` option (generated from its fields), in the help's groups; ``transfer``: every
    :class:`TransferSpec` option (fine-tuning a pre-trained classifier)."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    exclude = {"method", "train.stop_after_epochs"} if command == "compare" else set()
    if transfer:
        exclude |= TRANSFER_EXCLUDE | set(SEARCH_SETTINGS.autoprog_one) | {"train.optimizer_at_growth"}  # no growth
    add_options(p, TransferSpec if transfer else RunSpec, exclude=exclude, groups=groups)
    add_run_flags(groups["optimisation"], command)


def add_transfer_options(p: argparse.ArgumentParser) -> None:
    """``autoprog finetune --task classification``."""
    add_out_flags(p)
    add_run_options(p, "finetune", transfer=True)


def add_pretrain_options(p: argparse.ArgumentParser) -> None:
    add_out_flags(p)
    add_run_options(p, "pretrain")


def add_compare_options(c: argparse.ArgumentParser, transfer: bool = False) -> None:
    """``autoprog compare`` (``transfer``: ``--task transfer``, fine-tuning methods against full's front)."""
    methods, baseline = (DEFAULT_TRANSFER_METHODS, "full") if transfer else (DEFAULT_COMPARE_METHODS, "original")
    c.add_argument("--methods", default=methods,
                   help=f"comma-separated methods; {baseline} is always included (default: {methods})")
    out = "runs/transfer" if transfer else "runs/compare"
    c.add_argument("--out", default=out, help=f"output directory (default: {out})")
    c.add_argument("--no-budget-baseline", action="store_true",
                   help=f"skip {baseline}@budget: the {baseline} trained for the wall-clock of the fastest "
                        "progressive method, with its learning rate fully decayed in that time")
    c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, and mean ± std "
                                  "in OUT/summary.json and summary.md (overrides --seed)")
    add_front_flag(c, baseline)
    add_run_options(c, "compare", transfer=transfer)


def is_transfer(args) -> bool:
    """Whether the command fine-tunes a classifier (``finetune --task classification``, ``compare --task
    transfer``)."""
    return (args.command, getattr(args, "task", None)) in (("finetune", "classification"), ("compare", "transfer"))


def spec_from_args(args: argparse.Namespace, method: str) -> RunSpec:
    return from_args(TransferSpec if is_transfer(args) else RunSpec, args, method=method)


def run_classification(args, acc) -> None:
    from ..classification import runner

    if is_transfer(args):
        refuse_unused(args, TRANSFER, runner.OPTION_USERS, baseline="full")
    else:
        refuse_unused(args, PRETRAIN, runner.OPTION_USERS, baseline="original")
    if args.command == "finetune":
        run_one(args, acc, "finetune --task classification", runner.finetune_classifier,
                lambda: spec_from_args(args, args.method),
                lambda s: f"done: top-1 {s['top1']:.2f} (EMA {s['top1_ema']:.2f}) in {s['wall_time_s']:.1f}s of "
                          f"training; model in {args.out}/model")
        return
    if args.command == "pretrain":
        run_one(args, acc, "pretrain", runner.pretrain, lambda: spec_from_args(args, args.method),
                lambda s: f"done: top-1 {s['top1']:.2f} (EMA {s['top1_ema']:.2f}) in {s['wall_time_s']:.1f}s of "
                          f"training; results in {args.out}/results.json, model in {args.out}/model")
        return
    base, front = spec_from_args(args, (TransferSpec if is_transfer(args) else RunSpec).baseline), front_of(args)
    run_compare(args, acc, lambda methods, budget: runner.compare(base, methods, args.out, budget, acc, front),
                lambda methods, seeds, budget: runner.compare_seeds(base, methods, args.out, seeds, budget, acc,
                                                                    front),
                "curves.png, front.png")
