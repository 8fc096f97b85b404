"""The progressive pre-training loop, on Accelerate.

The trainer runs steps and calls the schedule at well-named moments: it asks which stage a step belongs
to, lets the growth operator initialise the new sub-network, moves the optimizer state with the weights,
and has the adapter apply the sub-network. It never decides what to grow.

Every epoch it evaluates top-1 (online and momentum/EMA model) at full resolution, writes
``results.json`` and a checkpoint (safetensors weights + JSON state) from which a run resumes.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters.base import ElasticModel, check_segments, segment_sizes
from ..algorithms.growth import PAPER_EMA_DECAY, GrowthCalls, GrowthOperator, MomentumNetwork, auto_ema_decay
from ..budget import Budget, BudgetPlan, LRRemap, budget_option, budget_steps_option
from ..compute import compile_blocks
from ..controllers import ProxyTask, ScheduleController
from ..data import (
    CROP_SCALE,
    EVAL_INTERPOLATIONS,
    LEGACY_CROPS,
    TRAIN_INTERPOLATIONS,
    DataBundle,
    dataset_identity,
    default_workers,
    to_device,
)
from ..engine import PreparedModel, RunTemplate, full_precision
from ..errors import ConfigError, warn
from ..metrics import train_step_flops
from ..optim import (
    OPTIMIZER_AT_GROWTH,
    OptimConfig,
    build_optimizer,
    check_lr_floor,
    follow_growth,
    load_optimizer_state,
    optimizer_state_tensors,
    sync_params,
)
from ..options import MAX_IMAGE_SIZE, check_bounds, default, option
from ..rng import forked_rng
from ..schedules import Schedule, stage_index
from ..space import GrowthSpace, SubNet
from ..steptime import SearchMeasurements, ShadowUpdate, StepTimer
from .recipe import TrainingRecipe, check_recipe
from .token_labels import (
    DENSE_WEIGHT,
    GEOMETRIES,
    MAP_FRAMES,
    is_token_labelled,
    prepare_model_for_token_labels,
    probe_token_labels,
    token_label_loss,
    token_label_targets,
    tokens_inside,
    with_ground_truth,
)

MAX_EPOCHS = 10 ** 9  # far beyond any real run; more would overflow the step count


@dataclass
class TrainConfig(OptimConfig, SearchMeasurements):
    """Optimisation settings shared by every method, so comparisons differ only in the schedule."""

    epochs: float = option(8.0, "training epochs (8: a budget well before the built-in ViT's plateau, where growth "
                                "pays; --epochs 30 --patch-size 7 is the plateau regime, where it does not)", above=0,
                           maximum=MAX_EPOCHS, group="optimisation")
    batch_size: int = default(OptimConfig, "batch_size", 128)
    lr: float = default(OptimConfig, "lr", 1e-3)
    min_lr: float = default(OptimConfig, "min_lr", 1e-5)
    weight_decay: float = default(OptimConfig, "weight_decay", 0.05)
    warmup_epochs: float = option(1.0, "linear warm-up length, at most half the run", minimum=0, group="optimisation")
    optimizer_at_growth: str = option("carry", "AdamW's state when a growth adds or moves blocks: carry (ours: each "
                                               "block keeps, and each copy takes, its source's moments; 1.4 points of "
                                               "top-1 above reset for prog over three seeds, docs/results.md) or reset "
                                               "(fresh moments and step counts for every parameter, as the official "
                                               "code builds a new optimizer for each grown model)",
                                      choices=OPTIMIZER_AT_GROWTH, group="growth")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", minimum=0, below=1,
                                    group="optimisation")
    randaugment: str | None = option(None, "RandAugment as timm's config string, e.g. rand-m9-mstd0.5-inc1 (the "
                                           "paper's DeiT recipe, Appendix B); ImageFolder images get it in the "
                                           "loader workers, Fashion-MNIST and digits on the host",
                                     show_default=False, group="augmentation")
    mixup: float = option(0.0, "Mixup alpha (the paper's DeiT recipe: 0.8; 0 = off); mixed batches train on soft "
                               "targets with the label smoothing folded in", minimum=0, group="augmentation")
    cutmix: float = option(0.0, "CutMix alpha (DeiT: 1.0; 0 = off)", minimum=0, group="augmentation")
    mixup_prob: float = option(1.0, "probability that a batch is mixed (Mixup or CutMix)", minimum=0, maximum=1,
                               group="augmentation")
    mixup_switch_prob: float = option(0.5, "probability of CutMix instead of Mixup when both are on", minimum=0,
                                      maximum=1, group="augmentation")
    random_erasing: float = option(0.0, "random-erasing probability per image (DeiT: 0.25; 0 = off), on the device",
                                   minimum=0, maximum=1, group="augmentation")
    crop_scale: float = option(CROP_SCALE, "ImageFolder data: the smallest area fraction of a training image's "
                                           "random resized crop (0.08: timm's, DeiT's and the official code's; "
                                           "small images in short runs may do better with 0.35: 28-px "
                                           "Fashion-MNIST, 8 epochs, top-1 66.6 against 68.9, docs/results.md)",
                               above=0, maximum=1, group="augmentation")
    train_interpolation: str = option(
        "random", "ImageFolder data: the training crop's resampling: random (bilinear or bicubic, drawn per image: "
                  "the official code's default), bilinear or bicubic (RandAugment's and AdaReg's rotations, shears "
                  "and translations then use it too, as timm's); legacy: autoprog's crops before 2026-12-07, "
                  "which its runs saved then keep (torchvision's bilinear crop, evaluation images resized to 1.14x "
                  "bilinearly, the --eval-* options unread)", choices=(*TRAIN_INTERPOLATIONS, LEGACY_CROPS),
        group="augmentation")
    eval_crop_pct: float | None = option(
        None, "ImageFolder data: the evaluation images' centre crop as a fraction of the resized image (resized to "
              "floor(side / crop_pct)); default: the model's, as timm's pretrained configuration gives it (0.9 for "
              "the built-in ViT and DeiT, 0.96 for VOLO-D1), which the official code reads", above=0, maximum=2,
        show_default=False, group="data")
    eval_interpolation: str | None = option(
        None, "ImageFolder data: the evaluation images' resampling; default: the model's (bicubic for ViT, DeiT "
              "and VOLO)", choices=EVAL_INTERPOLATIONS, show_default=False, group="data")
    aug_repeats: int = option(1, "repeated augmentation (DeiT's, in the paper's DeiT recipe, Appendix B: 3): an "
                                 "epoch trains on 1/N of the images, each N times in a row, so in the same global "
                                 "batch, each copy augmented on its own; 1 = off", minimum=1, maximum=64,
                              group="augmentation")
    token_labels: str | None = option(
        None, "token labeling with MixToken, the paper's VOLO recipe (Appendix B): a folder of teacher score maps, "
              "<dir>/<class>/<image stem>.pt, each [2, k, H, W] float16 or float32 (the top-k logits and their class indices "
              "at each place) as the TokenLabeling repository's generate_label.py writes them; ImageFolder data and "
              "timm:volo_* models", show_default=False, group="augmentation")
    dense_weight: float = option(DENSE_WEIGHT, "token labeling: weight of the tokens' loss beside the class token's "
                                               "(the official --dense-weight)", minimum=0, group="augmentation")
    token_label_ground_truth: bool = option(
        False, "token labeling: mix the true class into the class token's target, as the official --ground-truth "
               "(TokenLabelGTCrossEntropy): the teacher's crop label weighted 0.5 against the smoothed true label "
               "where its top class is the true one, 0.9 where it is not (the official weights; its comment says "
               "it meant to rely more on the true label there)", group="augmentation")
    token_label_geometry: str = option(
        "official", "token labeling: how a crop's box is cut from a score map and a rotation turns it: official (as "
                    "the official code: the box transposed, rotations half a cell off the centre) or corrected",
        choices=GEOMETRIES, group="augmentation")
    token_label_map_frame: str = option(
        "whole", "token labeling: the part of each image its score map covers: whole (autoprog token-labels' maps) "
                 "or centre-square (the TokenLabeling repository's ImageNet maps, made from the central square of "
                 "each image, generate_label.py --crop-pct 1.0), which needs --token-label-geometry corrected: crop "
                 "boxes and map operations are then taken in the square's frame (the official code takes the whole "
                 "image's)", choices=MAP_FRAMES, group="augmentation")
    ema_decay: float = option(
        PAPER_EMA_DECAY, "momentum m per step of the EMA network MoGrow copies from and AutoProg-One scores (the "
                         "paper's 0.998; rescaled to the epoch unless --no-ema-rescale)", minimum=0, below=1,
        group="optimisation")
    ema_rescale: bool = option(True, "keep --ema-decay per step as the paper does, instead of rescaling it to span the "
                                     "same fraction of an epoch as at ImageNet scale, m^(1251/steps per epoch). The "
                                     "rescaling is ours: with 78 steps per epoch, 0.998 per step averages over six "
                                     "epochs and MoGrow copies a stale network (prog in 8 epochs, 3 seeds: top-1 "
                                     "49.6 per step against 71.2 rescaled, docs/results.md)", group="optimisation")
    eval_samples: int | None = option(2000, "test images for the per-epoch evaluation; the last epoch always uses "
                                            "the whole test set (0 = always all)", minimum=0, zero_is_none=True,
                                      group="data")
    eval_size: int | None = option(None, "also report the final top-1 at this test resolution, as the paper's "
                                         "Tables 3 and 15 do (e.g. 288 for 224-px training, 1.29x; 36 for 28-px "
                                         "Fashion-MNIST in 4-px patches): position embeddings are interpolated; "
                                         "ImageFolder test images are resized and cropped at this size, in-memory "
                                         "ones resized by the model",
                                   minimum=1, maximum=MAX_IMAGE_SIZE, show_default=False, group="data")
    max_steps: int | None = option(None, "stop the learning-rate schedule and training after this many steps "
                                         "(the budget-matched original)", minimum=1, cli=False)
    budget: str | None = budget_option("--epochs", "every epoch")
    budget_steps: float | None = budget_steps_option("--epochs", "full-model")
    num_workers: int | None = option(None, "data-loader workers per process for ImageFolder data (default: this "
                                           "machine's cores shared among the processes launched on it, less one, "
                                           "at most 8; fewer if /dev/shm cannot hold their batches; 0 reads in "
                                           "the training process). "
                                           "Fashion-MNIST and digits need none: they stay on the device (with "
                                           "--randaugment or --adareg on the host, each batch copied after it)",
                                     flag="--workers", minimum=0, group="data", show_default=False)
    loader_resolution: str = option(
        "full", "ImageFolder data: the side the loader workers crop training images to: the training size, "
                "resized to the stage's on the device (full, as the official code's stage loaders crop at 224 "
                "and resize on the GPU), or the stage's, less work for the loader in early stages (stage; an "
                "epoch in which a later stage begins is cropped at the largest side known for it)",
        choices=("full", "stage"), group="data")
    count_flops: bool = option(True, "skip counting FLOPs per step", flag="--no-flops", group="optimisation")
    stop_after_epochs: int | None = option(None, "stop after this many epochs, keeping the checkpoint (continue "
                                                 "with --resume, which may stop again with this option)", minimum=1,
                                           show_default=False)

    def validate(self) -> None:
        check_bounds(self)  # every option's bounds and choices, as declared
        if Budget.from_options(self.budget, self.budget_steps) is not None and self.max_steps is not None:
            raise ConfigError("a budget sizes the run itself: give --budget/--budget-steps or max_steps, not both")
        check_lr_floor(self)
        check_recipe(self, adareg=False)


def plain_cross_entropy(net, data, subnet: SubNet, loader) -> float:
    """Mean plain cross-entropy of ``subnet`` on a fixed, non-augmented subset (no gradients), as the official
    code scores candidates (its ``validate_loss_fn``; training uses label smoothing)."""
    cur, was = net.subnet, net.training
    net.subnet = subnet
    net.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for x, y in loader:
                x = data.prepare(x, train=False)
                total = total + F.cross_entropy(net(x), y, reduction="sum").double()  # on the device until the end
                n += len(y)
    finally:
        net.subnet = cur
        net.train(was)
    return float(total) / max(1, n)


class Trainer(GrowthCalls, RunTemplate):
    """Train ``net`` on ``data`` following ``schedule``, growing with ``growth`` at stage boundaries.

    ``schedule`` is a fixed :class:`Schedule` or a controller (such as AutoProg-One's) that decides the
    sub-network as training goes; the trainer offers it the mechanics (grow, apply, measure).
    """

    def __init__(self, net: ElasticModel, schedule, growth: GrowthOperator, data: DataBundle,
                 cfg: TrainConfig, out_dir: str | Path, accelerator=None, run_info: dict | None = None,
                 adareg=None):
        from ..accelerator import default_accelerator

        cfg.validate()
        if isinstance(schedule, Schedule):
            schedule.validate_for(net.growth_space(1, 1.0))
            schedule = ScheduleController(schedule)
        self.controller = schedule
        self.adareg = adareg  # optional AdaptiveRegularization, re-set whenever the sub-network changes
        self._stage_magnitude: float | None = None  # AdaReg's RandAugment magnitude for the running stage
        self._stage_resolution: int | None = None  # the running stage's side as it was entered
        if adareg is not None and not data.in_memory:  # decoded images: its RandAugment in the loader workers
            data = data.with_worker_randaugment(adareg.pil_randaugment(data.in_chans, data.randaugment_interpolation))
        if cfg.token_labels is not None:
            if not is_token_labelled(data):
                raise ConfigError("--token-labels: the training data carries no score maps (build it with "
                                  "autoprog.classification.token_labels.with_token_labels)")
            prepare_model_for_token_labels(net)
        self.recipe = TrainingRecipe(cfg, data.num_classes, data.in_memory, data.image_size, data.mean)
        # in-memory images RandAugmented (PIL, on the host) stay on the host until after it: no copy back per step
        self.regularizer = adareg if adareg is not None else self.recipe  # RandAugment and erasing of batches
        self.host_randaugment = self.regularizer if data.in_memory and (
            adareg is not None or self.recipe.randaugments) else None
        self.net, self.growth, self.data, self.cfg = net, growth, data, cfg
        self.out = Path(out_dir)
        self.acc = accelerator or default_accelerator()
        self.run_info = run_info or {}
        self.net.to(self.acc.device)
        self.net.set_gradient_checkpointing(cfg.gradient_checkpointing)
        if self.acc.device.type == "cuda" and self.host_randaugment is None:
            data.to(self.acc.device)  # in-memory images, copied once
        self.workers = default_workers() if cfg.num_workers is None else cfg.num_workers
        if cfg.loader_resolution == "stage" and data.worker_crop is None:
            _warn_once(f"--loader-resolution stage crops ImageFolder images in the loader workers; {data.name} is "
                       "held in memory and resized to each stage's resolution on the device, as with full")
        self.optimizer = build_optimizer(self.net, cfg.lr, cfg.weight_decay)
        self.prepared = PreparedModel(self.acc, self.net)
        self.wrapped = self.prepared.wrapped
        self.test_loader = self.acc.prepare_data_loader(
            data.loader("test", cfg.batch_size * 2, num_workers=self.workers)
        )
        self.eval_loader = self.test_loader
        if cfg.eval_samples is not None and cfg.eval_samples < len(data.test):
            self.eval_loader = self.acc.prepare_data_loader(
                data.loader("test", cfg.batch_size * 2, num_workers=self.workers, limit=cfg.eval_samples)
            )
        self.size_loader = None  # the test set at --eval-size
        if cfg.eval_size is not None:
            if cfg.eval_size % self.net.patch_size:
                raise ConfigError(f"--eval-size {cfg.eval_size} is not a multiple of the patch size {self.net.patch_size}")
            self.size_loader = self.acc.prepare_data_loader(
                data.loader("test", cfg.batch_size * 2, num_workers=self.workers, size=cfg.eval_size))
        self.sampler = data.epoch_sampler(cfg.seed * 7919, repeats=cfg.aug_repeats)
        self.train_loader = self._train_loader()
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(data.train)} images) is smaller than one batch of {cfg.batch_size}"
            )
        self.ema_decay = auto_ema_decay(self.steps_per_epoch, cfg.ema_decay) if cfg.ema_rescale else cfg.ema_decay
        self.ema = MomentumNetwork(self.net, self.ema_decay)
        if cfg.compile:  # after the momentum copy, which runs uncompiled (evaluation only)
            compile_blocks(list(self.net.blocks), net.full_resolution // net.patch_size)
        self._init_run_state()
        self.epoch = 0
        self.flops_cache: dict[tuple, int] = {}
        self._gen: torch.Generator | None = None  # the running epoch's augmentation stream
        self._plain: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (size asked, the searches' subset)
        self._score_order: tuple[int, torch.Tensor] | None = None  # (size, the scoring points' shuffled order)
        self.step_timer = StepTimer(scope=cfg.step_time_scope, device=self.acc.device)  # this stage's candidates
        self._full_flops = 0
        self.budget = Budget.from_options(cfg.budget, cfg.budget_steps)
        self.budget_plan = BudgetPlan(self, self.budget) if self.budget else None
        self._start(self.budget_plan.steps if self.budget_plan
                    else cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch)))

    def _start(self, lr_steps: int) -> None:
        """Set the controller up for ``lr_steps`` and build the learning-rate schedule over them."""
        from ..optim import cosine_scheduler

        self.lr_steps = lr_steps
        self.total_steps = self.controller.setup(self, lr_steps)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = min(lr_steps // 2, round(self.cfg.warmup_epochs * self.steps_per_epoch))
        self.lr_sched = cosine_scheduler(self.optimizer, lr_steps, warmup, self.cfg.lr, self.cfg.min_lr)
        self.lr_remap = LRRemap(lr_steps)  # the identity until budget mode moves the end

    def budget_cost(self, subnet: SubNet) -> float:
        """Predicted cost of one training step of ``subnet`` for budget mode: seconds of a forward and backward
        pass (measured; the measuring is not training time), or its FLOPs ÷ the full model's."""
        if self.budget.in_steps:
            return self._count_flops(subnet) / self._count_flops(self.net.full_subnet)
        with self.measuring():  # forward and backward whatever --step-time-scope says: a plan for any method
            return self._timed(subnet, scope="forward-backward")

    def _moved_end(self, end: int) -> None:
        """Budget mode moved the end: the number of epochs (a running epoch counts from its start)."""
        seg = self._segment or self._in_segment
        first = seg["start_step"] if seg else self.step
        self.num_epochs = self.epoch + max(1 if seg else 0, math.ceil((end - first) / self.steps_per_epoch))

    # ------------------------------------------------------------------------------------- helpers
    def _train_loader(self):
        """The training loader, built once: its workers persist and :attr:`sampler` sets each epoch's order."""
        cuda = self.acc.device.type == "cuda"
        loader = self.data.loader("train", self.cfg.batch_size, drop_last=True, num_workers=self.workers,
                                  pin_memory=cuda and self.host_randaugment is None,  # (else pinned after it)
                                  sampler=self.sampler)
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(loader, self.acc.device, num_processes=self.acc.num_processes,
                                   process_index=self.acc.process_index,
                                   put_on_device=self.host_randaugment is None, non_blocking=cuda)

    def _step_flops(self, subnet: SubNet) -> int:
        """FLOPs of one training step of ``subnet`` for the run's figures (0 when counting is off)."""
        key = (subnet.resolution, self.net.blocks_of(subnet))
        if key not in self.flops_cache and not self.cfg.count_flops:
            return 0
        return self._count_flops(subnet)

    def _count_flops(self, subnet: SubNet) -> int:
        """FLOPs of one training step (global batch) of ``subnet``, counted once per sub-network; the counting
        time is not training time."""
        key = (subnet.resolution, self.net.blocks_of(subnet))
        if key not in self.flops_cache:
            size = self.data.image_size
            sample = torch.zeros(1, self.data.in_chans, size, size, device=self.acc.device)
            cur = self.net.subnet
            if cur != subnet:
                self.net.apply_subnet(subnet)
            try:
                with self.measuring(), forked_rng(self.acc.device):  # counting FLOPs is not training
                    self.flops_cache[key] = train_step_flops(self.net, sample, self.data.num_classes) * self.global_batch
            finally:
                if cur != subnet:
                    self.net.apply_subnet(cur)
        return self.flops_cache[key]

    # ------------------------------------------------------------------ services for controllers
    def use_subnet(self, subnet: SubNet) -> None:
        """Apply ``subnet`` to the model and its momentum copy (no weights change)."""
        self.net.apply_subnet(subnet)
        self.ema.module.apply_subnet(subnet)
        self._regularize(subnet)
        self._rewrap_if_needed()
        self._step_flops(subnet)

    def _regularize(self, subnet: SubNet) -> None:
        """AdaReg's strengths for training ``subnet`` now: at the stage this step belongs to (the one being
        entered, during its entry), inside the supernet a search phase trains. Under the stage rule the decoded
        data's RandAugment magnitude follows (a search's end changes it: the epoch's rest is re-read at it)."""
        if self.adareg is None:
            return
        ctrl = self.controller
        k = stage_index(ctrl.stage_starts(), self.step)
        self.adareg.set_subnet(self.net, subnet, k, ctrl.num_stages, ctrl.training_supernet())
        if self.adareg.rule == "stage":
            self._stage_magnitude = self.adareg.settings.randaug_magnitude

    def growth_space(self) -> GrowthSpace:
        """Ω of the model at full size: patches per side × depth."""
        return self.net.growth_space(1, 1.0)

    def enter_subnet(self, subnet: SubNet) -> dict:
        """Grow into ``subnet`` at a stage start (the first stage just applies it); the record says how."""
        if self.net.unfreezing:  # fine-tuning: no weight changes, only which blocks learn
            self.use_subnet(subnet)
            return {"learnable_blocks": list(self.net.learnable_blocks(subnet))}
        return {"growth": self.grow_to(subnet) if self.stage >= 0 else self.use_subnet(subnet)}

    def describe(self, subnet: SubNet) -> str:
        return str(subnet)

    @contextmanager
    def try_candidate(self, subnet: SubNet) -> Iterator[ProxyTask]:
        """The model grown into ``subnet`` as a stage start would grow it, with fixed, non-augmented batches of
        training images; weights, momentum weights and optimizer state are restored on exit."""
        snap, was = self.snapshot(), self.net.training
        try:
            with forked_rng(self.acc.device):  # scoring draws no training randomness
                if subnet != self.net.subnet:
                    self.enter_subnet(subnet)
                self.net.eval()  # no drop path or dropout: the proxies are deterministic
                batches = [(self.data.prepare(x.to(self.acc.device), train=False), y.to(self.acc.device))
                           for x, y in self._proxy_loader()]
                smoothing = self.cfg.label_smoothing
                with full_precision(self.net):  # in fp32 whatever the training precision, as the official search
                    yield ProxyTask(self.net, batches, forward=lambda m, b: m(b[0]),
                                    loss=lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=smoothing))
        finally:
            self.net.train(was)
            self.restore(snap)

    def _proxy_loader(self):
        """The first ``proxy_batches`` × ``proxy_batch_size`` training images, in a fixed order."""
        n = self.cfg.proxy_batches * self.cfg.proxy_batch_size
        return self.data.loader("train_plain", self.cfg.proxy_batch_size, shuffle=False, limit=n, num_workers=0)

    @property
    def growable(self) -> ElasticModel:
        return self.net

    @contextmanager
    def _growth_rng(self):
        with forked_rng(self.acc.device):
            torch.manual_seed(self.cfg.seed * 1009 + self.step)  # same fresh weights on every process
            yield

    def _after_block_copy(self, block_map) -> None:
        follow_growth(self.optimizer, self.net, block_map, self.cfg.optimizer_at_growth)
        sync_params(self.optimizer, self.net, self.cfg.weight_decay)  # gates may have come or gone

    def snapshot(self) -> dict:
        """Weights, momentum weights, optimizer state and LR position, to :meth:`restore` later."""
        return {
            "subnet": self.net.subnet, "gated": self.net.gated_blocks(),
            "model": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()},
            "optimizer": optimizer_state_tensors(self.optimizer, self.net, host=False),  # copies on the device
            "lr_step": self.lr_step,
        }

    def restore(self, snap: dict) -> None:
        self._set_gates(snap["gated"])
        self.net.load_state_dict(snap["model"])
        self.ema.module.load_state_dict(snap["ema"])
        sync_params(self.optimizer, self.net, self.cfg.weight_decay)
        load_optimizer_state(self.optimizer, self.net, snap["optimizer"])
        self.lr_step = snap["lr_step"]
        self._set_lr(self.lr_step)
        self.use_subnet(snap["subnet"])

    def candidate_loss(self, subnet: SubNet, samples: int, part: int = 0, parts: int = 1,
                       momentum: bool = False) -> float:
        """Mean plain cross-entropy of ``subnet`` (of the momentum network with ``momentum``) on part ``part`` of
        ``parts`` of a fixed, non-augmented subset of ``samples × parts`` training images (no gradients)."""
        if not 0 <= part < parts:
            raise ValueError(f"part {part} of {parts}")
        xs, ys = self._plain_subset(samples * parts)
        if self._score_order is None or self._score_order[0] != len(ys):  # ImageFolder reads by class: shuffle
            self._score_order = (len(ys), torch.randperm(len(ys), generator=torch.Generator().manual_seed(1234)))
        order = self._score_order[1]
        per = min(samples, len(ys) // parts)  # a small training set: every point gets an equal part
        if per < 1:
            raise ConfigError(f"the training set ({len(ys)} images) is too small for {parts} scoring points; give "
                              "fewer --score-points")
        lo, hi = part * per, (part + 1) * per
        size = self.cfg.batch_size * 2
        loader = ((xs[order[i:min(hi, i + size)]].to(self.acc.device), ys[order[i:min(hi, i + size)]].to(self.acc.device))
                  for i in range(lo, hi, size))
        return plain_cross_entropy(self.ema.module if momentum else self.net, self.data, subnet, loader)

    def _plain_subset(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed, non-augmented training subset the searches score candidates on: its first ``samples``
        images and labels (all of them when there are fewer), on the host. Read once; a larger request reads the
        larger subset, whose first ``samples`` are the smaller one (a prefix of one fixed permutation)."""
        if self._plain is None or self._plain[0] < samples:
            self._plain = None  # free the smaller subset before reading
            raw = list(self.data.loader("train_plain", self.cfg.batch_size * 2, limit=samples,
                                        num_workers=self.workers))
            self._plain = (samples, torch.cat([x for x, _ in raw]), torch.cat([y for _, y in raw]))
        _, xs, ys = self._plain
        return xs[:samples], ys[:samples]

    def candidate_gradients(self, subnet: SubNet, samples: int, folds: int = 2):
        """Mean gradients by parameter name (one dict per fold) and mean loss of ``subnet``'s training loss on the
        first ``samples`` of :meth:`candidate_loss`'s subset (read once per search, in at least ``folds`` batches)."""
        from ..algorithms.gain import gradients

        xs, ys = self._plain_subset(samples)  # every candidate of every search: the same batches
        size = max(1, min(self.cfg.batch_size * 2, len(ys), -(-samples // max(2, folds))))  # at least `folds` batches
        batches = [(self.data.prepare(xs[i:i + size].to(self.acc.device), train=False),
                    ys[i:i + size].to(self.acc.device)) for i in range(0, len(ys), size)]
        cur, was = self.net.subnet, self.net.training
        self.net.subnet = subnet
        self.net.eval()
        smoothing = self.cfg.label_smoothing
        try:
            return gradients(ProxyTask(self.net, batches, forward=lambda m, b: m(b[0]),
                                       loss=lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=smoothing)),
                             folds)
        finally:
            self.net.subnet = cur
            self.net.train(was)

    def measure_step_time(self, subnet: SubNet, repeats: int | None = None) -> float:
        """Seconds of one training step of ``subnet`` on a full batch (``step_time_scope``: forward and backward,
        or the whole step): measured (median of ``repeats`` after two warm-ups, once per stage), or with
        ``time_source="flops"`` its training FLOPs times seconds per FLOP (calibrated once on the full model), so
        no decision turns on timing noise."""
        if self.cfg.time_source == "flops":
            return self._flops_time(subnet)
        return self.step_timer.time(f"{subnet.resolution}:{subnet.depth}", lambda: self._timed(subnet, repeats))

    def _timed(self, subnet: SubNet, repeats: int | None = None, scope: str | None = None) -> float:
        """Seconds of a training step of ``subnet`` (two warm-ups: a new resolution's first pass pays one-off
        costs), not cached. A token-labelled run's step makes its targets from score maps of the data's shape and
        runs MixToken and the tokens' loss, as its training steps do (MixToken's numpy draws are given back)."""
        size = self.data.image_size
        x = torch.randn(self.cfg.batch_size, self.data.in_chans, size, size, device=self.acc.device)
        y = torch.randint(0, self.data.num_classes, (self.cfg.batch_size,), device=self.acc.device)
        token_labels = probe_token_labels(self.data, self.cfg.batch_size, self.acc.device) \
            if self.cfg.token_labels is not None else None
        numpy_state = np.random.get_state()
        cur = self.net.subnet
        self.net.apply_subnet(subnet)

        def forward_backward():
            if token_labels is not None:
                loss = self._token_labelled_loss(x, y, *token_labels, module=self.net)  # no DDP: timed alone
            else:
                with self.autocast():
                    loss = F.cross_entropy(self.net(x), y)
            loss.backward()

        def clear_grads():
            for p in self.net.parameters():
                p.grad = None

        try:
            return self.step_timer.measure(
                forward_backward, lambda: ShadowUpdate(self.net.parameters(), self.optimizer, self.cfg.grad_clip,
                                                       self.ema_decay), clear_grads, repeats, scope)
        finally:
            clear_grads()
            self.net.apply_subnet(cur)
            np.random.set_state(numpy_state)

    def _flops_time(self, subnet: SubNet) -> float:
        with self.counted_as_search():
            if self._sec_per_flop is None:
                full = self.net.full_subnet
                self._sec_per_flop = self._timed(full, 5) / self._count_flops(full)
            return self._count_flops(subnet) * self._sec_per_flop

    @torch.no_grad()
    def evaluate(self, full: bool = False, size: int | None = None) -> tuple[float, float]:
        """Top-1 of the online and the momentum model at full resolution (or at the test resolution ``size``, on the
        whole test set) with the current blocks."""
        loader = self.size_loader if size else self.test_loader if full else self.eval_loader
        accs = []
        for net in (self.net, self.ema.module):
            cur = net.subnet
            net.subnet = replace(cur, resolution=size or net.full_resolution)
            was = net.training
            net.eval()
            correct, total = torch.zeros((), dtype=torch.long, device=self.acc.device), 0
            try:
                for x, y in loader:
                    x = self.data.prepare(x, train=False)
                    with self.autocast():
                        logits = net(x)
                    hits = self.acc.gather_for_metrics(logits.argmax(dim=-1) == y)
                    correct += hits.sum()  # on the device: read once, not after every batch
                    total += hits.numel()
            finally:
                net.subnet = cur
                net.train(was)
            accs.append(100.0 * int(correct) / max(1, total))
        return accs[0], accs[1]

    # ------------------------------------------------------------------ the engine's task interface
    point_name = "epoch"
    history_key = "epochs"
    records_step_times = True  # step_time_median_s

    @property
    def subnet(self) -> SubNet:
        return self.net.subnet

    def _before_run(self) -> None:
        self._full_flops = self._step_flops(self.net.full_subnet) if self.cfg.count_flops else 0

    def _segment_batches(self, start_step: int, share: dict):
        """The running epoch's batches from ``self.step`` on: every epoch draws its own seeded order and
        augmentations; a resumed epoch skips the batches already trained and continues their random streams."""
        epoch_seed = self.cfg.seed * 100003 + self.epoch * 131 + self.acc.process_index
        torch.manual_seed(epoch_seed)
        random.seed(epoch_seed)  # RandAugment and random erasing draw from Python's RNG
        np.random.seed(epoch_seed % 2**32)  # Mixup/CutMix from numpy's
        self._gen = torch.Generator(self.acc.device)  # augmentations drawn where the batches are prepared
        self._gen.manual_seed(self.cfg.seed * 7 + self.epoch * 104729 + self.acc.process_index)
        trained = (self.step - start_step) * self.global_batch if share else 0  # skipped unread
        self.sampler.begin_epoch(self.epoch, skip=trained)
        stage_crops = self.cfg.loader_resolution == "stage" and self.data.worker_crop is not None
        if share and "epoch_sampler" in share:  # a resumed epoch: the settings it began with
            self.sampler.magnitude, self.sampler.resolution = share["epoch_sampler"]
        elif self.data.worker_randaugment is not None or stage_crops:  # the stage's settings go with the samples
            if self.step < self.total_steps and not self._point_due(self._segment):
                self._enter_due_stage(step_subnet=False)  # stages begin at epochs: before the workers read ahead
            self.sampler.magnitude = self._stage_magnitude
            self.sampler.resolution = self._epoch_crop_side(start_step) if stage_crops else None
        batches = iter(self.train_loader)  # (the workers start reading ahead here)
        if share:
            self._restore_rngs(share, self._gen)
        if self.data.worker_randaugment is None:
            return batches
        return self._following_magnitude(batches, start_step)

    def _following_magnitude(self, batches, start_step: int):
        """The epoch's batches, its rest re-read from the current step on whenever AdaReg's magnitude for decoded
        images changes within it (a search ending mid-epoch: its choice trains at its stage's magnitude from its
        first step, as erasing and drop path do). The same images come in the same order with the same per-image
        random draws, at the new magnitude; what the workers had read ahead is dropped. Training's random
        streams are untouched (the loader draws its workers' seeds from its own generator)."""
        while True:
            magnitude = self._stage_magnitude
            if magnitude is not None and magnitude != self.sampler.magnitude:
                batches.close()
                self.train_loader.end()  # (Accelerate's bookkeeping of the iteration left)
                self.sampler.begin_epoch(self.epoch, skip=(self.step - start_step) * self.global_batch)
                self.sampler.magnitude = magnitude
                batches = iter(self.train_loader)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def _epoch_crop_side(self, start_step: int) -> int | None:
        """The side the loader workers crop the epoch beginning at ``start_step`` to (``--loader-resolution stage``):
        the running stage's as it was entered (a supernet phase: its largest candidate's); if later stages begin
        within the epoch, the largest of theirs, or the training size (None) while one is not decided yet; never
        more than the data's own size. So no training image is cropped smaller than its step's resolution."""
        side = self._stage_resolution or self.net.subnet.resolution
        end = start_step + self.steps_per_epoch
        for k, start in enumerate(self.controller.stage_starts()):
            if start_step < start < end:
                later = self.controller.decided(k)
                if later is None:
                    return None
                side = max(side, later.resolution)
        return None if side >= self.data.image_size else side

    def _point_due(self, seg: dict | None) -> bool:
        return seg is not None and (self.step - seg["start_step"] >= self.steps_per_epoch
                                    or self.step >= self.total_steps)

    def _point_record(self, seg: dict, mean_loss: float) -> dict:
        self.epoch += 1
        if self.budget_plan is not None:
            self._replan()
        steps, epoch_time, times = self.step - seg["start_step"], seg["time_s"], sorted(self.step_seconds(seg))
        return {
            "epoch": self.epoch, "step": self.step, "stage": self.stage + 1,
            "resolution": self.net.subnet.resolution, "depth": self.net.subnet.depth,
            "lr": self.optimizer.param_groups[0]["lr"], "train_loss": round(mean_loss, 5),
            "epoch_time_s": round(epoch_time, 3), "train_time_s": round(self.train_time, 3),
            "step_time_median_s": round(times[len(times) // 2], 5) if times else None,
            "images_per_s": round(steps * self.global_batch / max(epoch_time, 1e-9), 1),
            "flops_per_step": self.flops_sum / max(1, self.step),
        }

    def _evaluate_point(self, record: dict, final: bool) -> None:
        """Evaluate the epoch that ``record`` describes and add it to the history."""
        top1, top1_ema = self.evaluate(full=final)
        self.history.append({**record, "top1": round(top1, 3), "top1_ema": round(top1_ema, 3),
                             "eval_samples": len(self.data.test) if final or self.eval_loader is self.test_loader
                             else self.cfg.eval_samples})
        if final and self.size_loader is not None:
            at_size, at_size_ema = self.evaluate(size=self.cfg.eval_size)
            self.history[-1].update(eval_size=self.cfg.eval_size, top1_at_eval_size=round(at_size, 3),
                                    top1_ema_at_eval_size=round(at_size_ema, 3))
            self.acc.print(f"top1 at {self.cfg.eval_size}px {at_size:.2f} ema {at_size_ema:.2f}")
        r = self.history[-1]
        self.acc.print(f"epoch {r['epoch']}/{self.num_epochs} stage {r['stage']} {self.net.subnet} "
                       f"loss {r['train_loss']:.4f} top1 {top1:.2f} ema {top1_ema:.2f} "
                       f"time {self.train_time:.1f}s ({r['images_per_s']:.0f} img/s)")

    def _stop_after_reached(self) -> bool:
        return self.cfg.stop_after_epochs is not None and self.epoch >= self.cfg.stop_after_epochs

    def _rng_states(self) -> dict:
        """This process's random states, from which a resumed epoch continues."""
        name, keys, pos, has_gauss, cached = np.random.get_state()
        states = {"python": _jsonable(random.getstate()), "generator": self._gen.get_state().tolist(),
                  "generator_device": self._gen.device.type,
                  "torch": torch.get_rng_state().tolist(),
                  "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                  # what the epoch's samples carry (AdaReg's magnitude, the crops' side), as the epoch began
                  "epoch_sampler": [self.sampler.magnitude, self.sampler.resolution]}
        if torch.cuda.is_available() and self.acc.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.acc.device).tolist()
        return states

    def _restore_rngs(self, states: dict, gen: torch.Generator) -> None:
        torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
        random.setstate(_tupled(states["python"]))
        if states.get("generator_device", "cpu") == gen.device.type:
            gen.set_state(torch.tensor(states["generator"], dtype=torch.uint8))
        else:  # a CPU generator's state does not fit a CUDA one (or the other way)
            warn(f"the checkpoint's augmentation stream was drawn on {states.get('generator_device', 'cpu')}, this "
                 f"run trains on {gen.device.type}: the rest of the epoch is augmented from a fresh seed (the run is "
                 "no longer bit-identical to an uninterrupted one)")
            gen.manual_seed(self.cfg.seed * 7 + self.epoch * 104729 + self.step)
        if "numpy" in states:  # (checkpoints from before 2026-12-06 have none: nothing drew from it)
            name, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in states and torch.cuda.is_available() and self.acc.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8), self.acc.device)

    def _train_step(self, batch) -> torch.Tensor:
        x, y = batch
        if self.host_randaugment is not None:  # on the host, then to the device without waiting
            x = self.host_randaugment.randaugment(x)
            x, y = to_device(x, self.acc.device), to_device(y, self.acc.device)
        x = self.data.prepare(x, train=True, generator=self._gen,
                              regularizer=self.regularizer)
        if self.cfg.token_labels is not None:
            loss = self._token_labelled_loss(x, *y)
        else:
            x, target = self.recipe.mix(x, y)
            with self.autocast():
                logits = self._training_module()(x)
                loss = self.recipe.loss(logits, target)
        self._apply_update(loss)
        return loss.detach()

    def _token_labelled_loss(self, x: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
                             boxes: torch.Tensor, module=None) -> torch.Tensor:
        """Token labeling's loss of a batch: targets from the score maps at the stage's token grid, MixToken in the
        model (:mod:`.token_labels`); ``module``: the model to run (default: the training module, DDP's wrapper
        under several processes)."""
        cls_target, token_target = token_label_targets(maps, boxes, self.data.num_classes, self.net.token_grid(),
                                                       self.cfg.label_smoothing, self.cfg.token_label_geometry)
        if self.cfg.token_label_ground_truth:
            cls_target = with_ground_truth(cls_target, labels, self.cfg.label_smoothing)
        weights = tokens_inside(boxes, self.net.token_grid()) if self.cfg.token_label_map_frame != "whole" else None
        with self.autocast(), self.net.token_labelled():
            cls, tokens, box = (module if module is not None else self._training_module())(x)
            return token_label_loss(cls, tokens, box, cls_target, token_target, self.cfg.dense_weight,
                                    token_weights=weights)

    def _update_momentum(self) -> None:
        self.ema.update(self.net)

    def _finish_run(self) -> None:
        """The trained model in ``out/model``, to fine-tune on other data (:mod:`.pretrained`); written when the
        run knows how its model was built (``net.build_args``)."""
        build_args = getattr(self.net, "build_args", None)
        if build_args is None or not self.acc.is_main_process:
            return
        from .pretrained import save_classifier

        last = self.history[-1] if self.history else {}
        save_classifier(self.net, self.out / "model", build_args,
                        extra={"method": self.run_info.get("method"), "dataset": self.run_info.get("dataset"),
                               "steps": self.step, "top1": last.get("top1"),
                               **({"classes": list(self.data.classes)} if self.data.classes else {})})

    @property
    def unfreezes(self) -> bool:
        """Whether sub-networks are learnable blocks of a pre-trained model (fine-tuning) rather than grown ones."""
        return self.net.unfreezing

    def _step_flops_now(self) -> int:
        return self._step_flops(self.net.subnet)

    def _progress_fields(self) -> dict:
        return {"epoch": f"{self.epoch + 1}/{self.num_epochs}", "subnet": str(self.net.subnet)}

    # ------------------------------------------------------------------------------------- results
    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        full_flops, avg_flops = self._full_flops, self.flops_sum / max(1, self.step)
        return {
            **self.run_info,
            "growth": self.growth.name, "ema_decay": round(self.ema_decay, 6), "adareg": self.adareg is not None,
            "epochs": self.num_epochs, **self._common_summary(),
            "top1": last.get("top1"), "top1_ema": last.get("top1_ema"),
            "best_top1": max((h["top1"] for h in self.history), default=None),
            **({"eval_size": self.cfg.eval_size, "top1_at_eval_size": last.get("top1_at_eval_size"),
                "top1_ema_at_eval_size": last.get("top1_ema_at_eval_size")} if self.cfg.eval_size else {}),
            "full_model_flops_per_step": full_flops,
            "theoretical_speedup": round(full_flops / avg_flops, 4) if avg_flops and full_flops else None,
            **self.controller.summary(),
        }

    # --------------------------------------------------------------------------------- checkpoints
    def _momentum_module(self):
        return self.ema.module

    def _stage_entered(self, k: int) -> None:
        self._stage_resolution = self.net.subnet.resolution  # (a supernet phase: its largest candidate's)
        if self.adareg is not None:  # decoded data's RandAugment magnitude: the stage's, as it enters (a supernet
            self._regularize(self.net.subnet)  # phase: the final one, or its largest candidate's by size)
            self._stage_magnitude = self.adareg.settings.randaug_magnitude

    def _training_data_identity(self) -> dict:
        return dataset_identity(self.data.train)

    def _task_state(self) -> dict:
        return {"epoch": self.epoch, "subnet": self.net.subnet.to_dict(), "gated_blocks": self.net.gated_blocks(),
                "flops_cache": [[r, list(b), f] for (r, b), f in self.flops_cache.items()],
                "block_segments": segment_sizes(self.net), "stage_magnitude": self._stage_magnitude,
                "stage_resolution": self._stage_resolution}

    def _load_weights(self, state: dict, weights: dict, ema: dict | None) -> None:
        self._set_gates(state["gated_blocks"])
        self.net.load_state_dict(weights)
        self.ema.module.load_state_dict(ema)
        sync_params(self.optimizer, self.net, self.cfg.weight_decay)

    def _load_task_state(self, state: dict) -> None:
        check_segments(self.net, state.get("block_segments"), "this run's checkpoint")
        self.epoch = state["epoch"]
        self.net.apply_subnet(SubNet.from_dict(state["subnet"]))
        self.ema.module.apply_subnet(self.net.subnet)
        self._regularize(self.net.subnet)  # AdaReg's strengths, as use_subnet sets them
        self._rewrap_if_needed()
        self.flops_cache = {(r, tuple(b)): f for r, b, f in state["flops_cache"]}
        self._stage_magnitude = state.get("stage_magnitude")  # (checkpoints before 2026-12-06 have none)
        self._stage_resolution = state.get("stage_resolution")
        if self.budget_plan is not None:
            self._moved_end(self.total_steps)


@functools.cache
def _warn_once(message: str) -> None:
    """:func:`~autoprog.errors.warn`, once per process for each message (a comparison builds a trainer per run)."""
    warn(message)


def _jsonable(state):
    """Python's RNG state (nested tuples) as JSON lists."""
    return [_jsonable(v) for v in state] if isinstance(state, tuple) else state


def _tupled(state):
    return tuple(_tupled(v) for v in state) if isinstance(state, list) else state
