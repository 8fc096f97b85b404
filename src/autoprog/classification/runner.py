"""Library entry points: one pre-training run (:func:`pretrain`) and a side-by-side comparison (:func:`compare`).

The defaults of :class:`RunSpec` and :class:`~autoprog.classification.trainer.TrainConfig` are the built-in default
experiment: a ViT on a 10k-image Fashion-MNIST subset, sized to run on a 2-core CPU in minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..accelerator import launch_env
from ..adapters.factory import ModelOverrides, build_elastic, model_eval_crop
from ..algorithms.autoprog_one import AutoProgOneConfig
from ..algorithms.autoprog_zero import time_tolerance_option
from ..algorithms.growth import COPIES, GROWTH_OPERATORS, PAPER_EMA_DECAY, KeepWeights, get_growth_operator
from ..budget import Budget, warn_unread_length
from ..checkpoint import comparison_dir, new_run_dir, no_empty_folder_left, write_json
from ..data import LEGACY_CROPS, EvalCrop, builtin_dataset, dataset_identity, is_image_folder, load_dataset
from ..engine import broadcast
from ..errors import AutoprogError, ConfigError, warn
from ..experiment import (
    add_speedups,
    budget_matched_run,
    check_seeds,
    comparison_row,
    diverged_rows,
    drop_stale_budget_run,
    front_runs,
    input_paths,
    method_list,
    read_run_config,
    reuse_or_run,
    run_methods,
    saved_differences,
    seed_rows,
    seed_speedup,
)
from ..formats import read_json_object
from ..front import DEFAULT_FRONT
from ..methods import PRETRAIN, TRANSFER, SearchSettings, get_method, method_names, methods_help
from ..optim import warn_long_warmup
from ..options import MAX_IMAGE_SIZE, Spec, default, option
from ..report import plot_curves, plot_front, schedule_string, with_reading
from ..schedules import build_schedule
from .adareg import RULES
from .pretrained import build_args_of, load_pretrained, locate, pretrained_resolution
from .recipe import check_recipe
from .report import seeds_markdown, summary_markdown
from .token_labels import prepare_token_labels
from .trainer import MAX_EPOCHS, TrainConfig, Trainer

# Training images a pre-training run takes when --subset is not given: the built-in CPU experiment's 10k of
# Fashion-MNIST; any other dataset (digits, a folder of the user's own) whole.
DEFAULT_SUBSET = {"fashion-mnist": 10000}
DATASET_DEFAULT = -1  # RunSpec.subset: the dataset's default (None, as ever, is all)


@dataclass
class RunSpec(Spec, AutoProgOneConfig):
    """Everything that defines a pre-training run besides the output directory (AutoProg-One's settings from
    :class:`AutoProgOneConfig`, their only declaration)."""

    settings_name = "run settings"
    task = "classification"  # config.json's task (see experiment.RUN_KINDS)
    method_task = PRETRAIN  # the method registry's task
    baseline = "original"  # the method whose front a comparison measures against

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """A saved spec; one made before 2026-12-05 (no ``train.ema_rescale``) keeps what it ran: the built-in ViT's
        4×4 default grid, the per-epoch momentum when none was given (an explicit one was per step), and
        AutoProg-One's earlier rules (:data:`BEFORE_2026_12_05`), so resuming or reusing it changes nothing; one made
        before ``--crop-scale`` cropped ImageFolder images at 0.35 of their area and up; one made before
        ``--train-interpolation`` keeps autoprog's crops of then (``legacy``: torchvision's, bilinear; evaluation
        images resized to 1.14x, bilinearly); one made before ``--adareg-rule`` keeps AdaReg's size rule; one made
        before ``--growth-copies`` its evenly spread copies and a first supernet of random blocks."""
        d = json.loads(json.dumps(d))
        if isinstance(d, dict) and "growth_copies" not in d and cls.task == RunSpec.task:  # (fine-tuning: no growth)
            d["growth_copies"] = "spread"  # made before --growth-copies (2026-12-08): copies spread evenly,
            d.setdefault("first_supernet", "random")  # the first supernet the full model's initial blocks
        if isinstance(d, dict) and d.get("adareg"):
            d.setdefault("adareg_rule", "size")  # made before --adareg-rule (2026-12-07): AdaReg by the sub-network's size
        train = d.get("train") if isinstance(d, dict) else None
        if isinstance(train, dict):
            if "loader_resolution" in train and train["loader_resolution"] is None:
                train["loader_resolution"] = "stage"  # saved unset for some hours of 2026-12-07: it meant stage
            train.setdefault("crop_scale", 0.35)  # made before --crop-scale: ImageFolder crops of 0.35 and up
            train.setdefault("train_interpolation", LEGACY_CROPS)  # made before 2026-12-07: autoprog's own crops
        if isinstance(train, dict) and "ema_rescale" not in train:
            train["ema_rescale"] = train.get("ema_decay") is None
            if train.get("ema_decay") is None:
                train["ema_decay"] = PAPER_EMA_DECAY
            for key, old in BEFORE_2026_12_05.items():
                d.setdefault(key, old)
        return super().from_dict(d, where)

    method: str = option("prog", methods_help(PRETRAIN), choices=method_names(PRETRAIN))
    growth: str | None = option(None, "growth operator (default: mogrow; stacking for progstack)",
                                choices=sorted(GROWTH_OPERATORS), show_default=False, group="growth")
    growth_copies: str = option("last", "which blocks a growth by interpolation (mogrow, interpolation, identity) "
                                        "copies: last (the last l_new mod l_old blocks get one more copy each, as the "
                                        "official code and the supernet's layout: 9 -> 12 copies blocks 6, 7, 8) or "
                                        "spread (copies spread evenly, Eq. 22 read literally: 9 -> 12 copies 2, 5, 8; "
                                        "autoprog's rule before 2026-12-08)", choices=COPIES, group="growth")
    model: str = option("vit", "'vit' (built-in, timm-style) or 'timm:<name>' of a family autoprog grows: ViT/DeiT/"
                               "DeiT III (timm:deit_tiny_patch16_224), Eva (timm:eva02_tiny_patch14_224), VOLO "
                               "(timm:volo_d1_224; its depth counts outlookers and transformers)",
                        group="model")
    img_size: int | None = option(None, "full input resolution (default: the dataset's, 28 for Fashion-MNIST, 8 "
                                        "for digits, 32 for an ImageFolder; a timm model's own, e.g. 224)", minimum=1,
                                  maximum=MAX_IMAGE_SIZE,
                                  show_default=False, group="model")
    builtin_grid: int = option(7, "the built-in ViT's least grid of patches when --patch-size is not given",
                               minimum=1, cli=False)
    patch_size: int | None = option(None, "patch size (built-in default: the largest that leaves at least a 7x7 "
                                          "grid, 4 at 28 px; 7 gives the 4x4 grid of the plateau regime)", minimum=1,
                                    show_default=False, group="model")
    depth: int | None = option(None, "number of transformer blocks (built-in default 6)", minimum=1,
                               show_default=False, group="model")
    embed_dim: int | None = option(None, "embedding width (built-in default 64)", minimum=1, show_default=False,
                                   group="model")
    num_heads: int | None = option(None, "attention heads (built-in default 4)", minimum=1, show_default=False,
                                   group="model")
    drop_path: float = option(0.0, "stochastic depth rate", minimum=0, below=1, group="model")
    dataset: str = option("fashion-mnist", "fashion-mnist, digits, or a path to an ImageFolder directory (train/ "
                                           "and val/)", group="data")
    data_root: str | None = option(None, "where Fashion-MNIST's .gz files are (default: "
                                         "/usr/share/datasets/fashion-mnist)", show_default=False, group="data")
    subset: int | None = option(DATASET_DEFAULT, "train on this many training images (a fixed random subset; 0 = "
                                                 f"all; default ({DATASET_DEFAULT}): "
                                                 f"{DEFAULT_SUBSET['fashion-mnist']} of Fashion-MNIST's 60000, all "
                                                 "of another dataset)", minimum=DATASET_DEFAULT, zero_is_none=True,
                                show_default=False, group="data")
    num_stages: int = option(4, "number of stages", minimum=1, group="growth")
    start_ratio: float = option(0.5, "initial scaling ratio s1 of patches and depth: 0.5, 0.4 or 0.25", above=0,
                                maximum=1, group="growth")
    schedule: str | None = option(None, "schedule to replay with --method fixed: a schedule.json, or inline RESxDEPTH "
                                        "per stage, e.g. 16x4,20x5,24x7,28x8 (equal stages) or 16x8@0.5,28x8@0.5 "
                                        "(shares of the steps, scaled to sum to 1)",
                                  show_default=False, group="growth")
    time_tolerance: float = time_tolerance_option("AutoProg-Zero search")
    adareg: bool = option(False, "adaptive regularization: RandAugment magnitude (4.5-9), random-erasing "
                                 "probability (0-0.25) and drop-path rate (0-0.1) grow linearly over training "
                                 "(Table 14), by --adareg-rule", group="growth")
    adareg_rule: str = option("stage", "how --adareg's strengths grow: stage (the official code: by stage index, "
                                       "the magnitude an integer, RandAugment rand-mM-mstd0.5-inc1 filled with the "
                                       "data's mean, a supernet phase at the final strengths) or size (autoprog's "
                                       "earlier rule: by the sub-network's patches x depth, every supernet candidate "
                                       "its own; rand-m9-n2-mstd0.5 with a grey fill)", choices=RULES,
                              group="growth")
    train: TrainConfig = option(default_factory=TrainConfig)

    @property
    def train_subset(self) -> int | None:
        """How many training images the run takes (None: all): ``subset``, or at :data:`DATASET_DEFAULT` the
        dataset's default (:data:`DEFAULT_SUBSET`; a folder of the user's own is used whole)."""
        n = DEFAULT_SUBSET.get(builtin_dataset(self.dataset)) if self.subset == DATASET_DEFAULT else self.subset
        return n or None

    def to_dict(self) -> dict:
        """The spec as saved: ``subset`` as the run takes it (null: all), so that a saved run names its images."""
        return {**super().to_dict(), "subset": self.train_subset}



# What a saved spec from before 2026-12-05 ran with, where the default changed since (see RunSpec.from_dict).
# Its later Λ_k still differs: depths were then the previous one + 0..3 as plain integers.
BEFORE_2026_12_05 = {"builtin_grid": 4, "search_min_updates": 0, "alpha_rule": "balanced",
                     "score_points": 1, "score_momentum": False, "supernet_sampling": "random",
                     "search_step_time": "probe"}


SHIPPED_VIT = Path(__file__).resolve().parent.parent / "assets" / "vit-fmnist-base"


@dataclass
class TransferTrainConfig(TrainConfig):
    """Fine-tuning's optimisation defaults (the other settings as in pre-training)."""

    epochs: float = option(10.0, "fine-tuning epochs", above=0, maximum=MAX_EPOCHS, group="optimisation")
    batch_size: int = default(TrainConfig, "batch_size", 64)
    lr: float = default(TrainConfig, "lr", 5e-4)


