"""Diffusion commands of the ``autoprog`` CLI.

* ``autoprog pretrain --task diffusion``: train a base DiT from scratch (default: Fashion-MNIST classes 0-4);
* ``autoprog finetune``: fine-tune a base model with one method (default: AutoProg-Zero to classes 5-9);
* ``autoprog compare --task finetune``: every method side by side, plus ``full@budget``;
* ``autoprog sample``: PNG sample grids per class from a trained model.
"""

from __future__ import annotations

import argparse
import math

from ..diffusion.runner import BaseSpec, DreamBoothSpec, FinetuneSpec, TextBaseSpec, TextFinetuneSpec
from ..errors import ConfigError
from ..methods import FINETUNE
from ..options import add_options, from_args
from .common import (
    add_run_flags,
    front_of,
    positive_int,
    refuse_unused,
    run_compare,
    run_one,
    seed,
)

GROUPS = ("model", "data", "unfreezing", "optimisation", "evaluation")
BASE_EXCLUDE = {"train.proxy_batches", "train.proxy_batch_size", "train.peft_lr", "train.time_source",
                "train.step_time_scope"}


def _add_spec(p: argparse.ArgumentParser, spec_cls, exclude: set[str], command: str) -> None:
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    add_options(p, spec_cls, exclude=exclude, groups=groups)
    add_run_flags(groups["optimisation"], command)


TEXT_BASE_EXCLUDE = BASE_EXCLUDE | {"num_classes", "patch_size", "hidden_size", "depth", "num_heads",
                                    "train.hybrid_loss"}


FINETUNE_SPECS = {"text-to-image": TextFinetuneSpec, "dreambooth": DreamBoothSpec}


def _is_text(args) -> bool:
    return getattr(args, "task", None) == "text-to-image"


def finetune_spec_class(task: str | None):
    """The spec of a fine-tuning ``--task``: class-conditional (the default), text-to-image or dreambooth."""
    return FINETUNE_SPECS.get(task, FinetuneSpec)


def add_finetune_options(p: argparse.ArgumentParser, single: bool, task: str | None = None) -> None:
    """Every option of ``task``'s fine-tuning spec (:func:`finetune_spec_class`); ``single``: one method
    (``finetune``), else a comparison's."""
    _add_spec(p, finetune_spec_class(task),
              set() if single else {"method", "train.stop_after_steps"}, "finetune" if single else "compare")


def add_base_options(p: argparse.ArgumentParser, text: bool = False) -> None:
    """Every :class:`BaseSpec` option (``pretrain --task diffusion``; ``text``: :class:`TextBaseSpec`'s)."""
    _add_spec(p, TextBaseSpec if text else BaseSpec, TEXT_BASE_EXCLUDE if text else BASE_EXCLUDE, "pretrain")


def finetune_spec(args, method: str) -> FinetuneSpec:
    return from_args(finetune_spec_class(getattr(args, "task", None)), args, method=method)


def base_spec(args) -> BaseSpec:
    return from_args(TextBaseSpec if _is_text(args) else BaseSpec, args)


