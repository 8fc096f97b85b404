"""``autoprog`` command line: ``pretrain`` one run, ``compare`` several methods side by side, ``finetune``
a diffusion model, ``sample`` from one.

``--task`` picks the task of ``pretrain`` (classification: a ViT; diffusion: a base DiT) and of ``compare``
(classification: growth schedules; finetune: fine-tuning methods); it must be given on the command line.
Every option has a default; ``autoprog compare`` with no arguments runs the built-in default
comparison on Fashion-MNIST. Options can also come from a YAML file (``--config``) whose keys are the
option names with ``_`` for ``-``; options given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .errors import AutoprogError, ConfigError
from .growth import GROWTH_OPERATORS
from .schedules import METHODS
from .train import TrainConfig

DEFAULT_COMPARE_METHODS = "original,prog,autoprog-one"


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, but mistakes give the one-line ``autoprog: error: ...`` (exit 2) of every other error."""

    def error(self, message: str):
        self.exit(2, f"autoprog: error: {message} (see '{self.prog} --help')\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit",
                   help="'vit' (built-in, timm-style) or 'timm:<name>', e.g. timm:deit_tiny_patch16_224 (default: vit)")
    g.add_argument("--img-size", type=_positive_int, help="full input resolution (default: the dataset's, 224 for timm)")
    g.add_argument("--patch-size", type=_positive_int, help="patch size (built-in default: image size / 4, a 4x4 grid of patches; 7 at 28 px)")
    g.add_argument("--depth", type=_positive_int, help="number of transformer blocks (built-in default 6)")
    g.add_argument("--embed-dim", type=_positive_int, help="embedding width (built-in default 64)")
    g.add_argument("--num-heads", type=_positive_int, help="attention heads (built-in default 4)")
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
    g.add_argument("--num-stages", type=_positive_int, default=4, help="number of stages (default: 4)")
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
    g.add_argument("--search-samples", type=_positive_int, default=1024,
                   help="training images (fixed, not augmented) on which candidates' losses are measured (default: 1024)")
    g.add_argument("--no-recycle", action="store_true",
                   help="retrain the chosen sub-network from the stage's starting weights instead of inheriting "
                        "the supernet's (the ablation of Table 11; the search epochs become extra cost)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"training epochs (default: {d.epochs:g})")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
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


TASKS = {"pretrain": ("classification", "diffusion"), "compare": ("classification", "finetune")}


def _task_flag(p: argparse.ArgumentParser, command: str) -> None:
    other = TASKS[command][1]
    p.add_argument("--task", choices=TASKS[command], default="classification",
                   help=f"classification (default) or {other}; see 'autoprog {command} --task {other} --help' "
                        "for that task's options")


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``task`` selects the option set of ``pretrain``/``compare`` (see the module docstring)."""
    from . import cli_diffusion

    parser = _Parser(
        prog="autoprog",
        description="Automated progressive learning: train vision transformers faster by growing them "
                    "(patches and depth) during training, and fine-tune diffusion models faster by "
                    "unfreezing them progressively.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    if task == "diffusion":
        p = sub.add_parser("pretrain", help="train one model",
                           description="Train a base class-conditional DiT from scratch (default: Fashion-MNIST "
                                       "classes 0-4), to fine-tune later. Writes OUT/model (config.json + "
                                       "safetensors), OUT/results.json and a resumable checkpoint.")
        _task_flag(p, "pretrain")
        p.add_argument("--out", help="output directory (required unless --resume)")
        p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
        p.add_argument("--stop-after-steps", type=_positive_int, help="stop at the first evaluation point after "
                                                                      "this many steps (continue with --resume)")
        cli_diffusion.add_base_options(p)
    else:
        p = sub.add_parser("pretrain", help="train one model with a growth schedule (--task diffusion: a base DiT)",
                           description="Pre-train a ViT with a growth schedule. Writes OUT/results.json, "
                                       "OUT/schedule.json and a resumable checkpoint in OUT/checkpoint/.")
        _task_flag(p, "pretrain")
        _add_pretrain_options(p)

    if task == "finetune":
        from .diffusion.runner import DEFAULT_COMPARE

        c = sub.add_parser("compare", help="train several methods side by side",
                           description="Fine-tune the base model with each method (same data, seed and steps), "
                                       "plus full@budget: full fine-tuning stopped at the wall-clock of the fastest "
                                       "progressive method with its learning rate decayed by then. Writes "
                                       "OUT/summary.json, summary.md (Table 6 style), fd_curves.png (Fig. 8 style) "
                                       "and samples.png. Re-running with the same --out reuses finished runs.")
        _task_flag(c, "compare")
        c.add_argument("--methods", default=",".join(DEFAULT_COMPARE),
                       help=f"comma-separated methods; full is required (default: {','.join(DEFAULT_COMPARE)})")
        c.add_argument("--out", default="runs/finetune", help="output directory (default: runs/finetune)")
        c.add_argument("--no-budget-baseline", action="store_true", help="skip the full@budget run")
        c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, mean ± std "
                                      "in OUT/summary.json and summary.md (overrides --seed)")
        cli_diffusion.add_finetune_options(c, single=False)
    else:
        c = sub.add_parser("compare", help="train several methods side by side (--task finetune: fine-tuning methods)",
                           description="Train each method with the same seed, data and settings; write "
                                       "OUT/summary.json, OUT/summary.md and OUT/curves.png. With no arguments: the "
                                       "built-in default comparison on Fashion-MNIST. Re-running with the same "
                                       "--out reuses finished runs and resumes unfinished ones.")
        _task_flag(c, "compare")
        _add_compare_options(c)

    f = sub.add_parser("finetune", help="fine-tune a diffusion model with one method",
                       description="Fine-tune a pre-trained class-conditional DiT (default: the shipped base model, "
                                   "to Fashion-MNIST classes 5-9). Writes OUT/model, OUT/results.json (FD curve, "
                                   "search tables), OUT/schedule.json and a resumable checkpoint.")
    f.add_argument("--out", help="output directory (required unless --resume)")
    f.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    f.add_argument("--stop-after-steps", type=_positive_int,
                   help="stop at the first evaluation point after this many steps (continue with --resume)")
    cli_diffusion.add_finetune_options(f, single=True)
    cli_diffusion.add_sample_parser(sub)
    return parser


def _add_pretrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="prog",
                   help="original (full model), prog (uniform linear growth), progstack (progressive stacking), "
                        "fixed (replay --schedule), autoprog-one (automatic schedule by one-shot search) "
                        "(default: prog)")
    p.add_argument("--out", help="output directory (required unless --resume)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--stop-after-epochs", type=_positive_int,
                   help="stop after this many epochs, keeping the checkpoint (continue with --resume)")
    _add_common(p)


def _add_compare_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--methods", default=DEFAULT_COMPARE_METHODS,
                   help=f"comma-separated methods; original is always included (default: {DEFAULT_COMPARE_METHODS})")
    c.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    c.add_argument("--no-budget-baseline", action="store_true",
                   help="skip original@budget: the original trained for the wall-clock of the fastest "
                        "progressive method, with its learning rate fully decayed in that time")
    c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, and mean ± std "
                                  "in OUT/summary.json and summary.md (overrides --seed)")
    _add_common(c)


def _config_argv(parser: argparse.ArgumentParser, command: str, path: str) -> list[str]:
    """Turn a YAML config into command-line tokens, so argparse checks types and choices as for flags."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of option: value")
    sub = parser._subparsers._group_actions[0].choices[command]
    actions = {a.dest: a for a in sub._actions if a.option_strings}
    argv = []
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true switches
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"--config {path}: {key} needs a single value, got {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` → ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def task_of(argv: list[str]) -> str | None:
    """The ``--task`` value on the command line, if any (it chooses which options the command has)."""
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--task="):
            return a.split("=", 1)[1]
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # config values first, so flags given on the command line (parsed later) win
        cfg = _config_argv(parser, args.command, args.config)
        args = parser.parse_args([args.command, *cfg, *argv[argv.index(args.command) + 1:]])
    return args