@dataclass
class TransferSpec(RunSpec):
    """A pre-trained classifier fine-tuned on another dataset (Table 4's transfer): ``full`` trains the whole model
    from the first step; ``prog`` and ``autoprog-zero`` unfreeze it progressively, ψ = (input resolution, learnable
    blocks counted from the output side), the head always learning. The architecture comes from ``base``."""

    settings_name = "fine-tuning settings"
    task = "transfer"
    method_task = TRANSFER
    baseline = "full"

    method: str = option("full", methods_help(TRANSFER), choices=method_names(TRANSFER))
    base: str | None = option(None, "the pre-trained classifier: an autoprog model folder (a pre-training run's "
                                    "OUT/model, or the run folder), a timm checkpoint folder (config.json with "
                                    "'architecture' and model.safetensors or pytorch_model.bin), or a weights file "
                                    "with --model timm:NAME; never downloaded (default: the shipped built-in ViT "
                                    "pre-trained on Fashion-MNIST)", show_default=False, group="model")
    model: str = option("vit", "with a weights file as --base: its architecture, timm:NAME (a folder names its own)",
                        group="model")
    dataset: str = option("digits", "the dataset to fine-tune on: digits (scikit-learn's, the default transfer "
                                    "task), fashion-mnist, or an ImageFolder directory (train/ and val/); images "
                                    "are resized to the base model's resolution", group="data")
    subset: int | None = option(None, "fine-tune on this many training images (fixed random subset; default: all)",
                                minimum=0, zero_is_none=True, show_default=False, group="data")
    start_ratio: float = option(0.25, "unfreezing's first sub-network as a ratio of input patches per side and of "
                                      "learnable blocks (the paper's fine-tuning 0.25)", above=0, maximum=1,
                                group="growth")
    train: TransferTrainConfig = option(default_factory=TransferTrainConfig)

    @property
    def base_path(self) -> str:
        return self.base or str(SHIPPED_VIT)

    @property
    def train_subset(self) -> int | None:
        return self.subset or None

    def to_dict(self) -> dict:
        return {"task": self.task, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k != "task"}
        return super().from_dict(d, where)


