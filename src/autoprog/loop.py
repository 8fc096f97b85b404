"""autoprog inside your own training loop.

:class:`ProgressiveLoop` is the trainer side of the controller protocol (:mod:`autoprog.controllers`) for a
plain PyTorch loop: you keep your data, loss, optimizer and ``backward``; it decides nothing itself, but runs a
schedule's controller (Prog, ProgStack, a fixed schedule, AutoProg-One, AutoProg-Zero) and applies what it
chooses. Four calls::

    loop = ProgressiveLoop.growing(ElasticViT(vit), optimizer, total_steps=1000)     # pre-training
    for x, y in batches:
        loop.before_step()            # stage starts: grow (optimizer moments follow the weights) or unfreeze
        x = loop.resize(x)            # the stage's resolution
        loss = F.cross_entropy(loop.train_model(x), y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        loop.after_step(loss)         # momentum network, the controller's bookkeeping, the step count

``ProgressiveLoop.unfreezing(dit, optimizer, total_steps)`` does the same for fine-tuning a diffusion backbone
(:class:`autoprog.models.dit.DiffusionBackbone`): frozen parameters get no gradients, so an optimizer over all
parameters keeps no state for them. The searches need a few fixed batches and your loss (``proxy=``).
``before_step`` returns True when the learnable set changed. Under DDP, give the loop your Accelerator
(``accelerator=acc``; do not prepare the model yourself) and run training forwards through ``loop.train_model``:
the DDP wrapper of the current learnable set, built once per set and kept for the stage
(:class:`autoprog.engine.PreparedModel`), where re-preparing the model at every change would build a new
wrapper at most steps of an AutoProg-One supernet phase.

To resume mid-schedule (mid-search included), save ``loop.state_dict()`` beside your model's and optimizer's; to
resume, build the loop as before, call ``loop.load_state_dict(state)`` *first* (it rebuilds the grown or unfrozen
structure and adds the optimizer groups a growth added), then load your model's and optimizer's state dicts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.base import ElasticModel, check_segments, resize_input, segment_sizes
from .adapters.unfreezer import Unfreezer
from .algorithms.growth import (
    GrowthCalls,
    GrowthOperator,
    MomentumNetwork,
    auto_ema_decay,
    get_growth_operator,
)
from .controllers import Controller, ProxyTask, ScheduleController
from .engine import PreparedModel, enter_due_stage, full_precision
from .errors import ConfigError
from .optim import OPTIMIZER_AT_GROWTH, follow_growth
from .rng import forked_rng
from .schedules import MANUAL_METHODS, Schedule
from .space import GrowthSpace, SubNet
from .steptime import StepMarks, StepTimer

LOOP_STATE_FORMAT = "autoprog-loop/1"
GATE_GROUP = "autoprog_gates"  # marks the optimizer group of the parameters a growth added


@dataclass
class ProxyData:
    """Fixed batches (the same for every candidate) and your loss on one: what the searches score with.

    A batch is a tuple whose first element is the image tensor (resized to each candidate's resolution);
    ``loss(model, batch)`` returns a scalar. ``forward(model, batch)`` is the output the NTK proxy uses
    (default: ``model(batch[0])``). ``timing_batch``: a batch of the real training size that measured step times
    use (default: the first of ``batches``)."""

    batches: Sequence[tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    forward: Callable[[nn.Module, tuple], torch.Tensor] | None = None
    timing_batch: tuple | None = None  # a batch of your real training size for measured step times (default: the
    # first proxy batch, which on a GPU times kernel launches more than work: every candidate then looks alike)


class ProgressiveLoop(GrowthCalls):
    """Runs a controller on your own loop (see the module docstring); build one with :meth:`growing` or
    :meth:`unfreezing`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, controller: Controller,
                 total_steps: int, space: GrowthSpace, growth: GrowthOperator | None = None,
                 ema_decay: float | None = None, proxy: ProxyData | None = None, steps_per_epoch: int | None = None,
                 log: Callable[[str], None] = print, optimizer_at_growth: str = "carry", accelerator=None):
        if total_steps < 1:
            raise ConfigError(f"total_steps must be positive, got {total_steps}")
        if optimizer_at_growth not in OPTIMIZER_AT_GROWTH:
            raise ConfigError(f"optimizer_at_growth must be one of {', '.join(OPTIMIZER_AT_GROWTH)}, "
                              f"got {optimizer_at_growth!r}")
        self.optimizer_at_growth = optimizer_at_growth
        # under DDP, a wrapper per learnable set (the engine's; its stage starts drop the last stage's wrappers)
        self.prepared = PreparedModel(accelerator, model) if accelerator is not None else None
        self.model, self.optimizer, self.controller, self._space = model, optimizer, controller, space
        self._user_params = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer else set()
        self.growth, self.proxy, self._log_fn = growth, proxy, log
        self._unfreezer = Unfreezer(model) if growth is None else None
        self.steps_per_epoch = steps_per_epoch or max(1, total_steps // max(1, space.num_stages))
        if ema_decay is None:  # the paper's 0.998, rescaled to the epoch (as the trainers do by default)
            ema_decay = auto_ema_decay(self.steps_per_epoch)
        self.ema = MomentumNetwork(model, ema_decay) if growth is not None else None
        self.step, self.stage = 0, -1
        self.search_time = 0.0  # seconds the controller spent entering stages (its searches at stage starts)
        self.stage_log: list[dict] = []
        self.step_timer = StepTimer()  # forward and backward on the first proxy batch
        self._t0 = time.perf_counter()
        self.total_steps = controller.setup(self, total_steps)

    # ------------------------------------------------------------------------------------ builders
    @classmethod
    def growing(cls, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                schedule: str | Schedule | Controller = "prog", growth: str = "mogrow", num_stages: int = 4,
                start_ratio: float = 0.5, ema_decay: float | None = None, growth_copies: str = "last",
                **kw) -> ProgressiveLoop:
        """Pre-training: grow ``model`` (an :class:`~autoprog.adapters.base.ElasticModel`: ``ElasticViT(vit)``,
        ``ElasticVOLO(volo)``, or ``autoprog.adapters.elastic(model)``) in resolution and depth along ``schedule``:
        ``"prog"``, ``"progstack"``, an inline schedule (``"14x3,21x4,28x6"``), a :class:`Schedule`, or a
        controller (``AutoProgZero(space)``, ``AutoProgOne(space)``). ``ema_decay`` is MoGrow's momentum m
        (default: the paper's 0.998 rescaled to ``steps_per_epoch``, see :func:`auto_ema_decay`). As the official
        code, a growth copies the last blocks (``growth_copies="spread"``: spread evenly); ``optimizer``'s moments
        follow the weights (``optimizer_at_growth="reset"``: cleared at a growth that adds or moves blocks, as the
        official code's new optimizer per grown model)."""
        if not isinstance(model, ElasticModel):
            raise ConfigError("ProgressiveLoop.growing needs an elastic model: wrap yours with "
                              "autoprog.adapters.elastic(model) (ViT/DeiT, VOLO)")
        space = model.growth_space(num_stages, start_ratio)
        op = get_growth_operator(growth if not isinstance(schedule, str) or schedule != "progstack" else "stacking",
                                 growth_copies)
        return cls(model, optimizer, _controller(schedule, space), total_steps, space, growth=op,
                   ema_decay=ema_decay, **kw)

    @classmethod
    def unfreezing(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int,
                   schedule: str | Schedule | Controller = "prog", num_stages: int = 4, start_ratio: float = 0.25,
                   **kw) -> ProgressiveLoop:
        """Fine-tuning: unfreeze a :class:`~autoprog.models.dit.DiffusionBackbone` progressively along
        ``schedule`` (as in :meth:`growing`; Sec. 5.1.2's 0.25Ω by default)."""
        space = Unfreezer(model).space(num_stages, start_ratio)
        return cls(model, optimizer, _controller(schedule, space), total_steps, space, **kw)

    # ------------------------------------------------------------------------------- the four calls
    @property
    def subnet(self) -> SubNet:
        return self.model.subnet if self._unfreezer is None else (self._unfreezer.subnet or self._space.full)

    @property
    def train_model(self) -> nn.Module:
        """What training forwards run through: with ``accelerator=``, the prepared model (under DDP the wrapper of
        the current learnable set, built once per set); else :attr:`model` itself."""
        return self.prepared.current() if self.prepared is not None else self.model

    @property
    def unfreezes(self) -> bool:
        """Whether stages unfreeze sub-networks (:meth:`unfreezing`) rather than grow them (:meth:`growing`)."""
        return self._unfreezer is not None

    @property
    def resolution(self) -> int:
        return self.subnet.resolution

    def before_step(self) -> bool:
        """Enter a new stage or a per-step sub-network when one is due; True when the sub-network changed."""
        before = self.subnet
        enter_due_stage(self)
        return self.subnet != before

    def _stage_entering(self, k: int) -> None:
        if self._unfreezer is not None and hasattr(self.model, "set_stage"):
            self.model.set_stage(k)  # the stage identifier (SID), when the backbone has one (its search's too)

    def _stage_entered(self, k: int) -> None:
        """(Nothing to do once a stage began.)"""

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) at the current stage's resolution."""
        return resize_input(x, self.resolution)

    def after_step(self, loss: torch.Tensor | float | None = None) -> None:
        """After your optimizer step: update the momentum network, let the controller see the step."""
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.controller.after_step(self, loss.detach() if torch.is_tensor(loss) else loss)  # no sync: a tensor stays

    def schedule(self) -> Schedule | None:
        """The schedule as run so far (a search's choices included)."""
        return self.controller.schedule()

    # ----------------------------------------------------------------------------- save and resume
    def state_dict(self) -> dict:
        """The loop's own state: step, stage, the controller's decisions (a running search's too), the
        sub-network's structure, the momentum network and the measured step times. Your model's and optimizer's
        state dicts are yours to save beside it."""
        return {"format": LOOP_STATE_FORMAT, "step": self.step, "stage": self.stage, "total_steps": self.total_steps,
                "elapsed": self.elapsed(),
                "subnet": self.subnet.to_dict(), "stage_log": copy.deepcopy(self.stage_log),
                "gated": self.model.gated_blocks() if self._unfreezer is None else None,
                "block_segments": segment_sizes(self.model) if self._unfreezer is None else None,
                "controller": copy.deepcopy(self.controller.state_dict()), "step_times": self.step_timer.state_dict(),
                "ema": {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}
                if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` on a loop built as the saved one was, *before* loading your model's and
        optimizer's state dicts (see the module docstring)."""
        if not isinstance(state, dict) or state.get("format") != LOOP_STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"not a ProgressiveLoop state ({LOOP_STATE_FORMAT}): got {found!r}")
        if (state["gated"] is None) != (self._unfreezer is not None):
            raise ConfigError("this state is from a " + ("growing" if state["gated"] is not None else "unfreezing")
                              + " loop; build the loop the same way to resume it")
        subnet = SubNet.from_dict(state["subnet"])
        if self._unfreezer is None:  # gates first, so that the weights load into the same structure
            check_segments(self.model, state.get("block_segments"), "this loop state")
            self._set_gates(state["gated"])
            self.ema.module.load_state_dict(state["ema"])
            if self.optimizer is not None:
                self._sync_gate_group()  # the optimizer group of the gates a growth added
        self.use_subnet(subnet)
        self.step, self.stage, self.total_steps = state["step"], state["stage"], state["total_steps"]
        self._t0 = time.perf_counter() - state["elapsed"]  # the searches' clocks continue where they stopped
        if self._unfreezer is not None and self.stage >= 0 and hasattr(self.model, "set_stage"):
            self.model.set_stage(self.stage)
        self.stage_log = copy.deepcopy(state["stage_log"])
        self.controller.load_state_dict(copy.deepcopy(state["controller"]))
        self.step_timer.load_state_dict(state["step_times"])

    # ------------------------------------------------------------------- services (the protocol)
    def growth_space(self) -> GrowthSpace:
        return dataclasses.replace(self._space, num_stages=1, start_ratio=1.0)  # keeps VOLO's block segments

    def use_subnet(self, subnet: SubNet) -> None:
        if self._unfreezer is not None:
            self._unfreezer.apply(subnet)
        else:
            self.model.apply_subnet(subnet)
            self.ema.module.apply_subnet(subnet)

    def enter_subnet(self, subnet: SubNet) -> dict:
        if self._unfreezer is not None:
            self.use_subnet(subnet)
            return {"learnable_blocks": list(self._unfreezer.blocks_for(subnet))}
        return {"growth": self.grow_to(subnet) if self.stage >= 0 else self.use_subnet(subnet)}

    def describe(self, subnet: SubNet) -> str:
        if self._unfreezer is not None:
            return f"{subnet.resolution}px, learnable blocks {list(self._unfreezer.blocks_for(subnet))}"
        return str(subnet)

    @property
    def growable(self) -> nn.Module:
        return self.model

    def _after_block_copy(self, block_map) -> None:
        if self.optimizer is None:
            return
        follow_growth(self.optimizer, self.model, block_map, self.optimizer_at_growth)
        self._sync_gate_group()

    def _sync_gate_group(self) -> None:
        """Every parameter a growth added (the identity operator's ReZero gates) in one optimizer group, in the
        model's order; a gate that is gone leaves it with its state. So a resumed loop, which rebuilds the group
        from the model, has the groups the saved optimizer state was made with."""
        gates = [p for p in self.model.parameters() if id(p) not in self._user_params]
        group = next((g for g in self.optimizer.param_groups if g.get(GATE_GROUP)), None)
        if group is None:
            if gates:
                self.optimizer.add_param_group({"params": gates, "weight_decay": 0.0, GATE_GROUP: True})
            return
        live = {id(p) for p in gates}
        for p in group["params"]:
            if id(p) not in live:
                self.optimizer.state.pop(p, None)
        group["params"] = gates

    def snapshot(self) -> dict:
        snap = {"subnet": self.subnet, "model": copy.deepcopy(self.model.state_dict()),
                "ema": copy.deepcopy(self.ema.module.state_dict()) if self.ema is not None else None,
                "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
                "groups": [list(g["params"]) for g in self.optimizer.param_groups] if self.optimizer else None}
        if self._unfreezer is None:
            snap["gated"] = self.model.gated_blocks()
        return snap

    def restore(self, snap: dict) -> None:
        if self._unfreezer is None:  # gates first, so the weights load into the same structure
            self._set_gates(snap["gated"])
        self.model.load_state_dict(snap["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(snap["ema"])
        if self.optimizer is not None:
            del self.optimizer.param_groups[len(snap["groups"]):]  # groups a growth added since
            for g, params in zip(self.optimizer.param_groups, snap["groups"]):
                g["params"] = params
            self.optimizer.load_state_dict(snap["optimizer"])
        self.use_subnet(snap["subnet"])

    def candidate_loss(self, subnet: SubNet, samples: int, part: int = 0, parts: int = 1,
                       momentum: bool = False) -> float:
        """Your loss on the proxy batches (part ``part`` of ``parts`` of them when there are enough), of the
        momentum network with ``momentum`` when there is one."""
        net = self.ema.module if momentum and self.ema is not None else self.model
        with self._as_candidate(subnet, "AutoProg-One's candidate losses") as (proxy, batches), torch.no_grad():
            net.eval()
            mine = batches[part::parts] if len(batches) >= parts else batches
            losses = [float(proxy.loss(net, b)) for b in mine]
        return sum(losses) / max(1, len(losses))

    def candidate_gradients(self, subnet: SubNet, samples: int, folds: int = 2):
        from .algorithms.gain import gradients

        with self._as_candidate(subnet, "AutoProg-One's gain criterion") as (proxy, batches):
            return gradients(ProxyTask(self.model, batches, forward=lambda m, b: m(b[0]), loss=proxy.loss), folds)

    @contextmanager
    def _as_candidate(self, subnet: SubNet, what: str):
        """``(proxy, its batches at the candidate's resolution)`` with ``subnet`` applied in eval mode, undone on exit."""
        proxy = self._need_proxy(what)
        cur, was = self.subnet, self.model.training
        self.use_subnet(subnet)
        self.model.eval()
        try:
            yield proxy, [self._at(b, subnet.resolution) for b in proxy.batches]
        finally:
            self.use_subnet(cur)
            self.model.train(was)

    @contextmanager
    def try_candidate(self, subnet: SubNet) -> Iterator[ProxyTask]:
        proxy = self._need_proxy("AutoProg-Zero's proxies")
        snap, was = self.snapshot(), self.model.training
        try:
            with forked_rng(self._device):  # scoring draws no training randomness
                if subnet != self.subnet:
                    self.enter_subnet(subnet)
                self.model.eval()  # no dropout / drop path: the proxies are deterministic
                forward = proxy.forward or (lambda m, b: m(b[0]))
                with full_precision(self.model):  # in fp32 whatever the training precision, as the official search
                    yield ProxyTask(self.model, [self._at(b, subnet.resolution) for b in proxy.batches], forward,
                                    proxy.loss)
        finally:
            self.model.train(was)
            self.restore(snap)

    def measure_step_time(self, subnet: SubNet, repeats: int | None = None) -> float:
        key = f"{subnet.resolution}:{subnet.depth}:{subnet.blocks}"
        return self.step_timer.time(key, lambda: self._timed(subnet, repeats))

    def _timed(self, subnet: SubNet, repeats: int | None) -> float:
        proxy = self._need_proxy("measured step times")
        batch = self._at(proxy.timing_batch if proxy.timing_batch is not None else proxy.batches[0], subnet.resolution)
        cur = self.subnet
        self.use_subnet(subnet)

        def clear_grads():
            for p in self.model.parameters():
                p.grad = None

        try:
            self.step_timer.device = self._device
            return self.step_timer.measure(lambda: proxy.loss(self.model, batch).backward(), None, clear_grads,
                                           repeats)
        finally:
            self.use_subnet(cur)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def _device(self) -> torch.device:
        """Where your model is (its first parameter's device)."""
        return next(self.model.parameters()).device

    @property
    def step_marks(self) -> StepMarks:
        """Marks between your steps on :meth:`elapsed`'s clock; CUDA events where the model is on a GPU, so a
        supernet phase times its candidates' steps without waiting for the device."""
        return StepMarks(self.elapsed, self._device)

    def broadcast(self, obj: Any) -> Any:
        """Every decision of the controller goes through here: under ``torch.distributed`` (initialised, more than
        one process) every process gets the main process's ``obj``, so all ranks follow one schedule even when
        their timings or proxy batches differ; a single process keeps its own."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [obj]
            # NCCL's objects travel on this process's own GPU
            dist.broadcast_object_list(box, src=0, device=self._device if dist.get_backend() == "nccl" else None)
            return box[0]
        return obj

    def log_stage(self, info: dict) -> None:
        self.stage_log.append({"step": self.step, **info})

    def print(self, *args) -> None:
        self._log_fn(" ".join(str(a) for a in args))

    # --------------------------------------------------------------------------------- helpers
    def _need_proxy(self, what: str) -> ProxyData:
        if self.proxy is None:
            raise ConfigError(f"{what} need fixed batches and a loss: pass proxy=ProxyData(batches, loss)")
        return self.proxy

    def _at(self, batch: tuple, resolution: int) -> tuple:
        return (resize_input(batch[0], resolution), *batch[1:])


def _controller(schedule: str | Schedule | Controller, space: GrowthSpace) -> Controller:
    if isinstance(schedule, Controller):
        return schedule
    if isinstance(schedule, Schedule):
        return ScheduleController(schedule)
    if schedule in MANUAL_METHODS:
        return ScheduleController(MANUAL_METHODS[schedule](space))
    return ScheduleController(Schedule.from_arg(schedule))