def spec_from_args(args: argparse.Namespace, method: str):
    from .runner import RunSpec

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
    }.items() if k in tc})
    return RunSpec(
        method=method, growth=args.growth, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
        depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, drop_path=args.drop_path,
        dataset=args.dataset, data_root=args.data_root, subset=args.subset or None, num_stages=args.num_stages,
        start_ratio=args.start_ratio, schedule=args.schedule, search_epochs=args.search_epochs, alpha=args.alpha,
        search_samples=args.search_samples, recycle=not args.no_recycle, adareg=args.adareg, train=train,
    )


def _run(args, acc) -> int:
    from . import cli_diffusion, runner

    if args.command == "sample":
        cli_diffusion.run_sample(args, acc)
        return 0
    if args.command == "finetune" or getattr(args, "task", "classification") != "classification":
        cli_diffusion.run_diffusion(args, acc)
        return 0
    if args.command == "pretrain":
        if args.resume:
            runner.pretrain(None, args.resume, acc, resume=True)
            return 0
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
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(task_of(argv))
    try:
        args = _parse(parser, argv)
        if args.command is None:
            parser.print_help()
            return 2
        from accelerate import Accelerator

        acc = Accelerator(mixed_precision=getattr(args, "mixed_precision", "no"), cpu=getattr(args, "cpu", False))
        try:
            return _run(args, acc)
        finally:
            # tear the process group down before exit: a gloo group left to interpreter shutdown can abort
            # rank 0 ("terminate called without an active exception") after a successful run
            if acc.num_processes > 1:
                acc.end_training()
    except AutoprogError as e:
        print(f"autoprog: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprog: interrupted; the last checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