# RunSpec options a fine-tuning run takes from its base or does not have (no flag for them)
TRANSFER_EXCLUDE = {"growth", "growth_copies", "img_size", "patch_size", "depth", "embed_dim", "num_heads",
                    "drop_path", "schedule", "adareg", "adareg_rule"}


def _warn_long_warmup(spec: RunSpec) -> None:
    """--warmup-epochs over half of --epochs (a run of its own length: not a budget's, nor a front's max_steps)."""
    train = spec.train
    if train.max_steps is None and Budget.from_options(train.budget, train.budget_steps) is None:
        warn_long_warmup("--warmup-epochs", train.warmup_epochs, type(spec)().train.warmup_epochs, train.epochs,
                         "epochs")


def build_run(spec: RunSpec):
    """Load data, build the elastic model, the schedule and the growth operator for ``spec`` (a
    :class:`TransferSpec`: the pre-trained model with a new head, unfreezing instead of growing)."""
    if isinstance(spec, TransferSpec):
        return _build_transfer(spec)
    chosen = get_method(spec.method, PRETRAIN)
    if spec.adareg:
        check_recipe(spec.train, adareg=True)
    elif spec.adareg_rule != "stage":
        warn(f"--adareg-rule {spec.adareg_rule} set without --adareg: unread", once=True)
    warn_unread_length(spec.train, type(spec)().train, "epochs")
    _warn_long_warmup(spec)
    data = load_dataset(spec.dataset, spec.data_root, spec.train_subset, spec.img_size,
                        randaugment=spec.train.randaugment, crop_scale=spec.train.crop_scale,
                        interpolation=spec.train.train_interpolation, eval_crop=eval_crop(spec.train, spec.model))
    img_size = spec.img_size
    if img_size is None and spec.model == "vit":
        img_size = data.image_size
    overrides = ModelOverrides(img_size, spec.patch_size, spec.depth, spec.embed_dim, spec.num_heads, spec.drop_path,
                               grid=spec.builtin_grid)
    net = build_elastic(spec.model, data.num_classes, data.in_chans, overrides)
    net.build_args = build_args_of(spec.model, overrides, net)  # the model folder the run writes records them
    data = prepare_token_labels(spec.train, data, net)
    space = net.growth_space(spec.num_stages, spec.start_ratio)
    if chosen.base == "autoprog-one":
        from ..algorithms.autoprog_one import AutoProgOne

        cfg = AutoProgOneConfig(**{f.name: getattr(spec, f.name) for f in fields(AutoProgOneConfig)})
        cfg = replace(cfg, criterion=chosen.options.get("criterion", spec.criterion),
                      search_step_time="probe" if spec.train.time_source == "flops" else spec.search_step_time)
        schedule = AutoProgOne(space, cfg, seed=spec.train.seed)
        return data, net, schedule, _growth_operator(spec)
    if chosen.base == "autoprog-zero":
        from ..algorithms.autoprog_zero import AutoProgZero

        if not 0 <= spec.time_tolerance < 1:
            raise ConfigError(f"--time-tolerance must be in [0, 1), got {spec.time_tolerance}")
        return data, net, AutoProgZero(space, time_rtol=spec.time_tolerance,
                                       criterion=chosen.options.get("criterion", spec.criterion),
                                       gain_folds=spec.gain_folds), \
            _growth_operator(spec)
    if chosen.base == "supernet-only":
        from ..algorithms.supernet import SupernetOnly

        return data, net, SupernetOnly(space, seed=spec.train.seed), _growth_operator(spec)
    schedule = build_schedule(spec.method, space, spec.schedule)
    growth = _growth_operator(spec, schedule.default_growth)
    schedule = replace(schedule, default_growth=growth.name)  # schedule.json records the operator used
    return data, net, schedule, growth


