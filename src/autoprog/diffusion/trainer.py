"""The diffusion training loop (base pre-training and every fine-tuning method), on Accelerate.

The trainer runs optimizer steps and asks its controller, at each stage boundary, what to do; it offers
controllers services (apply a learnable sub-network, time a candidate, draw fixed proxy batches) and
never decides itself. Training time counts every step and every search, never evaluation or checkpoints.

At ``eval_points`` moments it samples with DDIM + classifier-free guidance and measures FD/KID against
real test images (the curve of Fig. 8); the last point uses ``fd_samples`` images. A checkpoint
(safetensors weights + optimizer state + JSON state) is replaced atomically at each of those moments;
``fit(resume=True)`` continues from it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import tracking
from ..adapters.unfreezer import Unfreezer
from ..budget import MAX_STEPS, Budget, BudgetPlan, LRRemap, budget_option, budget_steps_option
from ..checkpoint import replace_dir
from ..compute import compile_blocks
from ..controllers import ProxyTask
from ..data import to_device
from ..engine import PreparedModel, RunTemplate, full_precision, gather_rows
from ..errors import ConfigError
from ..models.dit import DiffusionBackbone, num_parameters, save_backbone
from ..optim import OptimConfig, build_optimizer, check_lr_floor
from ..options import check_bounds, option
from ..rng import forked_rng
from ..space import GrowthSpace, SubNet
from ..steptime import REPEATS, SearchMeasurements, ShadowUpdate, StepTimer
from .data import DiffusionData
from .dreambooth import SCORE_KEYS
from .methods import export_backbone
from .sampling import (
    balanced_labels,
    check_sample_steps,
    diffusion_loss,
    hybrid_loss,
    sample,
    sampling_scheduler,
    shard_indices,
    training_scheduler,
)

MODEL_DIR = "model"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DiffusionConfig(OptimConfig, SearchMeasurements):
    """Optimisation and evaluation settings shared by every method, so runs differ only in what they train."""

    steps: int = option(600, "optimizer steps", minimum=1, maximum=MAX_STEPS, group="optimisation")
    lr_schedule: str = option("constant", "learning rate after the warm-up: constant (the paper's fine-tuning, "
                                          "a constant 1e-4 for DiT; the official AutoProg-Zero code has no "
                                          "schedule) or cosine (decayed to --min-lr by the run's end). In compare, "
                                          "full fine-tuning's front runs (full@0.25 ... full@1) and full@budget use "
                                          "cosine whatever this says: the baseline a method is judged against has "
                                          "its learning rate fully decayed within each budget",
                              choices=LR_SCHEDULES, group="optimisation")
    peft_lr: float | None = option(None, "learning rate of bitfit, difffit and lora, which train few parameters "
                                         "(default: 10 × --lr)", above=0, show_default=False, group="unfreezing")
    warmup_steps: int = option(10, "linear warm-up steps, at most half the run (the official AutoProg-Zero code "
                                   "has none: 0 matches it)", minimum=0, group="optimisation")
    class_dropout: float = option(0.1, "fraction of labels replaced by the null class, for classifier-free "
                                       "guidance", minimum=0, below=1, group="optimisation")
    hybrid_loss: bool = option(False, "a learned-sigma DiT (the official DiT-XL/2's) also trains its variance head, "
                                      "with DiT's hybrid loss: the noise MSE plus the variational bound of the "
                                      "learned variance (its mean from the stopped noise prediction), as the "
                                      "official AutoProg-Zero code trains DiT-XL/2. Off: only the noise prediction "
                                      "trains (the paper's Eq. 11) and sampling sets the variance",
                               group="optimisation")
    ema_decay: float | None = option(None, "evaluate and export an EMA of the weights with this decay", above=0,
                                     below=1, group="optimisation")
    eval_points: int = option(4, "FD measurements during training, evenly spaced, the last at the end", minimum=1,
                              group="evaluation")
    curve_samples: int = option(200, "generated images per intermediate measurement (a covariance needs 2)",
                                minimum=2, group="evaluation")
    fd_samples: int = option(500, "generated images for the final FD/KID (a covariance needs 2)", minimum=2,
                             group="evaluation")
    sample_steps: int = option(50, "DDIM steps of every sample: evaluations, grids and DreamBooth's class images",
                               minimum=1, group="evaluation")
    sample_eta: float = option(1.0, "DDIM eta: 0 deterministic, 1 ancestral noise at every step; small CPU-trained "
                                    "models sample far better with 1", flag="--eta", minimum=0, maximum=1,
                               group="evaluation")
    cfg_scale: float = option(1.5, "classifier-free guidance scale for evaluation (the paper's for DiT; it evaluates "
                                   "Stable Diffusion at 3.0)", minimum=1, group="evaluation")
    time_repeats: int = option(REPEATS, "timed repeats per candidate step time", minimum=1, cli=False)
    budget: str | None = budget_option("--steps", "every 5 %% of the run")
    budget_steps: float | None = budget_steps_option("--steps", "full fine-tuning")
    checkpoint_every: int = option(0, "also checkpoint every this many steps between evaluation points (0 = only "
                                      "at them, at stage ends and every --checkpoint-minutes)", minimum=0,
                                   group="optimisation")
    stop_after_steps: int | None = option(None, "stop at the first evaluation point after this many steps "
                                                "(continue with --resume, which may stop again with this option)",
                                          minimum=1, show_default=False)

    def validate(self) -> None:
        check_bounds(self)  # every option's bounds and choices, as declared
        check_lr_floor(self)
        Budget.from_options(self.budget, self.budget_steps)


class DiffusionTrainer(RunTemplate):
    """Train ``model`` on ``data`` under ``controller``; see the module docstring."""

    def __init__(self, model: DiffusionBackbone, controller, data: DiffusionData, cfg: DiffusionConfig,
                 out_dir: str | Path, lr: float, accelerator=None, evaluator=None, run_info: dict | None = None,
                 unfreezer: Unfreezer | None = None):
        from ..accelerator import default_accelerator

        cfg.validate()
        if cfg.hybrid_loss and not model.learned_sigma:
            raise ConfigError("--hybrid-loss trains a learned variance: it needs a DiT that predicts one (the official "
                              "DiT-XL/2 checkpoint, a diffusers DiT with out_channels twice in_channels, or a base "
                              "pre-trained with --learn-sigma); this "
                              f"{model.kind} model predicts the noise only")
        model.train_variance = cfg.hybrid_loss
        self.model, self.controller, self.data, self.cfg = model, controller, data, cfg
        self.unfreezer = unfreezer
        self.out = Path(out_dir)
        self.acc = accelerator or default_accelerator()
        self.evaluator = evaluator
        self.run_info = run_info or {}
        self.model.to(self.acc.device)
        self.model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.optimizer = build_optimizer(self.model, lr, cfg.weight_decay)
        self.prepared = PreparedModel(self.acc, self.model)
        self.wrapped = self.prepared.wrapped
        self.ema = None
        if cfg.ema_decay is not None:  # frozen weights' updates deferred and applied at once (the same average)
            from ..ema import LazyEma

            self.ema = LazyEma(self.model, decay=cfg.ema_decay)
            self.ema.follow(self.optimizer)
            self.prepared.before_build = self.ema.settle  # a DDP wrapper's build rewrites every weight in place
        if cfg.compile:  # after the momentum copy, which runs uncompiled (sampling only)
            compile_blocks(list(self.model.blocks), model.image_size // model.patch_size)
        self.noise = training_scheduler(getattr(model, "noise_config", None))
        check_sample_steps(cfg.sample_steps, self.noise)  # before training, not at the first evaluation
        if data.paired and cfg.batch_size < 2:
            raise ConfigError("prior preservation needs a batch of at least 2 per process (one subject and one "
                              f"class image), got --batch-size {cfg.batch_size}")
        if data.num_instance is None and len(data.train_images) < self.global_batch:
            raise ConfigError(f"the training set ({len(data.train_images)} images) is smaller than one batch")
        self.resolution = data.model_size
        self.steps_per_epoch = max(1, len(data.train_images) // self.global_batch)
        self._init_run_state()
        if data.caption_ids is not None:  # a frozen text path: each step's prompts looked up on the device
            self.model.expect_conditions(data.caption_ids)
        self.health.guard(self.model.unexpected_conditions, "a training prompt was not among the run's captions")
        self._lr = lr
        self.trainable_steps = 0.0  # Σ trainable parameters over steps, for the mean
        self.flops_cache: dict[str, int] = {}
        self._proxy = None
        self.step_timer = StepTimer(cfg.time_repeats, scope=cfg.step_time_scope, device=self.acc.device)
        self._full_flops: int | None = None  # full fine-tuning's step FLOPs (budget mode's unit)
        self.budget = Budget.from_options(cfg.budget, cfg.budget_steps)
        self.budget_plan = BudgetPlan(self, self.budget) if self.budget else None
        self._start(self.budget_plan.steps if self.budget_plan else cfg.steps)

    def _start(self, steps: int) -> None:
        """Set the controller up for ``steps``, the learning-rate schedule over them and the evaluation points."""
        from ..optim import cosine_scheduler

        self.total_steps = self.controller.setup(self, steps)
        warm = min(self.cfg.warmup_steps, self.total_steps // 2)
        # constant: a cosine from the peak to the peak, so the warm-up is the same linear ramp in both schedules
        floor = self._lr if self.cfg.lr_schedule == "constant" else self.cfg.min_lr
        self.lr_sched = cosine_scheduler(self.optimizer, self.total_steps, warm, self._lr, floor)
        self.lr_remap = LRRemap(self.total_steps)  # the identity until budget mode moves the end
        self._set_lr(0)
        self.eval_steps = self._eval_plan(self.total_steps)

    def _eval_plan(self, total_steps: int) -> list[int]:
        """``eval_points`` steps evenly spaced over ``total_steps``, the last at the end."""
        return sorted({max(1, round(i * total_steps / self.cfg.eval_points)) for i in range(1, self.cfg.eval_points + 1)})

    def budget_cost(self, subnet: SubNet) -> float:
        """Predicted cost of one training step for budget mode: seconds of a forward and backward pass with
        ``subnet`` learnable (a fixed-set method: its own set), or its FLOPs ÷ full fine-tuning's."""
        own = None if self.unfreezer is None else subnet
        if self.budget.in_steps:
            flops = self.step_flops() if own is None else self._candidate_flops(own)
            return flops / self._full_finetune_flops()
        with self.measuring():  # forward and backward whatever --step-time-scope says: a plan for any method
            return self._timed(own, scope="forward-backward")

    def _full_finetune_flops(self) -> int:
        if self._full_flops is None:
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            res, self.resolution = self.resolution, self.data.model_size
            try:
                for p, _ in flags:
                    p.requires_grad_(True)
                self._full_flops = self.step_flops()
            finally:
                for p, was in flags:
                    p.requires_grad_(was)
                self.resolution = res
        return self._full_flops

    # ------------------------------------------------------------------------------------ helpers
    def _batch_indices(self, step: int) -> torch.Tensor:
        """The indices of this process's share of global batch ``step`` (see :meth:`DiffusionData.batch_indices`)."""
        n = self.acc.num_processes
        idx = self.data.batch_indices(step, self.cfg.batch_size * n, self.cfg.seed, n)
        return idx[self.acc.process_index::n]

    def _learnable_set(self) -> tuple[str, int]:
        """The current learnable set's name (a hash of its parameters' names) and size. The model's parameters
        are listed once (walking its module tree at every step costs milliseconds of Python for a Stable
        Diffusion UNet); each step reads their flags only. They are fixed once the trainer is built, as the
        optimizer's are (LoRA, extras and the SID are installed before)."""
        if getattr(self, "_named", None) is None:
            self._named, self._learnable_sets = list(self.model.named_parameters()), {}
        flags = tuple(p.requires_grad for _, p in self._named)
        found = self._learnable_sets.get(flags)
        if found is None:
            trained = ",".join(n for n, p in self._named if p.requires_grad)
            found = self._learnable_sets[flags] = (hashlib.sha1(trained.encode()).hexdigest()[:16],
                                                   sum(p.numel() for _, p in self._named if p.requires_grad))
        return found

    def step_flops(self) -> int:
        """FLOPs of one training step (global batch) with the current resolution and learnable set, counted
        once per setting on a 2-image batch; the counting time is not training time. A learnable text path that
        a step runs on fewer prompts than its rows (the run's captions, each encoded once) is counted for those
        prompts: the 2-image count's text encoding, per row, is taken out for the rows the step does not encode."""
        key = f"{self.resolution}:{self._learnable_set()[0]}"
        if key not in self.flops_cache:
            from ..metrics import count_flops

            with self.measuring():
                x0, y = self.data.batch(torch.arange(2) % len(self.data.train_images), self.resolution,  # (one image:
                                        generator=torch.Generator().manual_seed(0), device=self.acc.device)  # twice)

                def counted_step():
                    with forked_rng(self.acc.device):
                        self.training_loss(self.model, x0, y).backward()
                    for p in self.model.parameters():
                        p.grad = None

                counted_step()  # warm: a frozen text path encodes its prompt table once, which no step repeats
                per_image = count_flops(counted_step) / 2
                flops = per_image * self.global_batch
                encoded = getattr(self.model, "encoded_rows", None)  # (text-to-image: prompts a step encodes)
                rows = encoded(self.cfg.batch_size) if encoded is not None else self.cfg.batch_size
                if rows < self.cfg.batch_size:
                    def counted_text():
                        with forked_rng(self.acc.device):
                            self.model.encode_text(y).float().sum().backward()
                        for p in self.model.parameters():
                            p.grad = None

                    per_row = count_flops(counted_text) / 2
                    flops -= per_row * (self.cfg.batch_size - rows) * self.acc.num_processes
                self.flops_cache[key] = int(flops)
        return self.flops_cache[key]

    # ---------------------------------------------------------------------- services for controllers
    def use_subnet(self, subnet: SubNet) -> None:
        """Make ``subnet``'s parameters learnable and train at its resolution (no weight changes)."""
        if self.unfreezer is None:
            raise ConfigError("this method trains a fixed parameter set; it has no learnable sub-networks")
        self.unfreezer.apply(subnet)
        self.resolution = subnet.resolution
        self._rewrap_if_needed()

    @property
    def subnet(self) -> SubNet | None:
        return self.unfreezer.subnet if self.unfreezer is not None else None

    @property
    def unfreezes(self) -> bool:
        """Whether stages unfreeze sub-networks (a progressive method), as opposed to growing them."""
        return self.unfreezer is not None

    def growth_space(self) -> GrowthSpace:
        """Ω of the model at full size: input patches per side × learnable blocks."""
        return GrowthSpace(self.model.image_size, self.model.patch_size, self.model.depth)

    def enter_subnet(self, subnet: SubNet) -> dict:
        """Unfreeze ``subnet`` at a stage start; the record names its learnable blocks."""
        self.use_subnet(subnet)
        return {"learnable_blocks": list(self.unfreezer.blocks_for(subnet))}

    def describe(self, subnet: SubNet) -> str:
        return f"{subnet.resolution}px, learnable blocks {list(self.unfreezer.blocks_for(subnet))}"

    @contextmanager
    def try_candidate(self, subnet: SubNet) -> Iterator[ProxyTask]:
        """The model with ``subnet`` learnable and fixed proxy batches at its resolution (see proxy_batches)."""
        prev = self.subnet
        self.use_subnet(subnet)

        def loss(m, b):  # the training loss (under --hybrid-loss DiT's, as the official search's ZiCo takes it)
            out = m(b[0], b[1], b[2])
            if self.cfg.hybrid_loss:
                return hybrid_loss(out, b[3], self.noise, b[4], b[0], b[1]).mean()
            return (out - b[3]).pow(2).mean()

        try:  # the NTK of the whole output (ε, and the variance values it trains), in fp32 as the official search
            with self.training_output(), full_precision(self.model):
                yield ProxyTask(self.model, self.proxy_batches(subnet.resolution),
                                forward=lambda m, b: m(b[0], b[1], b[2]), loss=loss)
        finally:
            if prev is not None:
                self.use_subnet(prev)

    @contextmanager
    def training_output(self):
        """While inside: the model returns what training trains, ε and (under --hybrid-loss) its variance values."""
        was = self.model.variance_output
        self.model.variance_output = self.cfg.hybrid_loss
        try:
            yield
        finally:
            self.model.variance_output = was

    def training_loss(self, model, x0: torch.Tensor, y: torch.Tensor, generator=None, class_dropout: float = 0.0,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """The loss a training step takes of ``model`` (the backbone or its wrapper) on ``x0``, ``y``: the noise MSE,
        or under --hybrid-loss DiT's hybrid loss; the step itself, the step timer and the FLOPs count use it."""
        with self.training_output():
            return diffusion_loss(model, x0, y, self.noise, self.model.null_condition(y), generator=generator,
                                  class_dropout=class_dropout, weights=weights, variance=self.cfg.hybrid_loss)

    def proxy_batches(self, resolution: int) -> list[tuple]:
        """Fixed small batches ``(x_t, t, y, noise, x_0)`` at ``resolution`` (same images, noise and timesteps for
        every candidate), for the zero-shot proxies."""
        if self._proxy is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 31 + 5)
            n = self.cfg.proxy_batches * self.cfg.proxy_batch_size
            idx = self._fixed_indices(n, g)
            y = self.data.conditions(self.data.train_labels[idx])
            noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            t = torch.randint(0, self.noise.config.num_train_timesteps, (n,), generator=g)
            self._proxy = (idx, y, t, noise_seed)
        idx, y, t, noise_seed = self._proxy
        # (per-step latents: encoded here too, as the official search encodes its batches, the posterior drawn the
        # same for every candidate, from a stream apart from the noise's)
        x = self.data.clean(idx, resolution, seed=noise_seed).cpu()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
        xt = self.noise.add_noise(x, noise, t)
        dev = self.acc.device
        b = self.cfg.proxy_batch_size
        return [(xt[i:i + b].to(dev), t[i:i + b].to(dev), y[i:i + b].to(dev), noise[i:i + b].to(dev),
                 x[i:i + b].to(dev)) for i in range(0, len(xt), b)]

    def _fixed_indices(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` training images drawn by ``g``, in the proportions training batches have (DreamBooth's few
        subject images, or a dataset of fewer than ``n``, repeated to fill ``n``)."""
        if self.data.num_instance is None:
            order = torch.randperm(len(self.data.train_images), generator=g)
            return order.repeat(-(-n // len(order)))[:n]
        return self.data.batch_indices(0, n, int(torch.randint(0, 2**31 - 1, (1,), generator=g)))

    def measure_step_time(self, subnet: SubNet) -> float:
        """Seconds of a training step with ``subnet`` learnable (``step_time_scope``: forward and backward, or the
        whole step): measured (median of ``time_repeats`` after two warm-ups, once per stage), or with
        ``time_source="flops"`` its FLOPs times seconds per FLOP (calibrated once on full fine-tuning), so no
        decision turns on timing noise."""
        if self.cfg.time_source == "flops":
            with self.counted_as_search():
                if self._sec_per_flop is None:
                    full = self.growth_space().full
                    self._sec_per_flop = self._timed(full, 5) / self._candidate_flops(full)
                return self._candidate_flops(subnet) * self._sec_per_flop
        key = f"{subnet.resolution}:{','.join(map(str, self.unfreezer.blocks_for(subnet)))}"
        return self.step_timer.time(key, lambda: self._timed(subnet))

    def _candidate_flops(self, subnet: SubNet) -> int:
        prev, res = self.unfreezer.subnet, self.resolution
        self.unfreezer.apply(subnet)
        self.resolution = subnet.resolution
        try:
            return self.step_flops()
        finally:
            self.resolution = res
            if prev is not None:
                self.unfreezer.apply(prev)

    def _timed(self, subnet: SubNet | None, repeats: int | None = None, scope: str | None = None) -> float:
        """Seconds of a training step with ``subnet`` learnable (None: as the model is now), not cached."""
        prev = self.unfreezer.subnet if self.unfreezer is not None else None
        if subnet is not None:
            self.unfreezer.apply(subnet)
        g = torch.Generator().manual_seed(self.cfg.seed + 17)
        idx = self._fixed_indices(self.cfg.batch_size, g)
        x0, y = self.data.batch(idx, subnet.resolution if subnet is not None else self.resolution, generator=g,
                                device=self.acc.device)

        def forward_backward():  # the noise drawn where a training step draws it (on a GPU, there: no host work)
            gen = torch.Generator().manual_seed(0) if self.acc.device.type == "cpu" else self._device_generator(0)
            with self.autocast():
                loss = self.training_loss(self.model, x0, y, generator=gen)
            loss.backward()

        def clear_grads():
            for p in self.model.parameters():
                p.grad = None

        def update():
            return ShadowUpdate(self.model.parameters(), self.optimizer, self.cfg.grad_clip,
                                self.cfg.ema_decay if self.ema is not None else None, ema_frozen=False)

        try:
            return self.step_timer.measure(forward_backward, update, clear_grads, repeats, scope)
        finally:
            if prev is not None:
                self.unfreezer.apply(prev)

    # ------------------------------------------------------------------ the engine's task interface
    def _segment_batches(self, start_step: int, share: dict):
        """Batches are drawn by step (see :meth:`_train_step`): nothing to carry between steps."""
        return itertools.repeat(None)

    def _point_due(self, seg: dict | None) -> bool:
        return seg is not None and self.step > seg["start_step"] and self.step in self.eval_steps

    def _replan_due(self) -> bool:
        return self.step % max(1, self.total_steps // 20) == 0  # every 5 % of the run

    def _moved_end(self, end: int) -> None:
        """Budget mode moved the end: so do the evaluation points not reached."""
        self.eval_steps = sorted({s for s in self.eval_steps if s < self.step}
                                 | {s for s in self._eval_plan(end) if s >= self.step})

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and self.step % every == 0  # between evaluation points: little lost on a crash

    def _stop_after_reached(self) -> bool:
        return self.cfg.stop_after_steps is not None and self.step >= self.cfg.stop_after_steps

    def _finish_run(self) -> None:
        self._export()

    def _stage_entering(self, k: int) -> None:
        self.model.set_stage(k)  # the stage identifier (SID), when the model has one: the search's too, as the
        # official code searches stage k's candidates with stage k's identifier

    def _count_step(self) -> None:
        self.trainable_steps += self._learnable_set()[1]

    def _step_flops_now(self) -> int:
        return self.step_flops()

    def _progress_fields(self) -> dict:
        return {"res": self.resolution}

    def _train_step(self, batch=None) -> torch.Tensor:
        """One step on global batch ``self.step``: its images, noise, timesteps and dropouts are drawn from
        seeds of the step, so a resumed run draws the same."""
        idx = self._batch_indices(self.step)
        seed = self.cfg.seed * 1000003 + self.step * 101 + self.acc.process_index
        gen = torch.Generator().manual_seed(seed)
        x0, y = self.data.batch(idx, self.resolution, generator=gen, device=self.acc.device)
        noise_gen = gen if self.acc.device.type == "cpu" else self._device_generator(seed)  # (the CPU: one stream)
        sid = self.model.sid
        # SID dropout from a stream of its own (seeded by the step, so a resumed run draws the same), leaving the
        # noise, timesteps and class dropout exactly as without it
        drop = sid.dropout_mask(len(y), torch.Generator().manual_seed(2**40 + seed)) if sid is not None else None
        drop = to_device(drop, self.acc.device) if drop is not None else None  # (without waiting; every block reads it)
        # the backward pass inside the dropout too: under --gradient-checkpointing it runs the blocks again
        with sid.dropping(drop) if drop is not None else nullcontext():
            with self.autocast():
                loss = self.training_loss(self._training_module(), x0, y, generator=noise_gen,
                                          class_dropout=self.cfg.class_dropout, weights=self.data.loss_weights(idx))
            self._apply_update(loss)
        return loss.detach()

    def _device_generator(self, seed: int) -> torch.Generator:
        """A generator on the training device, re-seeded (seeding is host-side: no sync): the step's noise,
        timesteps and class dropout are drawn there, from the step's seed, so a resumed run draws the same."""
        if getattr(self, "_dev_gen", None) is None:
            self._dev_gen = torch.Generator(self.acc.device)
        return self._dev_gen.manual_seed(seed)

    def _update_momentum(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    # --------------------------------------------------------------------------------- evaluation
    def eval_model(self) -> DiffusionBackbone:
        return self.ema.averaged() if self.ema is not None else self.model

    def _point_record(self, seg: dict, mean_loss: float) -> dict:
        return {"step": self.step, "stage": self.stage + 1, "train_time_s": round(self.train_time, 3),
                "search_time_s": round(self.search_time, 3), "train_loss": round(mean_loss, 5),
                "resolution": self.resolution, "lr": self.optimizer.param_groups[0]["lr"],
                "trainable_params": num_parameters(self.model, trainable=True)}

    def _evaluate_point(self, record: dict, final: bool) -> None:
        n = self.cfg.fd_samples if final else self.cfg.curve_samples
        point = dict(record)
        if self.evaluator is not None:
            t0 = time.perf_counter()
            seed = self.cfg.seed + 99991
            # every process samples its share; the main process scores them all
            imgs = self._eval_images(self.data.conditions(balanced_labels(self.data.classes, n)), seed)
            more = [self._eval_images(self.eval_model().tokenize([prompt] * n), seed + i)  # --eval-prompts (Table 8)
                    for i, prompt in enumerate(self.data.eval_prompts, 1)] \
                if hasattr(self.evaluator, "prompt_scores") else []
            if self.acc.is_main_process:
                self._save_validation_grid(imgs)
                q = self.evaluator.evaluate(imgs)
                if "fd" in q:
                    point.update(fd=round(q["fd"], 4), kid=round(q["kid"], 6), kid_std=round(q["kid_std"], 6),
                                 fd_samples=n, metric=q["metric"])
                    # text-to-image: CLIP-T (--clip-model), or the own classifier's prompt agreement
                    point.update({k: round(q[k], 5) for k in ("clip_t", "text_agreement") if k in q})
                    # FD is biased by the sample count: the curve compares every point at curve_samples
                    m = min(n, self.cfg.curve_samples)
                    fd_only = getattr(self.evaluator, "inner", self.evaluator)  # not CLIP-T or text agreement again
                    point["fd_curve"] = point["fd"] if m == n else round(fd_only.evaluate(imgs[:m])["fd"], 4)
                else:  # scores that are means over images (DreamBooth's): no sample-count bias to correct
                    point.update({k: round(v, 5) for k, v in q.items() if k in SCORE_KEYS},
                                 fd_samples=n, metric=q["metric"], headline=q["headline"])
                    for i, (prompt, images) in enumerate(zip(self.data.eval_prompts, more), 1):
                        point.update({k: round(v, 5) for k, v in self.evaluator.prompt_scores(images, prompt, i).items()})
            point = self.broadcast(point)
            point["eval_time_s"] = round(time.perf_counter() - t0, 2)
        self.history.append(point)
        key = point.get("headline", "fd")
        fd = f" {point.get('metric', 'FD')} {point[key]:.3f}" if key in point else ""
        self.print(f"step {self.step}/{self.total_steps} stage {self.stage + 1} loss {point['train_loss']:.4f}{fd} "
                   f"time {self.train_time:.1f}s (search {self.search_time:.1f}s)")

    def _eval_images(self, conditions: torch.Tensor, seed: int) -> torch.Tensor | None:
        """The evaluation model's samples for ``conditions`` as uint8 images, on the main process (``None`` on
        the others). Under several processes each samples and decodes its share (:func:`sample`'s ``shard``):
        the same images as one process makes, in ``1 / processes`` of the time, and no process waits alone past
        the collective timeout. A non-finite sample anywhere stops every process."""
        from .quality import nonfinite_pixels, to_uint8

        world = self.acc.num_processes
        shard = (self.acc.process_index, world) if world > 1 else None
        imgs = self._sample(conditions, seed, shard)
        if shard is None:
            return to_uint8(imgs)
        counts = torch.tensor([int((~torch.isfinite(imgs)).sum()), imgs.numel()], device=self.acc.device)
        bad, total = self.acc.reduce(counts, reduction="sum").tolist()  # every process raises, or none
        if bad:
            raise nonfinite_pixels(bad, total)
        shares = [shard_indices(len(conditions), r, world) for r in range(world)]
        imgs = gather_rows(self.acc, to_uint8(imgs), [len(i) for i in shares])
        if imgs is None:
            return None
        out = torch.empty_like(imgs)
        out[torch.cat(shares)] = imgs
        return out

    def _save_validation_grid(self, imgs: torch.Tensor) -> None:
        """``OUT/samples/step<N>.png``: this point's first samples, one row per class (prompt), to look at."""
        from .quality import save_grid

        per_class = max(1, min(8, len(imgs) // max(1, len(self.data.classes))))
        # generate() cycles through the classes: regroup the first per_class rounds into rows
        k = len(self.data.classes)
        rows = [imgs[i + r * k] for i in range(k) for r in range(per_class) if i + r * k < len(imgs)]
        title = (f"{self.run_info.get('method', '')} · step {self.step}/{self.total_steps} · stage {self.stage + 1}"
                 f"/{self.controller.num_stages}")
        image = save_grid(torch.stack(rows), self.out / "samples" / f"step{self.step}.png", nrow=per_class,
                          labels=[self.data.label(c) for c in self.data.classes], title=title)
        tracking.log_images(self.acc, {"samples": image}, self.step)

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> torch.Tensor:
        """``n`` class-balanced samples (floats in [-1, 1]) of the classes in the training data (a text-to-image
        model: of their captions)."""
        return self._sample(self.data.conditions(balanced_labels(self.data.classes, n)), seed)

    def generate_from(self, prompt: str, n: int, seed: int) -> torch.Tensor:
        """``n`` samples (floats in [-1, 1]) of a text-to-image model from ``prompt`` (the stage identifier is
        appended as in training)."""
        return self._sample(self.eval_model().tokenize([prompt] * n), seed)

    def _sample(self, conditions: torch.Tensor, seed: int, shard: tuple[int, int] | None = None) -> torch.Tensor:
        """Samples of the evaluation model for ``conditions`` (this process's ``shard`` of them, see
        :func:`sample`), with the run's sampler settings, decoded."""
        x0 = sample(self.eval_model(), conditions, steps=self.cfg.sample_steps, cfg_scale=self.cfg.cfg_scale,
                    seed=seed, eta=self.cfg.sample_eta, shard=shard)
        return self.data.decode(x0)

    # ------------------------------------------------------------------------------------ results
    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            **self.run_info, **self._common_summary(), "search_time_s": round(self.search_time, 3),
            "fd": last.get("fd"), "kid": last.get("kid"), "metric": last.get("metric"),
            **{k: last[k] for k in (*SCORE_KEYS, "headline") if k in last},
            "trainable_params": num_parameters(self.model, trainable=True),
            "mean_trainable_params": round(self.trainable_steps / max(1, self.step)),
            "total_params": num_parameters(self.model),
            **self.controller.summary(),
        }

    def _export(self) -> None:
        """The trained model as a plain backbone (scale factors and adapters folded in) in ``out/model``."""
        if not self.acc.is_main_process:
            return
        m = copy.deepcopy(self.eval_model()).cpu()
        tmp = self.out / (MODEL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"method": self.run_info.get("method"), "classes": list(self.data.classes), "steps": self.step,
                 "image_channels": self.data.in_chans, "image_size": self.data.image_size}
        if self.data.codec is not None:
            extra["vae"] = str(Path(self.data.codec.path).resolve())  # (read from any folder: never as typed)
        if self.data.captions is not None:
            extra["captions"] = list(self.data.captions)
        if self.data.class_names is not None:
            extra["class_names"] = list(self.data.class_names)
        lora = m.lora_layers() if hasattr(m, "lora_layers") else None
        if lora and getattr(m, "train_text_encoder", False):  # the adapter alone would not be the model trained
            self.print("model/lora is not written: the text encoder trained fully (--train-text-encoder), which "
                       "the UNet's adapter alone leaves out; the model folder holds the whole pipeline")
            lora = None
        export_backbone(m)
        if getattr(m, "extras", None) is not None:  # Adapter / VPT-Deep: reinstalled when the model loads
            extra["extras"] = m.extras.settings()
        save_backbone(m, tmp, extra=extra, vae=self.data.codec.vae if self.data.codec is not None else None,
                      scheduler=sampling_scheduler(getattr(m, "noise_config", None)))
        if lora:  # the adapter alone too, in diffusers' format: pipe.load_lora_weights(tmp / "lora")
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(str(tmp / "lora"), unet_lora_layers=lora)
        replace_dir(tmp, self.out / MODEL_DIR)

    # -------------------------------------------------------------------------------- checkpoints
    def _momentum_module(self):
        return self.ema.averaged() if self.ema is not None else None

    def _training_data_identity(self) -> dict:
        return self.data.identity()

    def _task_state(self) -> dict:
        return {"resolution": self.resolution, "subnet": self.subnet.to_dict() if self.subnet is not None else None,
                "trainable_steps": self.trainable_steps, "flops_cache": self.flops_cache,
                "eval_steps": self.eval_steps, "full_flops": self._full_flops}

    def _load_weights(self, state: dict, weights: dict, ema: dict | None) -> None:
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.module.load_state_dict(ema)
            self.ema.forget()

    def _load_task_state(self, state: dict) -> None:
        if state["subnet"] is not None:
            self.use_subnet(SubNet.from_dict(state["subnet"]))
        self.resolution = state["resolution"]
        if self.stage >= 0:
            self.model.set_stage(self.stage)
        self.trainable_steps, self.flops_cache = state["trainable_steps"], state["flops_cache"]
        budget = state["budget"] or {}  # before 2026-12-06 the budget's record held these
        self._full_flops = state.get("full_flops", budget.get("full_flops"))
        if self.budget_plan is not None:
            self.eval_steps = list(state.get("eval_steps") or budget["eval_steps"])
