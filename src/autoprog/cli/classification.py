"""Pre-training (classification) commands of the ``autoprog`` CLI: ``autoprog pretrain`` and ``autoprog compare``
with a ViT and a growth schedule."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..algorithms.growth import GROWTH_OPERATORS
from ..classification.trainer import TrainConfig
from ..errors import ConfigError
from ..schedules import METHODS
from .common import parse_seeds, positive_int

DEFAULT_COMPARE_METHODS = "original,prog,autoprog-one"


def add_common(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit",
                   help="'vit' (built-in, timm-style) or 'timm:<name>', e.g. timm:deit_tiny_patch16_224 (default: vit)")
    g.add_argument("--img-size", type=positive_int, help="full input resolution (default: the dataset's, 224 for timm)")
    g.add_argument("--patch-size", type=positive_int, help="patch size (built-in default: image size / 4, a 4x4 grid of patches; 7 at 28 px)")
    g.add_argument("--depth", type=positive_int, help="number of transformer blocks (built-in default 6)")
    g.add_argument("--embed-dim", type=positive_int, help="embedding width (built-in default 64)")
    g.add_argument("--num-heads", type=positive_int, help="attention heads (built-in default 4)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (default: 0)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist, digits, or a path to an ImageFolder directory (train/ and val/) "
                        "(default: fashion-mnist)")
    g.add_argument("--data-root", help="where Fashion-MNIST's .gz files are (default: /usr/share/datasets/fashion-mnist)")
    g.add_argument("--subset", type=int, default=10000,
                   help="train on this many training images (fixed random subset; 0 = all) (default: 10000)")
    g.add_argument("--eval-samples", type=int, default=2000,
                   help="test images for the per-epoch evaluation; the last epoch always uses the whole "
                        "test set (0 = always all) (default: 2000)")
    g.add_argument("--workers", type=int, default=0, help="data-loader workers for ImageFolder data (default: 0)")

    g = p.add_argument_group("growth")
    g.add_argument("--growth", choices=sorted(GROWTH_OPERATORS),
                   help="growth operator (default: mogrow; stacking for progstack)")
    g.add_argument("--num-stages", type=positive_int, default=4, help="number of stages (default: 4)")
    g.add_argument("--start-ratio", type=float, default=0.5,
                   help="initial scaling ratio s1 of patches and depth: 0.5, 0.4 or 0.25 (default: 0.5)")
    g.add_argument("--schedule", help="schedule to replay with --method fixed: a schedule.json, or inline RESxDEPTH per "
                                           "stage, e.g. 16x4,20x5,24x7,28x8 (equal stages) or 16x8@0.5,28x8@0.5")
    g.add_argument("--adareg", action="store_true",
                   help="adaptive regularization: RandAugment magnitude (4.5-9), random-erasing probability (0-0.25) "
                        "and drop-path rate (0-0.1) grow linearly with the sub-network's size (Table 14)")

    g = p.add_argument_group("AutoProg-One search")
    g.add_argument("--search-epochs", type=float, default=2.0,
                   help="epochs of supernet training at the start of each stage before choosing (default: 2)")
    g.add_argument("--alpha", type=float, default=None,
                   help="runtime exponent in the score L*T^alpha (default: balanced per stage so that loss and "
                        "runtime span the same range over the candidates)")
    g.add_argument("--search-samples", type=positive_int, default=1024,
                   help="training images (fixed, not augmented) on which candidates' losses are measured (default: 1024)")
    g.add_argument("--no-recycle", action="store_true",
                   help="retrain the chosen sub-network from the stage's starting weights instead of inheriting "
                        "the supernet's (the ablation of Table 11; the search epochs become extra cost)")

    g = p.add_argument_group("AutoProg-Zero search")
    g.add_argument("--time-tolerance", type=float, default=0.05,
                   help="step times within this relative difference tie on the time ballot, so timing noise does "
                        "not decide the vote (default: 0.05; 0 = the paper's exact ranking)")
    g.add_argument("--proxy-batches", type=positive_int, default=4,
                   help="fixed training batches for the NTK and ZiCo proxies, at least 2 (default: 4)")
    g.add_argument("--proxy-batch-size", type=positive_int, default=8, help="images per proxy batch (default: 8)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"training epochs (default: {d.epochs:g})")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"batch size per process (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr:g})")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help=f"final cosine learning rate (default: {d.min_lr:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay:g})")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear warm-up length (default: {d.warmup_epochs:g})")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"(default: {d.label_smoothing:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off (default: {d.grad_clip:g})")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="momentum m of the EMA network MoGrow copies from (default: the paper's 0.998 "
                        "rescaled to span the same fraction of an epoch as at ImageNet scale, "
                        "0.998^(1251/steps per epoch))")
    g.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="mixed precision through Accelerate (default: no)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    g.add_argument("--no-flops", action="store_true", help="skip counting FLOPs per step")
    g.add_argument("--config", help="YAML file of option values (keys: option names with '_')")


def add_pretrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="prog",
                   help="original (full model), prog (uniform linear growth), progstack (progressive stacking), "
                        "fixed (replay --schedule), autoprog-one (automatic schedule by one-shot search), "
                        "autoprog-zero (automatic schedule by zero-shot proxies on grown candidates, "
                        "Table 5) (default: prog)")
    p.add_argument("--out", help="output directory (required unless --resume)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--stop-after-epochs", type=positive_int,
                   help="stop after this many epochs, keeping the checkpoint (continue with --resume)")
    add_common(p)


def add_compare_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--methods", default=DEFAULT_COMPARE_METHODS,
                   help=f"comma-separated methods; original is always included (default: {DEFAULT_COMPARE_METHODS})")
    c.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    c.add_argument("--no-budget-baseline", action="store_true",
                   help="skip original@budget: the original trained for the wall-clock of the fastest "
                        "progressive method, with its learning rate fully decayed in that time")
    c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, and mean ± std "
                                  "in OUT/summary.json and summary.md (overrides --seed)")
    add_common(c)


def spec_from_args(args: argparse.Namespace, method: str):
    from ..classification.runner import RunSpec

    if not 0.0 < args.start_ratio <= 1.0:
        raise ConfigError(f"--start-ratio must be in (0, 1], got {args.start_ratio}")
    tc = {f.name for f in fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.min_lr,
        "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing, "grad_clip": args.grad_clip or None,
        "ema_decay": args.ema_decay, "seed": args.seed, "eval_samples": args.eval_samples or None,
        "num_workers": args.workers, "count_flops": not args.no_flops,
        "stop_after_epochs": getattr(args, "stop_after_epochs", None),
        "proxy_batches": args.proxy_batches, "proxy_batch_size": args.proxy_batch_size,
    }.items() if k in tc})
    return RunSpec(
        method=method, growth=args.growth, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, drop_path=args.drop_path,
        dataset=args.dataset, data_root=args.data_root, subset=args.subset or None, num_stages=args.num_stages,
        start_ratio=args.start_ratio, schedule=args.schedule, search_epochs=args.search_epochs, alpha=args.alpha,
        search_samples=args.search_samples, recycle=not args.no_recycle, time_tolerance=args.time_tolerance, adareg=args.adareg,
        train=train,
    )


def run_classification(args, acc) -> None:
    from ..classification import runner

    if args.command == "pretrain":
        if args.resume:
            runner.pretrain(None, args.resume, acc, resume=True)
            return
        if not args.out:
            raise ConfigError("pretrain needs --out DIR (or --resume DIR)")
        res = runner.pretrain(spec_from_args(args, args.method), args.out, acc)
        s = res["summary"]
        acc.print(f"done: top-1 {s['top1']:.2f} (EMA {s['top1_ema']:.2f}) in {s['wall_time_s']:.1f}s of training; "
                  f"results in {args.out}/results.json")
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        base = spec_from_args(args, "original")
        if args.seeds:
            runner.compare_seeds(base, methods, args.out, parse_seeds(args.seeds), not args.no_budget_baseline, acc)
        else:
            runner.compare(base, methods, args.out, budget_baseline=not args.no_budget_baseline, accelerator=acc)
        acc.print(f"wrote {args.out}/summary.json, summary.md, curves.png")