def _growth_operator(spec: RunSpec, default: str = "mogrow"):
    """The growth operator a run grows with: ``--growth``, else the method's, with ``--growth-copies``."""
    return get_growth_operator(spec.growth or default, spec.growth_copies)


def eval_crop(train: TrainConfig, model: str, pretrained_cfg: dict | None = None) -> EvalCrop:
    """ImageFolder evaluation crops: ``--eval-crop-pct`` and ``--eval-interpolation``, or the model's (a timm
    checkpoint's own ``pretrained_cfg`` first)."""
    if train.train_interpolation == LEGACY_CROPS and (train.eval_crop_pct or train.eval_interpolation):
        raise ConfigError("--train-interpolation legacy evaluates as autoprog did before 2026-12-07 (resized to 1.14x, "
                          "bilinearly): drop --eval-crop-pct/--eval-interpolation, or choose another interpolation")
    crop_pct, interpolation = model_eval_crop(model, pretrained_cfg)
    return EvalCrop(train.eval_crop_pct or crop_pct, train.eval_interpolation or interpolation)


def _build_transfer(spec: TransferSpec):
    """A fine-tuning run: the pre-trained classifier with a new head; ``full`` trains it whole, the progressive
    methods unfreeze it by (resolution, learnable blocks from the output side)."""
    chosen = get_method(spec.method, TRANSFER)
    unread = [name for name in sorted(TRANSFER_EXCLUDE) if getattr(spec, name) != getattr(TransferSpec, name)]
    if unread:  # (the command line has no such flags; a Python caller or a --config file may set them)
        raise ConfigError(f"a fine-tuning run takes its architecture and schedule from the base and its method: "
                          f"{', '.join(unread)} cannot be set")
    base = locate(spec.base_path, spec.model)  # read once: its config, then its weights
    size = pretrained_resolution(base)
    warn_unread_length(spec.train, type(spec)().train, "epochs")
    _warn_long_warmup(spec)
    data = load_dataset(spec.dataset, spec.data_root, spec.train_subset, size, randaugment=spec.train.randaugment,
                        crop_scale=spec.train.crop_scale, interpolation=spec.train.train_interpolation,
                        eval_crop=eval_crop(spec.train, base.model, base.config.get("pretrained_cfg")))
    net, info = load_pretrained(base, data.num_classes, data.in_chans)
    net.build_args = info["build_args"]
    data = prepare_token_labels(spec.train, data, net)
    net.set_unfreezing(chosen.base != "full")
    space = net.growth_space(spec.num_stages, spec.start_ratio)
    if chosen.base == "autoprog-zero":
        from ..algorithms.autoprog_zero import AutoProgZero

        if not 0 <= spec.time_tolerance < 1:
            raise ConfigError(f"--time-tolerance must be in [0, 1), got {spec.time_tolerance}")
        schedule = AutoProgZero(space, time_rtol=spec.time_tolerance,
                                criterion=chosen.options.get("criterion", spec.criterion), gain_folds=spec.gain_folds)
    else:
        schedule = replace(build_schedule("original" if chosen.base == "full" else chosen.base, space),
                           default_growth=KeepWeights.name)
    return data, net, schedule, KeepWeights()


