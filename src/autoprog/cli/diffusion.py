"""Diffusion commands of the ``autoprog`` CLI.

* ``autoprog pretrain --task diffusion``: train a base DiT from scratch (default: Fashion-MNIST classes 0-4);
* ``autoprog finetune``: fine-tune a base model with one method (default: AutoProg-Zero to classes 5-9);
* ``autoprog compare --task finetune``: every method side by side, plus ``full@budget``;
* ``autoprog sample``: PNG sample grids per class from a trained model.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import parse_seeds, positive_int


def _add_optim(p, d) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"batch size per process (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate, cosine-decayed to --min-lr (default: {d.lr:g})")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help=f"(default: {d.min_lr:g})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"(default: {d.warmup_steps})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off (default: {d.grad_clip:g})")
    g.add_argument("--class-dropout", type=float, default=d.class_dropout,
                   help=f"fraction of labels replaced by the null class, for classifier-free guidance (default: {d.class_dropout:g})")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="evaluate and export an EMA of the weights with this decay (default: "
                        + ("none" if d.ema_decay is None else f"{d.ema_decay:g}") + ")")
    g.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="mixed precision through Accelerate (default: no)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-points", type=positive_int, default=d.eval_points,
                   help=f"FD measurements during training, evenly spaced, the last at the end (default: {d.eval_points})")
    g.add_argument("--curve-samples", type=positive_int, default=d.curve_samples,
                   help=f"generated images per intermediate measurement (default: {d.curve_samples})")
    g.add_argument("--fd-samples", type=positive_int, default=d.fd_samples,
                   help=f"generated images for the final FD/KID (default: {d.fd_samples})")
    g.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help=f"DDIM steps (default: {d.sample_steps})")
    g.add_argument("--eta", type=float, default=d.sample_eta,
                   help="DDIM eta: 0 deterministic, 1 ancestral noise at every step; small CPU-trained models "
                        f"sample far better with 1 (default: {d.sample_eta:g})")
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                   help=f"classifier-free guidance scale for evaluation (default: {d.cfg_scale:g}, as the paper)")
    g.add_argument("--fid-weights", metavar="PATH",
                   help="a local Inception checkpoint (torch-fidelity's pt_inception-2015-12-05): report real FID. "
                        "Without it: FD on the features of a classifier autoprog trains on the dataset and caches")
    g.add_argument("--feature-epochs", type=positive_int, default=3, help="epochs of that feature classifier (default: 3)")
    g.add_argument("--cache-dir", help="where the feature classifier is cached (default: $AUTOPROG_CACHE or ~/.cache/autoprog)")
    g.add_argument("--config", help="YAML file of option values (keys: option names with '_')")


def _add_data(p, classes: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist, digits, or a path to an ImageFolder directory (train/ and val/) (default: fashion-mnist)")
    g.add_argument("--data-root", help="where Fashion-MNIST's .gz files are (default: /usr/share/datasets/fashion-mnist)")
    g.add_argument("--classes", default=classes, help=f"class ids to train on, e.g. 5-9 or 0,2,4, or 'all' (default: {classes})")
    g.add_argument("--subset", type=int, default=0, help="train on this many images (fixed random subset; 0 = all) (default: 0)")
    g.add_argument("--image-size", type=positive_int, help="resize images to this size (default: the dataset's; 32 for ImageFolder)")
    g.add_argument("--vae", metavar="PATH",
                   help="a local diffusers AutoencoderKL directory: train in its latent space (latents are cached); "
                        "fine-tuning uses the base model's VAE by default")


def add_finetune_options(p: argparse.ArgumentParser, single: bool) -> None:
    from ..diffusion.methods import FINETUNE_METHODS
    from ..diffusion.trainer import DiffusionConfig

    if single:
        p.add_argument("--method", default="autoprog-zero",
                       help="full, bitfit, difffit, lora (lora-rN for rank N), prog (uniform linear unfreezing), "
                            "autoprog-one (supernet-loss search), autoprog-zero (zero-shot search); a -nosid suffix "
                            f"drops the stage identifier. Known: {', '.join(FINETUNE_METHODS)} (default: autoprog-zero)")
    p.add_argument("--base", metavar="PATH",
                   help="base model directory (autoprog's model/ or a diffusers DiTTransformer2DModel folder) "
                        "(default: the shipped DiT pre-trained on Fashion-MNIST classes 0-4)")
    _add_data(p, "5-9")
    g = p.add_argument_group("unfreezing")
    g.add_argument("--num-stages", type=positive_int, default=4, help="stages of progressive unfreezing (default: 4)")
    g.add_argument("--start-ratio", type=float, default=0.25,
                   help="first stage's share of input patches per side and learnable blocks (default: 0.25, Sec. 5.1.2)")
    g.add_argument("--schedule", help="unfreezing schedule to replay with --method prog: a schedule.json, or inline "
                                           "RESxLEARNABLE_BLOCKS per stage, e.g. 16x6,20x6,24x6,28x6")
    g.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank for --method lora (default: 8)")
    g.add_argument("--search-fraction", type=float, default=0.25,
                   help="autoprog-one: share of each stage spent sampling candidates (default: 0.25)")
    g.add_argument("--time-tolerance", type=float, default=0.05,
                   help="autoprog-zero: step times within this relative difference tie on the time ballot, so "
                        "timing noise does not decide the vote (default: 0.05; 0 = the paper's exact ranking)")
    g.add_argument("--alpha", type=float, help="autoprog-one: runtime exponent of L*T^alpha (default: balanced per stage)")
    g.add_argument("--proxy-batches", type=int, default=4, help="autoprog-zero: batches for NTK/ZiCo (default: 4)")
    g.add_argument("--proxy-batch-size", type=positive_int, default=8, help="autoprog-zero: samples per proxy batch (default: 8)")
    g.add_argument("--peft-lr", type=float,
                   help="learning rate of bitfit, difffit and lora, which train few parameters (default: 10 × --lr)")
    _add_optim(p, DiffusionConfig())


def add_base_options(p: argparse.ArgumentParser) -> None:
    from ..diffusion.runner import BaseSpec

    d = BaseSpec()
    p.add_argument("--backbone", choices=["dit", "diffusers-dit"], default=d.backbone,
                   help="built-in DiT or diffusers' DiTTransformer2DModel (default: dit)")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=positive_int, default=d.patch_size, help=f"(default: {d.patch_size})")
    g.add_argument("--hidden-size", type=positive_int, default=d.hidden_size, help=f"(default: {d.hidden_size})")
    g.add_argument("--depth", type=positive_int, default=d.depth, help=f"transformer blocks (default: {d.depth})")
    g.add_argument("--num-heads", type=positive_int, default=d.num_heads, help=f"(default: {d.num_heads})")
    g.add_argument("--num-classes", type=positive_int, help="size of the class table (default: the dataset's, so that "
                                                    "fine-tuning can add the other classes)")
    _add_data(p, d.classes)
    _add_optim(p, d.train)


def _train_config(args, base):
    from dataclasses import replace

    return replace(
        base, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        class_dropout=args.class_dropout, ema_decay=args.ema_decay, seed=args.seed, eval_points=args.eval_points,
        curve_samples=args.curve_samples, fd_samples=args.fd_samples, sample_steps=args.sample_steps,
        sample_eta=args.eta,
        cfg_scale=args.cfg_scale, stop_after_steps=getattr(args, "stop_after_steps", None),
        **({"proxy_batches": args.proxy_batches, "proxy_batch_size": args.proxy_batch_size, "peft_lr": args.peft_lr}
           if hasattr(args, "proxy_batches") else {}),
    )


def finetune_spec(args, method: str):
    from ..diffusion.runner import FinetuneSpec
    from ..diffusion.trainer import DiffusionConfig

    if not 0 < args.start_ratio <= 1:
        raise ConfigError(f"--start-ratio must be in (0, 1], got {args.start_ratio}")
    if not 0 <= args.time_tolerance < 1:
        raise ConfigError(f"--time-tolerance must be in [0, 1), got {args.time_tolerance}")
    return FinetuneSpec(
        method=method, base=args.base, dataset=args.dataset, data_root=args.data_root, classes=args.classes,
        subset=args.subset or None, image_size=args.image_size, vae=args.vae, num_stages=args.num_stages,
        start_ratio=args.start_ratio, lora_rank=args.lora_rank, schedule=args.schedule,
        search_fraction=args.search_fraction, alpha=args.alpha, time_tolerance=args.time_tolerance, fid_weights=args.fid_weights,
        feature_epochs=args.feature_epochs, cache_dir=args.cache_dir, train=_train_config(args, DiffusionConfig()),
    )


def base_spec(args):
    from ..diffusion.runner import BaseSpec

    d = BaseSpec()
    return BaseSpec(
        backbone=args.backbone, dataset=args.dataset, data_root=args.data_root, classes=args.classes,
        num_classes=args.num_classes, image_size=args.image_size, vae=args.vae, patch_size=args.patch_size,
        hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads, fid_weights=args.fid_weights,
        feature_epochs=args.feature_epochs, cache_dir=args.cache_dir, train=_train_config(args, d.train),
    )


def add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="write PNG sample grids per class from a trained diffusion model",
                       description="Sample with DDIM and classifier-free guidance from a model directory (a run's "
                                   "model/, or a run directory) and write one grid per class plus one of all classes.")
    s.add_argument("model", help="model directory (or a fine-tuning run directory holding model/)")
    s.add_argument("--out", help="output directory (default: MODEL/samples)")
    s.add_argument("--classes", help="class ids (default: the classes the model was trained on)")
    s.add_argument("--per-class", type=positive_int, default=16, help="images per class (default: 16)")
    s.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta, 0 = deterministic (default: 1)")
    s.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (default: 4.0, the paper's for visualisation)")
    s.add_argument("--stage", type=positive_int, help="use stage K's identifier (default: the last stage's)")
    s.add_argument("--seed", type=int, default=0, help="(default: 0)")


def run_sample(args, acc) -> None:
    from pathlib import Path

    import torch

    from ..diffusion.data import parse_classes
    from ..diffusion.quality import save_grid
    from ..diffusion.sampling import sample
    from ..models.dit import load_backbone

    path = Path(args.model)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    model, meta = load_backbone(path)
    model.to(acc.device)
    if args.stage is not None:
        if model.sid is None:
            raise ConfigError("--stage: this model has no stage identifiers (it was not trained progressively with SID)")
        model.set_stage(args.stage - 1)
    classes = parse_classes(args.classes) or tuple(meta.get("classes") or range(model.num_classes))
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ConfigError(f"the model has classes 0-{model.num_classes - 1}; --classes asks for {bad}")
    out = Path(args.out) if args.out else path / "samples"
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)])
    from ..diffusion.runner import decode_samples

    imgs = decode_samples(meta, sample(model, labels, steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed,
                                       eta=args.eta))
    for i, c in enumerate(classes):
        save_grid(imgs[i * args.per_class:(i + 1) * args.per_class], out / f"class{c}.png",
                  nrow=max(1, int(args.per_class ** 0.5)))
    save_grid(imgs, out / "all.png", nrow=args.per_class)
    acc.print(f"wrote {len(classes)} class grids and all.png to {out}")


def run_diffusion(args, acc) -> None:
    from ..diffusion import runner

    if args.command == "pretrain":
        if args.resume:
            runner.pretrain_base(None, args.resume, acc, resume=True)
            return
        if not args.out:
            raise ConfigError("pretrain --task diffusion needs --out DIR (or --resume DIR)")
        res = runner.pretrain_base(base_spec(args), args.out, acc)
        s = res["summary"]
        acc.print(f"done: {s['metric']} {s['fd']:.3f} after {s['steps']} steps ({s['wall_time_s']:.0f}s); "
                  f"model in {args.out}/model")
    elif args.command == "finetune":
        if args.resume:
            runner.finetune(None, args.resume, acc, resume=True)
            return
        if not args.out:
            raise ConfigError("finetune needs --out DIR (or --resume DIR)")
        res = runner.finetune(finetune_spec(args, args.method), args.out, acc)
        s = res["summary"]
        acc.print(f"done: {s['metric']} {s['fd']:.3f} in {s['wall_time_s']:.1f}s of training "
                  f"(search {s['search_time_s']:.1f}s); model in {args.out}/model")
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        spec = finetune_spec(args, "full")
        if args.seeds:
            runner.compare_finetune_seeds(methods, spec, args.out, parse_seeds(args.seeds), not args.no_budget_baseline,
                                          acc)
        else:
            runner.compare_finetune(methods, spec, args.out, not args.no_budget_baseline, acc)
        acc.print(f"wrote {args.out}/summary.json, summary.md, fd_curves.png, samples.png")