def add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="write PNG sample grids per class from a trained diffusion model",
                       description="Sample with DDIM and classifier-free guidance from a model directory (a run's "
                                   "model/, or a run directory) and write one grid per class plus one of all classes.")
    s.add_argument("model", help="model directory (or a fine-tuning run directory holding model/)")
    s.add_argument("--out", help="output directory (default: beside the model folder, NAME-samples: "
                                 "RUN/model-samples for a run; a model folder is never written into)")
    s.add_argument("--classes", help="class ids (default: the classes the model was trained on; a text-to-image "
                                     "model samples their captions)")
    s.add_argument("--prompt", action="append", help="a text-to-image model: sample this prompt (repeatable; the "
                                                     "stage identifier is appended as in training)")
    s.add_argument("--per-class", type=positive_int, default=16, help="images per class (default: 16)")
    s.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta, 0 = deterministic (default: 1)")
    s.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (default: 4.0, the paper's for visualisation)")
    s.add_argument("--stage", type=positive_int, help="use stage K's identifier (default: the last stage's)")
    s.add_argument("--seed", type=seed, default=0, help="a 32-bit integer (default: 0)")
    s.add_argument("--cpu", action="store_true", help="sample on the CPU even if a GPU is available")


def run_sample(args, acc) -> None:
    import re
    from pathlib import Path

    import torch

    from ..checkpoint import is_model_dir
    from ..diffusion.data import parse_classes
    from ..diffusion.quality import save_grid
    from ..diffusion.sampling import sample
    from ..models.dit import load_backbone

    if not 0 <= args.eta <= 1:
        raise ConfigError(f"--eta must be in [0, 1], got {args.eta}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 1):
        raise ConfigError(f"--cfg-scale must be a finite number of at least 1, got {args.cfg_scale}")

    path = Path(args.model)
    if (path / "model" / "config.json").is_file() or (path / "model" / "unet").is_dir():
        path = path / "model"
    model, meta = load_backbone(path)
    model.to(acc.device)
    if args.stage is not None:
        if model.sid is None:
            raise ConfigError("--stage: this model has no stage identifiers (it was not trained progressively with SID)")
        model.set_stage(args.stage - 1)
    from ..diffusion.runner import conditions_for, decode_samples, saved_class_label

    default_out = path.resolve().parent / f"{path.resolve().name}-samples"  # (never inside a model folder)
    out = Path(args.out) if args.out else default_out
    if args.out and is_model_dir(out):
        raise ConfigError(f"--out {out} is a model folder; sample grids go to a folder of their own "
                          f"(default: {default_out})")
    others = sorted(f.name for f in out.iterdir() if not re.fullmatch(r"(class\d+|prompt\d+|all)\.png", f.name)) \
        if out.is_dir() else []
    if others:
        raise ConfigError(f"--out {out} holds files that are not sample grids ({', '.join(others[:3])}); choose a "
                          "new or empty folder")
    if args.prompt and args.classes:
        raise ConfigError("--classes and --prompt: give one (a text-to-image model samples the prompts, or the "
                          "captions of its classes)")
    if out.is_dir():  # an earlier call's grids (of other classes, or another model) would read as this one's
        for f in out.iterdir():
            if f.is_file():  # (only grids: anything else was refused above)
                f.unlink()
    if args.prompt:
        if model.kind != "text-unet":
            raise ConfigError("--prompt needs a text-to-image model; this one is class-conditional (use --classes)")
        groups = [f"prompt{i + 1}" for i in range(len(args.prompt))]
        names = list(args.prompt)
        conditions = model.tokenize([p for p in args.prompt for _ in range(args.per_class)])
    else:
        size = len(meta.get("captions") or []) if model.kind == "text-unet" else model.num_classes
        classes = parse_classes(args.classes) or tuple(meta.get("classes") or range(size))
        bad = [c for c in classes if not 0 <= c < size]
        if bad:
            raise ConfigError(f"the model has classes 0-{size - 1}; --classes asks for {bad}")
        groups = [f"class{c}" for c in classes]
        names = [saved_class_label(meta, c) for c in classes]
        conditions = conditions_for(model, meta, torch.tensor([c for c in classes for _ in range(args.per_class)]))
    imgs = decode_samples(meta, sample(model, conditions, steps=args.sample_steps, cfg_scale=args.cfg_scale,
                                       seed=args.seed, eta=args.eta), device=acc.device)
    how = f"DDIM {args.sample_steps} steps, guidance {args.cfg_scale:g}" + (
        f", stage {args.stage}" if args.stage is not None else "")
    for i, (group, name) in enumerate(zip(groups, names)):
        save_grid(imgs[i * args.per_class:(i + 1) * args.per_class], out / f"{group}.png",
                  nrow=max(1, int(args.per_class ** 0.5)), title=f"{name} · {how}")
    shown = f"{path.parent.name}/{path.name}" if path.name == "model" else path.name  # a run's model: the run's name
    save_grid(imgs, out / "all.png", nrow=args.per_class, labels=names, title=f"{shown} · {how}")
    acc.print(f"wrote {len(groups)} grid{'s' * (len(groups) != 1)} and all.png to {out}")


def _training_time(summary: dict) -> str:
    """A run's training time for its done line: the search is part of it (the clock runs while candidates are timed)."""
    search = summary.get("search_time_s") or 0
    return f"{summary['wall_time_s']:.1f}s of training" + (f", of which {search:.1f}s search" if search >= 0.05 else "")


def run_diffusion(args, acc) -> None:
    from ..diffusion import runner

    if args.command != "pretrain":  # a base model's training has no methods
        refuse_unused(args, FINETUNE, runner.OPTION_USERS, baseline="full")
    if args.command in ("pretrain", "finetune"):
        base = args.command == "pretrain"
        run_one(args, acc, f"pretrain --task {args.task}" if base else "finetune",
                runner.pretrain_base if base else runner.finetune,
                (lambda: base_spec(args)) if base else (lambda: finetune_spec(args, args.method)),
                lambda s: f"done: {s['metric']} {s[s.get('headline', 'fd')]:.3f} after {s['steps']} steps "
                          f"({_training_time(s)}); model in {args.out}/model")
        return
    spec, front = finetune_spec(args, "full"), front_of(args)
    run_compare(args, acc, lambda methods, budget: runner.compare_finetune(spec, methods, args.out, budget, acc,
                                                                           front),
                lambda methods, seeds, budget: runner.compare_finetune_seeds(spec, methods, args.out, seeds, budget,
                                                                             acc, front),
                "fd_curves.png, front.png, samples.png")