def validate_spec(spec: RunSpec) -> None:
    """Raise :class:`ConfigError` for settings that would fail, without training (RNG state untouched)."""
    import torch

    spec.train.validate()
    with torch.random.fork_rng(devices=[]):
        build_run(spec)


def pretrain(spec: RunSpec, out: str | Path, accelerator=None, resume: bool = False, overwrite: bool = False,
             stop_after: int | None = None) -> dict:
    """Run (or resume) one pre-training run into ``out``; returns the results dict also written to results.json,
    and the trained model is written to ``out/model`` (see :mod:`.pretrained`). ``out`` must be a new or empty
    folder, or hold a run's files only (``overwrite``: replacing a run there). ``stop_after``: stop after that
    many epochs of the whole run (a new run or a resumed one, which otherwise goes to its end); ``resume`` continues
    with the run's saved settings (``spec``: None, or the same settings).

    Under ``torchrun``/``accelerate launch``, end with ``autoprog.accelerator.end_processes(accelerator)`` and
    ``leave_process(0)``, as the CLI does, so the process group is torn down before the interpreter exits.
    """
    return _train(RunSpec, spec, out, accelerator, resume, overwrite, stop_after)


def finetune_classifier(spec: TransferSpec, out: str | Path, accelerator=None, resume: bool = False,
                        overwrite: bool = False, stop_after: int | None = None) -> dict:
    """Fine-tune (or resume fine-tuning) a pre-trained classifier on ``spec.dataset`` into ``out`` (Table 4's
    transfer): ``full``, ``prog`` (unfreezing) or ``autoprog-zero``; the model is written to ``out/model``.
    ``stop_after``: as :func:`pretrain`'s."""
    return _train(TransferSpec, spec, out, accelerator, resume, overwrite, stop_after)


def _train(spec_cls, spec: RunSpec | None, out: str | Path, accelerator, resume: bool, overwrite: bool,
           stop_after: int | None = None) -> dict:
    with no_empty_folder_left(out):  # (a run refused before it wrote anything leaves no folder)
        return _train_in(spec_cls, spec, out, accelerator, resume, overwrite, stop_after)


def _train_in(spec_cls, spec: RunSpec | None, out: str | Path, accelerator, resume: bool, overwrite: bool,
              stop_after: int | None) -> dict:
    import torch

    from ..accelerator import default_accelerator

    accelerator = accelerator or default_accelerator()  # first: the processes join their group together

    out = Path(out)
    if resume:
        differ = run_differences(out, spec) if spec is not None else None
        if differ:  # a caller's spec is no new setting for a saved run (as the CLI refuses other flags)
            raise ConfigError(f"resume continues the run in {out} with its saved settings; the spec given differs "
                              f"({', '.join(differ)}): give spec=None, or start a new run")
        spec = spec_cls.from_dict(read_run_config(out, spec_cls.task), str(out / "config.json"))
        spec = replace(spec, train=replace(spec.train, stop_after_epochs=stop_after))  # (None: to the end)
    else:
        new_run_dir(out, overwrite, input_paths(spec))
        if stop_after is not None:
            spec = replace(spec, train=replace(spec.train, stop_after_epochs=stop_after))
    torch.manual_seed(spec.train.seed)  # same initial weights for every method and process
    data, net, schedule, growth = build_run(spec)
    if spec.method == "prog" and not resume and spec_cls is RunSpec:  # progstack: three stages whatever --num-stages
        note = net.growth_space(spec.num_stages, spec.start_ratio).repeated_stages_note()
        if note:
            warn(note)
    adareg = None
    if spec.adareg:
        from .adareg import AdaptiveRegularization

        adareg = AdaptiveRegularization(net.growth_space(spec.num_stages, spec.start_ratio), rule=spec.adareg_rule,
                                        mean=data.mean, image_size=data.image_size)
    if spec.train_subset and spec.train_subset > len(data.train) and not resume:
        warn(f"--subset {spec.train_subset}: {spec.dataset} has {len(data.train)} training images, and all of them "
             "are used")
    info = {"method": spec.method, "model": net.build_args["model"], "dataset": spec.dataset,
            "train_images": len(data.train)}
    if isinstance(spec, TransferSpec):
        info.update(task="transfer", base=spec.base_path)
    trainer = Trainer(net, schedule, growth, data, spec.train, out, accelerator, run_info=info, adareg=adareg)
    if trainer.acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", spec.to_dict())
    return trainer.fit(resume=resume)


# Settings only the searches read, so that a comparison of search settings reuses the other methods' runs.
SEARCH_SETTINGS = SearchSettings(
    autoprog_one=("search_epochs", "search_fraction", "search_min_updates", "alpha", "alpha_rule", "forced_growth",
                  "search_samples", "score_points", "score_momentum", "supernet_sampling", "search_step_time",
                  "gain_samples", "recycle", "time_repeats", "first_supernet"),
    autoprog_zero=("time_tolerance",),
    both=("criterion", "gain_folds", "time_source", "step_time_scope"))


# Settings only some methods read (the rest, every method): a flag typed for a method that ignores it is refused.
GROWING = ("prog", "autoprog-one", "autoprog-zero", "supernet-only")  # the methods that read the growth space
OPTION_USERS = {**SEARCH_SETTINGS.users(), "schedule": lambda m: m.kind == "fixed",
                "criterion": lambda m: m.kind == "search" and "criterion" not in m.options,  # -gain sets its own
                **dict.fromkeys(("growth", "optimizer_at_growth"), lambda m: m.base not in ("original", "supernet-only")),
                "growth_copies": lambda m: m.base not in ("original", "supernet-only", "progstack"),  # (stacking)
                **dict.fromkeys(("num_stages", "start_ratio"), lambda m: m.base in GROWING)}


def run_differences(out: Path, spec: RunSpec) -> list[str] | None:
    """How the run in ``out`` differs from ``spec`` in what its method reads (None: no run there); in-memory
    data has no crops to differ in (``--loader-resolution``, ``--crop-scale``), a run without ``--adareg`` no rule."""
    crops = () if is_image_folder(spec.dataset) else ("loader_resolution", "crop_scale", "train_interpolation",
                                                      "eval_crop_pct", "eval_interpolation")
    unread = () if spec.adareg else ("adareg_rule",)
    method = get_method(spec.method, spec.method_task)
    if not OPTION_USERS["growth"](method):  # it never grows
        unread += ("growth_copies", "optimizer_at_growth")
    elif (spec.growth or ("stacking" if method.base == "progstack" else "mogrow")) in ("stacking", "randinit"):
        unread += ("growth_copies",)  # (only interpolation has a copy order)
    return saved_differences(out, spec, lambda d: _as_taken(type(spec).from_dict(d, str(out / "config.json")), out),
                             ignore=("stop_after_epochs", *crops, *unread, *SEARCH_SETTINGS.unread_by(method)))


def _as_taken(saved: RunSpec, out: Path) -> RunSpec:
    """A saved run's spec with a ``subset`` above the training images it recorded read as all: it took them all
    (a run on digits or a small folder saved before 2026-12-07 named the 10,000 default)."""
    if saved.subset is None or saved.subset == DATASET_DEFAULT:
        return saved
    try:
        summary = read_json_object(out / "results.json", "run results").get("summary")
    except AutoprogError:  # none yet, or cut: as saved
        return saved
    taken = summary.get("train_images") if isinstance(summary, dict) else None
    return replace(saved, subset=None) if isinstance(taken, int) and saved.subset > taken else saved


def run_or_reuse(spec: RunSpec, out: Path, accelerator) -> dict:
    """Reuse a finished run with the same settings, resume an unfinished one, or start it."""
    return reuse_or_run(out, spec.method, run_differences(out, spec),
                        lambda resume: _train(type(spec), spec, out, accelerator, resume, overwrite=False),
                        log=accelerator.print if accelerator is not None else print,
                        data=lambda: dataset_identity(build_run(spec)[0].train),
                        processes=accelerator.num_processes if accelerator is not None else launch_env()[0])


def compare(base: RunSpec, methods: list[str], out: str | Path, budget_baseline: bool = True,
            accelerator=None, front: tuple[float, ...] = DEFAULT_FRONT) -> list[dict]:
    """Train each method with the same seed, data and settings; write summary.json/.md, curves.png and
    front.png.

    The original is also trained at each ``front`` fraction of its steps (each with its learning rate fully
    decayed within that budget): those runs draw its time–quality front, against which every row gets its
    time-to-quality speed-up (``tq_speedup``, see :mod:`autoprog.front`). With ``budget_baseline`` the original
    is also trained for the wall-clock of the fastest progressive method (``original@budget``, a front point).
    """
    from ..accelerator import default_accelerator

    methods = method_list(methods)
    task, first = base.method_task, base.baseline
    bad = [m for m in methods if m not in method_names(task)]
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(method_names(task))}")
    acc = accelerator or default_accelerator()
    out = comparison_dir(Path(out), input_paths(base))
    if first not in methods:
        methods.insert(0, first)
    methods.sort(key=lambda m: m != first)
    for m in methods:  # fail on a bad method or setting before spending time training the others
        validate_spec(replace(base, method=m))
    results, diverged = run_methods(methods, lambda m: run_or_reuse(replace(base, method=m), out / m, acc),
                                    first, acc.print)
    orig = results[first]["summary"]
    progressive = [m for m in results if m != first]
    budget = Budget.from_options(base.train.budget, base.train.budget_steps)

    def budget_point(name: str, steps: int) -> dict:
        spec = replace(base, method=first, train=replace(base.train, max_steps=steps))
        drop_stale_budget_run(out / name, run_differences(out / name, spec), "train.max_steps", acc)
        return run_or_reuse(spec, out / name, acc)

    if budget_baseline:
        steps_per_epoch = orig["total_steps"] / orig["epochs"] if orig["epochs"] else orig["total_steps"]
        budget_matched_run(results, first, progressive, budget.describe() if budget else None,
                           orig["total_steps"], budget_point, int(round(steps_per_epoch)), acc.print,
                           agree=lambda choice: broadcast(acc, choice))
    def front_point(name: str, steps: int, fraction: float) -> dict:
        train = replace(base.train, **({"max_steps": steps} if budget is None else budget.scaled(fraction)))
        return run_or_reuse(replace(base, method=first, train=train), out / name, acc)

    results.update(front_runs(first, list(front), orig["total_steps"], front_point, acc.print,
                              budget.describe() if budget else None))
    rows = diverged_rows([_comparison_row(m, res["summary"], orig) for m, res in results.items()], diverged)
    baseline_front = add_speedups(rows, first, "top1", higher_is_better=True)
    if acc.is_main_process:
        _write_comparison(base, rows, results, baseline_front, out, acc.print)
    return rows


def _comparison_row(name: str, s: dict, orig: dict) -> dict:
    grew = s["schedule"]["stages"][1:] and s["growth"] != KeepWeights.name
    return {**comparison_row(name, s, orig), "growth": s["growth"] if grew else None,
            "top1": s["top1"], "top1_ema": s["top1_ema"], "best_top1": s["best_top1"],
            "search_epoch_s": s.get("search_epoch_s", 0.0), "search_scoring_s": s.get("search_scoring_s", 0.0),
            "epochs": s["epochs"], "schedule": s["schedule"],
            "schedule_str": f"supernet of {len(s['supernet_candidates'])} sub-networks" if "supernet_candidates" in s
            else schedule_string(s["schedule"]),
            **{k: s[k] for k in ("eval_size", "top1_at_eval_size", "top1_ema_at_eval_size") if k in s}}


def _title(base: RunSpec) -> str:
    if isinstance(base, TransferSpec):
        return f"{Path(base.base_path).name} fine-tuned on {base.dataset}"
    return f"{base.model} on {base.dataset}"


def _write_comparison(base: RunSpec, rows: list[dict], results: dict, baseline_front, out: Path, log) -> None:
    """``summary.json``, ``summary.md``, ``curves.png`` and ``front.png`` of a comparison (main process)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", rows)
    used = {res["summary"].get("train_images") for res in results.values()} - {None}  # as trained (a run before
    # 2026-12-06 did not record it: then the --subset asked for)
    n = used.pop() if len(used) == 1 else base.train_subset
    title = _title(base) + (f" ({n} image{'s' * (n != 1)})" if n else "")
    md = with_reading(summary_markdown(rows, title, base.baseline), rows, base.baseline)
    (out / "summary.md").write_text(md)
    plot_curves({m: r["epochs"] for m, r in results.items()}, out / "curves.png")
    plot_front(rows, baseline_front.envelope if baseline_front else [], out / "front.png", "top1", "top-1 (%)")
    log("\n" + md.rstrip("\n"))


def compare_seeds(base: RunSpec, methods: list[str], out: str | Path, seeds: list[int],
                  budget_baseline: bool = True, accelerator=None, front: tuple[float, ...] = DEFAULT_FRONT
                  ) -> list[dict]:
    """:func:`compare` once per seed (in ``out/seed<N>``), then mean ± std per method in ``out/summary.*``.

    Speed-ups are averaged per seed (each is a ratio within one comparison on one machine).
    """
    from ..accelerator import default_accelerator

    seeds = check_seeds(seeds)
    acc = accelerator or default_accelerator()
    out = Path(out)
    per_seed = {s: compare(replace(base, train=replace(base.train, seed=s)), methods, out / f"seed{s}",
                           budget_baseline, acc, front) for s in seeds}
    keys = ("tq_speedup", "wall_time_s", "speedup", "flops_speedup", "realised_fraction", "top1", "top1_ema",
            "search_epoch_s")
    rows = seed_rows(per_seed, seeds, keys, lambda runs: {
        "budget_of": runs[0].get("budget_of"), "growth": runs[0]["growth"],
        "schedules": [r["schedule_str"] for r in runs], **seed_speedup(runs)})
    if acc.is_main_process:
        write_json(out / "summary.json", rows)
        md = with_reading(seeds_markdown(rows, f"{_title(base)}, seeds {', '.join(map(str, seeds))} (mean ± std)",
                                         base.baseline), rows, base.baseline, " (seed means)")
        (out / "summary.md").write_text(md)
        acc.print("\n" + md.rstrip("\n"))
    return rows
