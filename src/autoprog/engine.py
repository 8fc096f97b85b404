"""The one training engine: the step loop every task runs (:class:`RunTemplate`), the one place a controller is
driven before a step (:func:`enter_due_stage`), the divergence and stop checks, and the DDP wrappers of a changing
trainable set (:class:`PreparedModel`)."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

from torch import nn

from . import tracking
from .steptime import StepMarks


def trained_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


class PreparedModel:
    """The model as Accelerate prepared it, and under DDP one wrapper per trainable set.

    DDP tracks only the parameters that required grad when it was built. A search that trains a different
    candidate at each step (a supernet epoch) changes that set most steps; rebuilding the wrapper each time would
    broadcast every parameter and allocate new gradient buckets every step. Instead a wrapper is built once per
    set, when a training step first runs it (:meth:`current`; a set a search only scores gets none), and kept
    until the next stage begins (:meth:`keep_current_only`): at most one per candidate of a stage. An idle
    wrapper's gradient hooks do nothing (DDP acts only on the backward of its own forward).
    """

    def __init__(self, acc, module: nn.Module):
        self.acc, self.module = acc, module
        self.before_build = None  # called before a new wrapper broadcasts the parameters (in place), if set
        self.wrapped = acc.prepare_model(module)
        self._first = self.wrapped  # the one Accelerate knows (it may have wrapped forward for mixed precision)
        self._by_set = {frozenset(trained_ids(module)): self.wrapped}
        self.built = 1  # wrappers built over the run (DDP's cost; a test counts them)
        self.changes = 0  # times a training step found the trainable set changed (re-wrapping each time: as many builds)
        # PowerSGD: each wrapper needs its own state (its error feedback is per bucket), but the count of steps
        # before compression starts (start_powerSGD_iter) is the run's, not the wrapper's: id -> (state, start)
        self._power_states: dict[int, tuple] = {}
        self._power_done = 0  # steps run by forgotten wrappers' states
        first_state = next((st for _, st in getattr(self.wrapped, "_comm_hooks", ()) if hasattr(st, "start_powerSGD_iter")),
                           None)
        if first_state is not None:
            self._power_states[id(self.wrapped)] = (first_state, first_state.iter)

    def current(self) -> nn.Module:
        """The wrapper that tracks the parameters that require grad now (built on first use of this set)."""
        if self.acc.num_processes == 1:
            return self.wrapped
        key = frozenset(trained_ids(self.module))
        wrapped = self._by_set.get(key)
        self.changes += wrapped is not self.wrapped
        if wrapped is None:
            if key and self.before_build is not None:
                self.before_build()
            wrapped = self._ddp() if key else self.module
            self._by_set[key] = wrapped
            self.built += 1
        elif wrapped is not self.wrapped and id(wrapped) in self._power_states:  # its count goes on from the run's
            state, start = self._power_states[id(wrapped)]
            ran = state.iter - start
            state.iter = self._power_steps()
            self._power_states[id(wrapped)] = (state, state.iter - ran)
        self.wrapped = wrapped
        return wrapped

    def keep_current_only(self) -> None:
        """Forget every wrapper but the one of the set that requires grad now, if it has one (a stage began: its
        candidates are new), Accelerate's first one too, so that no stage keeps the gradient buckets of a set it
        no longer trains."""
        if self.acc.num_processes == 1:
            return
        key = frozenset(trained_ids(self.module))
        kept = self._by_set.get(key)
        self._by_set = {key: kept} if kept is not None else {}
        if self._first is not kept and self._first is not self.module:
            self.acc._models = [m for m in self.acc._models if m is not self._first]
            self._first = self.module
        self._forget_power_states(keep=kept)

    def _ddp(self) -> nn.Module:
        """A DDP wrapper as Accelerate builds one, around the module Accelerate already prepared (its forward keeps
        the mixed-precision wrapper Accelerate gave it once), with the communication hook of the accelerator's
        DDP settings (``DistributedDataParallelKwargs(comm_hook=...)``), if any, as Accelerate registers it."""
        from torch.nn.parallel import DistributedDataParallel

        handler = self.acc.ddp_handler
        kwargs = handler.to_kwargs() if handler is not None else {}
        if self.acc.device.type == "cuda":
            kwargs.update(device_ids=[self.acc.local_process_index], output_device=self.acc.local_process_index)
        wrapper = DistributedDataParallel(self.module, **kwargs)
        if handler is not None and _power_sgd(handler):
            self._register_power_sgd(handler, wrapper)
        elif handler is not None:
            handler.register_comm_hook(wrapper)
        return wrapper

    def _register_power_sgd(self, handler, wrapper: nn.Module) -> None:
        """Accelerate's PowerSGD hook (and compression wrapper, if any) on ``wrapper``, with a fresh state whose
        step count goes on from the steps every wrapper ran (and so does a reused wrapper's, :meth:`current`):
        compression starts after ``start_powerSGD_iter`` steps of the run, not of each wrapper (a wrapper per stage
        or candidate would otherwise never reach it)."""
        from accelerate.utils import DDPCommunicationHookType as Hook
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        hook = powerSGD_hook.batched_powerSGD_hook if handler.comm_hook == Hook.BATCHED_POWER_SGD \
            else powerSGD_hook.powerSGD_hook
        compress = {Hook.FP16: default_hooks.fp16_compress_wrapper,
                    Hook.BF16: default_hooks.bf16_compress_wrapper}.get(handler.comm_wrapper)
        state = powerSGD_hook.PowerSGDState(None, **handler.comm_state_option)
        state.iter = self._power_steps()
        self._power_states[id(wrapper)] = (state, state.iter)
        wrapper.register_comm_hook(state=state, hook=compress(hook) if compress else hook)

    def _power_steps(self) -> int:
        """Steps the run's PowerSGD states have run, all wrappers together."""
        return self._power_done + sum(st.iter - start for st, start in self._power_states.values())

    def _forget_power_states(self, keep: nn.Module | None = None) -> None:
        """Count the steps of the PowerSGD states of every wrapper but ``keep`` as done, and drop the states."""
        for key in [k for k in self._power_states if keep is None or k != id(keep)]:
            state, start = self._power_states.pop(key)
            self._power_done += state.iter - start

    def release(self) -> None:
        """Forget every wrapper (a comparison's later runs must not keep this model alive)."""
        self._by_set = {}
        self._forget_power_states()
        release(self.acc, self._first, self.module)  # (the module itself once the first wrapper is gone)
        self.wrapped = self._first = self.module


def _power_sgd(handler) -> bool:
    from accelerate.utils import DDPCommunicationHookType as Hook

    return handler.comm_hook in (Hook.POWER_SGD, Hook.BATCHED_POWER_SGD)


@contextmanager
def full_precision(module: nn.Module):
    """While inside: ``module``'s forward without the mixed-precision autocast Accelerate wrapped it in
    (``prepare_model`` replaces ``forward`` in place and keeps the original as ``_original_forward``): the zero-shot
    proxies are computed in fp32, as the official code computes them, whatever precision training runs in."""
    inner = module
    for _ in range(4):  # through a DDP wrapper (.module) or torch.compile's (._orig_mod) to the patched module
        if "_original_forward" in inner.__dict__:
            break
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None) or inner
    patched, original = inner.__dict__.get("forward"), inner.__dict__.get("_original_forward")
    if patched is not None and original is not None:
        inner.forward = original
    try:
        yield module
    finally:
        if patched is not None and original is not None:
            inner.forward = patched


def release(acc, wrapped: nn.Module, module: nn.Module) -> None:
    """Forget a prepared model: Accelerate lists the module itself (not its DDP wrapper) and, under mixed
    precision, wraps its ``forward`` in place; undo both so re-preparing does not nest wrappers and a
    finished run's model can be freed."""
    acc._models = [m for m in acc._models if m is not module and m is not wrapped]
    acc.unwrap_model(wrapped, keep_fp32_wrapper=False)


def broadcast(acc, obj):
    """The main process's ``obj`` on every process."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def shard_rows(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of process ``rank``'s share of ``n`` rows handled in batches of ``batch_size``: an even
    split of whole batches, in order (the last process may hold the short last batch; a share may be empty)."""
    batches = -(-n // batch_size)
    lo, hi = batches * rank // world, batches * (rank + 1) // world
    return min(n, lo * batch_size), min(n, hi * batch_size)


def count_flags(acc, *flags: bool) -> list[int]:
    """How many processes raise each of ``flags`` (one reduction; every process must call it)."""
    import torch

    total = acc.reduce(torch.tensor([float(f) for f in flags], device=acc.device), reduction="sum")
    return [int(v) for v in total.tolist()]


def gather_rows(acc, local, counts: list[int], chunk_bytes: int = 64 << 20, everywhere: bool = False):
    """Every process's ``local`` rows (process ``r`` holds ``counts[r]``, possibly none) concatenated in process
    order on the main process (on every process if ``everywhere``), on the host; else ``None`` on the others. Sent in
    collectives of at most about ``chunk_bytes`` per process (padded to one size), so that no device holds every
    process's rows at once."""
    import torch

    if acc.num_processes == 1:
        return local
    if len(local) != counts[acc.process_index]:
        raise ValueError(f"process {acc.process_index} holds {len(local)} rows, {counts[acc.process_index]} expected")
    keep = everywhere or acc.is_main_process
    row_shape = tuple(local.shape[1:])
    per = max(1, min(max(counts), chunk_bytes // max(1, math.prod(row_shape) * local.element_size())))
    parts: list[list] = [[] for _ in counts]
    for start in range(0, max(counts), per):
        piece = torch.zeros((per, *row_shape), dtype=local.dtype, device=acc.device)
        mine = local[start:start + per]
        piece[:len(mine)] = mine.to(acc.device)
        everyone = acc.gather(piece)
        if keep:
            everyone = everyone.cpu()
            for r, n in enumerate(counts):
                parts[r].append(everyone[r * per: r * per + min(per, max(0, n - start))])
    if not keep:
        return None
    return torch.cat([t for rank in parts for t in rank]) if max(counts) else local


class RunTemplate:
    """The one engine of every task: the step loop (:meth:`fit`), the training clock, checkpoint state, results
    and the calls a schedule controller may make on any trainer besides the task's own (broadcast a decision, log
    a stage record, print once).

    A task's trainer supplies a small interface (see ``TASK INTERFACE`` below): its batches, one training step,
    what an evaluation point records and evaluates, its own checkpoint state and summary fields. Training is cut
    into *segments* that end at evaluation points (an epoch's end, or one of ``eval_steps``); a stop, a crash or a
    periodic checkpoint inside a segment keeps the segment's position, so a resumed run trains exactly as an
    uninterrupted one."""

    prepared: PreparedModel  # set by the task's trainer: ``self.prepared = PreparedModel(acc, model)``
    history_key = "curve"  # results.json's name for the evaluation points
    records_step_times = False  # whether an evaluation point records its steps' times (:meth:`step_seconds`)
    point_name = "step"  # what an evaluation point is called in the progress bar and messages

    def _init_run_state(self) -> None:
        """The engine's state, before a task's ``_start``; the controller may look at ``step`` and ``stage``."""
        self.step, self.stage = 0, -1
        self.lr_step = 0  # position in the learning-rate schedule (rewound when search steps are discarded)
        self.train_time = self.search_time = 0.0
        self.flops_sum = 0.0
        self.history: list[dict] = []
        self.stage_log: list[dict] = []
        self.diverged: str | None = None  # why training stopped, when it diverged
        self._t_run: float | None = None  # the training clock's start, while it runs
        self._instrument_time = 0.0  # seconds inside the running clock that were measurement, not training
        self._clock_stretch = 0  # counts the clock's starts (step marks of different stretches are not compared)
        self._sec_per_flop: float | None = None  # time_source="flops": the calibration, measured once
        self._segment: dict | None = None  # the running segment's accumulators
        self._in_segment: dict | None = None  # a segment checkpointed part-way, to continue on resume
        self._pending_point: dict | None = None  # a trained final point whose evaluation has not finished
        self.health = HealthWatch()  # the divergence guard, read every health.every steps
        self.checkpoint_time = 0.0  # seconds spent writing checkpoints (outside the training time)
        self._wrapper_stale = True  # the trainable set may have changed since the training module was last taken
        self._last_checkpoint = time.perf_counter()
        self._scaler = None  # --mixed-precision fp16: the loss scaler (unscales before clipping, skips overflows)
        if self.acc.mixed_precision == "fp16":
            import torch

            self._scaler = torch.amp.GradScaler(self.acc.device.type)
            self.health.overflow_patience = OVERFLOW_PATIENCE

    # ------------------------------------------------------------------------- calls for controllers
    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        return broadcast(self.acc, obj)

    def log_stage(self, info: dict) -> None:
        self.stage_log.append({"step": self.step, **info})
        tracking.log(self.acc, tracking.stage_values(info), self.step)

    def print(self, *args) -> None:
        self.acc.print(*args)

    def elapsed(self) -> float:
        """Training seconds so far (evaluation and checkpoints excluded), the running stretch included."""
        running = time.perf_counter() - self._t_run - self._instrument_time if self._t_run is not None else 0.0
        return self.train_time + running

    @property
    def step_marks(self) -> StepMarks:
        """Marks between steps on the training clock (CUDA events on a GPU): a controller times the steps it runs
        without a synchronisation per step. Made afresh at each call (kept on the trainer, its clock would make
        a reference cycle that keeps a finished run's model alive until a garbage collection)."""
        return StepMarks(self.elapsed, self.acc.device, self._clock_now)

    def _clock_now(self) -> tuple[int, float]:
        """The training clock's stretch (its starts) and measurement seconds so far: marks are compared within one."""
        return self._clock_stretch, self._instrument_time

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU): timings call it."""
        if self.acc.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.acc.device)

    # ------------------------------------------------------------------------------------ the run
    def fit(self, resume: bool = False) -> dict:
        """Train to the end (or to the stop asked for); returns the results also in ``results.json``. A diverged
        run stops with :class:`~autoprog.errors.DivergedError`; its results say so and the last good checkpoint
        stays."""
        from .errors import DivergedError

        try:
            with StopRequest() as self._stop:
                if resume:
                    self._load_checkpoint()
                else:
                    self.out.mkdir(parents=True, exist_ok=True)
                res = self._fit()
                if self._stop.requested:  # asked after the last step (evaluation, export): the run is complete
                    from .errors import Interrupted

                    raise Interrupted(f"interrupted; the run in {self.out} had finished training and is complete")
                return res
        except DivergedError as e:
            self._release()
            raise DivergedError(diverged_note(self, e, lambda: self._write_results(done=False))) from None
        finally:
            tracking.end_tracking(self.acc)

    def _fit(self) -> dict:
        """The step loop: segment after segment to the end, a stop asked for, or ``stop_after_*``."""
        from dataclasses import asdict

        tracking.start_tracking(self.acc, self.out, {"config": asdict(self.cfg), "run": self.run_info})
        self._before_run()
        if self._pending_point is not None:  # stopped during the final evaluation: only that is left to do
            self._finish_point(self._pending_point, final=True)
        self.wrapped.train()
        # resumed at an evaluation point already at or past stop_after_*: nothing more to train (not one more segment)
        stopped = self.step > 0 and not self._in_segment and self.step < self.total_steps \
            and self._stop_after_reached()
        while (self.step < self.total_steps or self._in_segment) and not stopped:  # (stopped at the last step)
            stopped = self._run_segment()
        if not stopped:
            self._finish_run()
        self._release()
        return self._write_results(done=not stopped)

    def _run_segment(self) -> bool:
        """Train to the next evaluation point and evaluate there; True when the run stops after it."""
        seg, share = self._open_segment()
        bar = self._progress_bar()
        self._start_clock()  # a task may enter the due stage before its batches (training time; and so is the
        # loader's start, whose first batch was always waited for inside the clock)
        batches = self._segment_batches(seg["start_step"], share)
        for batch in batches:
            if self.step >= self.total_steps or self._point_due(seg):  # (a segment resumed at its end)
                break
            loss = self._train_one(batch, seg)
            self._show_progress(bar, loss)
            if self._stop_agreed and getattr(self.controller, "resumable", True):
                bar.close()
                self._interrupt()  # before the point's evaluation, if any: a resumed run evaluates it
            if not self._point_due(seg) and (self._checkpoint_due() or self._checkpoint_time_due()
                                             or self._stage_ends_here()):
                self._checkpoint_now()
                self._start_clock()
        if seg.get("marks"):  # the last step's end, before anything else is queued or timed
            seg["end_mark"] = self.step_marks.mark()
        bar.close()
        self._stop_clock()
        self._segment = None
        record = self._point_record(seg, self._mean_loss(seg))
        final = self.step >= self.total_steps
        if final:  # the whole training is safe before the final evaluation
            self._pending_point = record
            self._save_checkpoint()
        stop = self._finish_point(record, final) and not final
        if not final and not stop and agree_stop(self.acc, self._stop_requested(), at_check=True):
            self._release()  # asked during the evaluation, which is checkpointed: no step more
            self._raise_interrupted()
        return stop

    def _train_one(self, batch, seg: dict):
        """One optimizer step, with the controller driven around it; returns the detached loss."""
        t0 = time.perf_counter()
        if self.records_step_times and self.acc.device.type == "cuda":  # the device's, read once (step_seconds)
            seg.setdefault("marks", []).append(self.step_marks.mark())
        self._enter_due_stage()
        loss = self._train_step(batch)
        seg["loss_sum"] += loss
        seg["loss_n"] += 1
        self.flops_sum += self._step_flops_now()
        self._count_step()
        if self.budget_plan is not None:
            self.budget_plan.after_step(self.subnet)
        self.step += 1
        self.lr_step += 1
        self.controller.after_step(self, loss)
        if self.budget_plan is not None and self._replan_due():
            self._replan()
        at_check = self.step % self.health.every == 0
        if at_check:
            self.health.check(self.acc)
            self._track_training(seg)
        self._stop_agreed = agree_stop(self.acc, self._stop_requested(), at_check)
        seg["step_times"].append(time.perf_counter() - t0)
        return loss

    def _enter_due_stage(self, step_subnet: bool = True) -> bool:
        """Enter the stage due at this step, if it is a new one (:func:`enter_due_stage`; budget mode replans
        there); whether one began."""
        entered = enter_due_stage(self, step_subnet)
        if entered and self.budget_plan is not None:
            self.budget_plan.stage_started(self.step)
            self._replan(entering=True)
        return entered

    def _finish_point(self, record: dict, final: bool) -> bool:
        """Evaluate an evaluation point, checkpoint it, write the results; whether ``stop_after_*`` stops here."""
        self.health.check(self.acc)  # a non-finite model is never scored
        self._evaluate_point(record, final)
        tracking.log(self.acc, tracking.numbers(self.history[-1] if self.history else record, "eval"), self.step)
        self._pending_point = None
        self._save_checkpoint()
        self._write_results(done=False)  # done once the run's end (an export) is written
        return self._stop_after_reached()

    def autocast(self):
        """The forward pass's precision: Accelerate's (bf16), or for ``--mixed-precision fp16`` float16 autocast on
        any device (with :attr:`_scaler`)."""
        if self._scaler is None:
            return self.acc.autocast()
        import torch

        return torch.autocast(self.acc.device.type, dtype=torch.float16)

    def _apply_update(self, loss) -> None:
        """Backward, clip, the divergence and stop check, the optimizer, the learning rate and momentum networks.
        Under fp16 the gradients are unscaled before clipping and a step whose gradients overflowed is skipped (the
        scale then halves); only ``OVERFLOW_PATIENCE`` overflows in a row count as divergence."""
        import torch

        norm = None
        # the optimizer's flat list (every parameter of the model): walking the module tree at every step costs
        # milliseconds of Python for a large UNet
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._scaler is None:
            self.acc.backward(loss)
            if self.cfg.grad_clip:
                norm = self.acc.clip_grad_norm_([p for p in params if p.requires_grad], self.cfg.grad_clip)
            else:  # not clipped: the norm still tells the divergence guard of a non-finite gradient before the step
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            self._scaler.scale(loss).backward()
            self._scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad],
                                                  self.cfg.grad_clip or float("inf"))
        self.health.watch(self.step + 1, loss, norm)  # on the device: no sync
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._set_lr(self.lr_step + 1)
        self._update_momentum()

    # ------------------------------------------------------------------------------- segments
    def _open_segment(self) -> tuple[dict, dict]:
        """The running segment's accumulators (new, or the checkpointed part of one) and this process's share of
        that part (its loss so far and random states; {} at a segment's start)."""
        part, self._in_segment = self._in_segment or {}, None
        mine = self._own_share(part)
        import torch

        self._segment = {"start_step": part.get("start_step", self.step), "time_s": part.get("time_s", 0.0),
                         "step_times": list(part.get("step_times", [])),
                         "loss_sum": torch.tensor(mine.get("loss_sum", 0.0), device=self.acc.device),
                         "loss_n": mine.get("loss_n", 0)}
        return self._segment, mine

    def step_seconds(self, seg: dict) -> list[float]:
        """The segment's step times: on a GPU the device's, between CUDA events marked before each step (read here,
        one wait for the last; a step a measurement or evaluation interrupted is left out), else the host clock's
        per step (on a GPU that would be the time to queue a step, not to run it)."""
        marks = seg.get("marks")
        if not marks:
            return list(seg["step_times"])
        ends = [*marks[1:], seg.get("end_mark") or self.step_marks.mark()]
        return [t for t in (a.seconds_to(b) for a, b in zip(marks, ends)) if t is not None]

    def _own_share(self, part: dict) -> dict:
        """This process's share of a checkpointed segment ({} at a segment's start)."""
        if "shared" in part:  # migrated from a checkpoint whose one loss sum every process read back
            return part["shared"]
        shares = part.get("per_process")
        if not shares:
            return {}
        if len(shares) != self.acc.num_processes:
            from .errors import ConfigError

            raise ConfigError(f"this checkpoint was written mid-{self.point_name} by {len(shares)} processes; resume "
                              f"it with {len(shares)}, not {self.acc.num_processes}")
        return shares[self.acc.process_index]

    def _segment_state(self) -> dict | None:
        """The running segment, to continue it after a resume: position, time, and each process's loss so far
        and random states (gathered to the main process, which writes the checkpoint)."""
        seg = self._segment
        if seg is None:
            return None
        local = {"loss_sum": float(seg["loss_sum"]), "loss_n": seg["loss_n"], **self._rng_states()}
        return {"start_step": seg["start_step"], "time_s": seg["time_s"], "step_times": seg["step_times"],
                "per_process": self._gather(local)}

    def _mean_loss(self, seg: dict) -> float:
        return float(self.acc.reduce(seg["loss_sum"], reduction="mean")) / max(1, seg["loss_n"])

    def _gather(self, local: dict) -> list[dict]:
        """``local`` of every process, in process order."""
        if self.acc.num_processes == 1:
            return [local]
        from accelerate.utils import gather_object

        return gather_object([local])

    # ---------------------------------------------------------------------------- the training clock
    def _start_clock(self) -> None:
        self.sync()
        self._instrument_time = 0.0
        self._clock_stretch += 1
        self._t_run = time.perf_counter()

    def _stop_clock(self) -> None:
        """Add the running stretch to the training time (and to the running segment's)."""
        if self._t_run is None:
            return
        self.sync()
        since = time.perf_counter() - self._t_run - self._instrument_time
        self._t_run, self._instrument_time = None, 0.0
        self.train_time += since
        if self._segment is not None:
            self._segment["time_s"] += since

    def _clock_running(self) -> bool:
        return self._t_run is not None

    @contextmanager
    def measuring(self):
        """What runs inside is measurement (FLOP counts, budget mode's timings), not training: the training clock
        leaves it out."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._clock_running():
                self._instrument_time += time.perf_counter() - t0

    @contextmanager
    def counted_as_search(self):
        """Measurement inside (a search's FLOP counting under ``time_source="flops"``) is the search's time, which
        stays inside the run's runtime."""
        before = self._instrument_time
        try:
            yield
        finally:
            self._instrument_time = before

    # ------------------------------------------------------------------------------ budget mode
    def _replan(self, entering: bool = False) -> None:
        """Budget mode: move the run's end to where the budget says, the learning rate decaying to it."""
        end = self.budget_plan.replan(self.step, self.stage, self.controller.stage_starts(), self.total_steps,
                                      self.controller.decided(self.stage), self.controller.resize_floor(), entering)
        if end != self.total_steps:
            self.lr_remap.retarget(self.lr_step, self.lr_step + end - self.step)
            self.controller.resize(self.step, self.total_steps, end)
            self.total_steps = end
            self._moved_end(end)

    def _set_lr(self, position: int) -> None:
        self.lr_sched.step_update(self.lr_remap(position))

    # --------------------------------------------------------------------------- stop and interrupt
    _stop: StopRequest | None = None
    _stop_agreed = False  # set by a training step: every process saw a stop request (see StopRequest)

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.requested

    def _interrupt(self) -> None:
        """A stop was agreed after a finished step: checkpoint it and stop."""
        self._checkpoint_now()
        self._release()
        self._raise_interrupted()

    def _raise_interrupted(self) -> None:
        from .checkpoint import CHECKPOINT_DIR
        from .errors import Interrupted, launch_note

        raise Interrupted(f"interrupted at step {self.step}; {self.out / CHECKPOINT_DIR} holds that step",
                          resume=f"--resume {self.out}{launch_note(self.acc.num_processes)}")

    def _checkpoint_time_due(self) -> bool:
        """``checkpoint_minutes`` of wall-clock since the last checkpoint (several processes: the main process's
        clock, agreed at health checks only)."""
        minutes = self.cfg.checkpoint_minutes
        if not minutes:
            return False
        due = time.perf_counter() - self._last_checkpoint >= 60 * minutes
        if self.acc.num_processes == 1:
            return due
        return self.step % self.health.every == 0 and bool(self.broadcast(due))

    def _checkpoint_now(self) -> None:
        """Checkpoint the step just finished, inside a segment; resuming continues from it exactly. The clock
        stops here; the caller restarts it."""
        self._stop_clock()
        self._save_checkpoint()
        self._write_results(done=False)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes."""
        return self.cfg.batch_size * self.acc.num_processes

    def _release(self) -> None:
        """Forget the prepared model: a comparison's later runs must not keep it alive."""
        self.prepared.release()

    def _rewrap_if_needed(self) -> None:
        """The trainable set may have changed: the next training step takes the wrapper that tracks it (under DDP
        built then if the set is new, so a set a search only scores, never trains, gets none)."""
        self._wrapper_stale = True

    def _training_module(self) -> nn.Module:
        """The module a training step runs: under DDP the wrapper of the parameters that require grad now."""
        if self._wrapper_stale:
            self.wrapped = self.prepared.current()
            self._wrapper_stale = False
        return self.wrapped

    # ------------------------------------------------------------------------------ progress
    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.run_info.get("method", "train"),
                    disable=not self.acc.is_local_main_process or None, dynamic_ncols=True, leave=False)

    def _show_progress(self, bar, loss) -> None:
        """The bar (the loss as of the last health check: reading it is a sync), or without a terminal a line every
        5 % of the run."""
        bar.total = self.total_steps  # budget mode moves the end
        bar.update(1)
        if self.step % self.health.every == 0:
            bar.set_postfix(stage=f"{self.stage + 1}/{self.controller.num_stages}", loss=self._loss_shown(),
                            **self._progress_fields())
        every = max(1, self.total_steps // 20)
        if bar.disable and self.step % every == 0 and not self._point_due(self._segment):
            self.print(f"step {self.step}/{self.total_steps} stage {self.stage + 1} loss {self._loss_shown()}")

    def _track_training(self, seg: dict) -> None:
        """The training figures for the experiment trackers, at a health check (values already read)."""
        if not tracking.is_on(self.acc):
            return
        recent = seg["step_times"][-(self.health.every - 1):]  # this step's time is not in yet
        values = {"train/loss": self.health.last_loss, "train/lr": self.optimizer.param_groups[0]["lr"],
                  "train/stage": self.stage + 1}
        if recent and sum(recent) > 0:
            values["train/images_per_s"] = self.global_batch * len(recent) / sum(recent)
        tracking.log(self.acc, values, self.step)

    def _loss_shown(self) -> str:
        """The loss as of the last health check, with its step when that is not the current one."""
        last = self.health
        if last.last_loss is None:
            return "–"
        return f"{last.last_loss:.4f}" + (f" (step {last.last_step})" if last.last_step != self.step else "")

    # ------------------------------------------------------------------------- results and checkpoints
    def _write_results(self, done: bool) -> dict:
        from dataclasses import asdict

        from .checkpoint import write_json

        sched = self.controller.schedule()
        if self.acc.is_main_process and sched is not None:
            sched.save(self.out / "schedule.json")
        res = {"config": asdict(self.cfg), "run": self.run_info, "done": done, "diverged": self.diverged,
               self.history_key: self.history, "stages": self.stage_log, "summary": self.summary()}
        if self.acc.is_main_process:
            write_json(self.out / "results.json", res)
        return res

    def _common_summary(self) -> dict:
        """The summary fields every task reports."""
        sched = self.controller.schedule()
        return {"steps": self.step, "total_steps": self.total_steps, "processes": self.acc.num_processes,
                "wall_time_s": round(self.train_time, 3),
                "checkpoint_time_s": round(self.checkpoint_time, 3),
                "flops_per_step": self.flops_sum / max(1, self.step),
                "schedule": sched.to_dict() if sched else {"stages": []},
                **({"budget": self.budget_plan.record(self.total_steps)} if self.budget_plan else {}),
                **({"ddp_wrappers_built": self.prepared.built, "trainable_set_changes": self.prepared.changes}
                   if self.acc.num_processes > 1 else {})}

    def _save_checkpoint(self) -> None:
        from .checkpoint import RUN_STATE_FORMAT, save_checkpoint

        self.health.check(self.acc)  # nor saved
        t0 = time.perf_counter()
        state = {"format": RUN_STATE_FORMAT, "step": self.step, "stage": self.stage, "lr_step": self.lr_step,
                 "total_steps": self.total_steps, "train_time_s": self.train_time,
                 "search_time_s": self.search_time, "checkpoint_time_s": self.checkpoint_time,
                 "flops_sum": self.flops_sum, "history": self.history,
                 "stage_log": self.stage_log, "controller": self.controller.state_dict(),
                 "time_cache": self.step_timer.state_dict(), "sec_per_flop": self._sec_per_flop,
                 "pending_point": self._pending_point, "in_segment": self._segment_state(),
                 "scaler": self._scaler.state_dict() if self._scaler is not None else None,
                 "budget": {**self.budget_plan.state_dict(), "total_steps": self.total_steps,
                            "lr_remap": self.lr_remap.state_dict()} if self.budget_plan else None,
                 "data": self._data_identity(), "processes": self.acc.num_processes, **self._task_state()}
        save_checkpoint(self.out, self.acc, self._module(), self._momentum_module(), self.optimizer, state)
        self._last_checkpoint = time.perf_counter()
        self.checkpoint_time += self._last_checkpoint - t0

    def _load_checkpoint(self) -> None:
        from .checkpoint import read_checkpoint
        from .errors import ConfigError
        from .optim import load_optimizer_state
        from .space import SubNet

        def apply(state: dict, weights: dict, ema: dict | None, opt: dict) -> None:
            saved = state.get("data")  # (checkpoints before 2026-12-07 have none)
            if saved is not None and saved != self._data_identity():
                from .data import identity_change

                raise ConfigError(f"the training data differ from those this run started with"
                                  f"{identity_change(saved, self._data_identity())}: resume it with the same data, "
                                  "or start a new run")
            budget = state.get("budget")
            if (budget is None) != (self.budget_plan is None):
                raise ConfigError("this checkpoint was made " + ("with" if budget else "without") + " a budget; "
                                  "resume it with the settings it started with")
            if budget is not None:  # the plan as made (step costs measured then), not a new one
                self.budget_plan.load_state_dict(budget, SubNet.from_dict)
                self._start(self.budget_plan.steps)
            self._load_weights(state, weights, ema)  # (a tensor missing or of another shape: the previous one)
            load_optimizer_state(self.optimizer, self._module(), opt)

        state, weights, ema, opt = read_checkpoint(self.out, None if self.budget_plan else self.total_steps,
                                                   self.acc.device, log=self.acc.print,
                                                   need_ema=self._momentum_module() is not None,
                                                   processes=self.acc.num_processes, apply=apply)
        budget = state.get("budget")
        self.controller.load_state_dict(state["controller"])
        self.step, self.stage, self.lr_step = state["step"], state["stage"], state["lr_step"]
        self.train_time, self.search_time = state["train_time_s"], state["search_time_s"]
        self.checkpoint_time = state.get("checkpoint_time_s", 0.0)
        self.flops_sum, self.history, self.stage_log = state["flops_sum"], state["history"], state["stage_log"]
        self.step_timer.load_state_dict(state["time_cache"])
        self._sec_per_flop = state["sec_per_flop"]
        self._pending_point, self._in_segment = state["pending_point"], state["in_segment"]
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        if budget is not None:
            self.total_steps = budget["total_steps"]
            self.lr_remap.load_state_dict(budget["lr_remap"])
        self._load_task_state(state)
        self._set_lr(self.lr_step)
        self.print(f"resumed from {state['checkpoint_dir']} at step {self.step}")

    def _data_identity(self) -> dict:
        """The training data's identity (:func:`~autoprog.data.dataset_identity`), made once per run; a checkpoint
        records it and a resume checks it."""
        if getattr(self, "_data_id", None) is None:
            self._data_id = self._training_data_identity()
        return self._data_id

    # --------------------------------------------------------------------------- TASK INTERFACE
    # What a task's trainer implements (each a few lines in the two trainers).
    def _training_data_identity(self) -> dict:
        """The training set's :func:`~autoprog.data.dataset_identity` (or :func:`~autoprog.data.tensor_identity`)."""
        raise NotImplementedError

    def _train_step(self, batch):
        """One optimizer step on ``batch`` (ending in :meth:`_apply_update`); the detached loss."""
        raise NotImplementedError

    def _segment_batches(self, start_step: int, share: dict):
        """The batches of the segment that began at ``start_step`` from ``self.step`` on, its random streams
        restored from ``share`` (this process's part of a checkpointed segment; {} at a start)."""
        raise NotImplementedError

    def _point_due(self, seg: dict | None) -> bool:
        """Whether the step just finished ends the segment (an evaluation point)."""
        raise NotImplementedError

    def _point_record(self, seg: dict, mean_loss: float) -> dict:
        """The training facts of the evaluation point that ends segment ``seg`` (before it is evaluated)."""
        raise NotImplementedError

    def _evaluate_point(self, record: dict, final: bool) -> None:
        """Evaluate the point ``record`` describes, add it to the history and say it."""
        raise NotImplementedError

    def _rng_states(self) -> dict:
        """This process's random states that a resumed segment continues from ({}: batches drawn by step)."""
        return {}

    def _step_flops_now(self) -> int:
        """FLOPs of the step just trained (0 when not counted)."""
        raise NotImplementedError

    def _count_step(self) -> None:
        """Task bookkeeping after a step (e.g. mean trainable parameters)."""

    def _update_momentum(self) -> None:
        """Update the momentum (EMA) network after an optimizer step, if there is one."""

    def _replan_due(self) -> bool:
        """Budget mode: whether to re-plan after the step just trained (besides stage starts)."""
        return False

    def _moved_end(self, end: int) -> None:
        """The run's end moved to ``end`` (budget mode): move what depends on it (epochs, evaluation points)."""

    def _checkpoint_due(self) -> bool:
        """Whether to checkpoint after the step just trained, inside a segment."""
        return False

    def _stage_ends_here(self) -> bool:
        """Whether the step just trained was its stage's last (a checkpoint is taken at every stage's end)."""
        return self.step < self.total_steps and self.controller.stage_at(self.step) != self.stage

    def _stop_after_reached(self) -> bool:
        """Whether ``stop_after_*`` stops the run at the point just finished."""
        return False

    def _before_run(self) -> None:
        """Before the first step of ``fit`` (a resumed run's too)."""

    def _finish_run(self) -> None:
        """After the last point of a run that trained to its end (an export)."""

    def _progress_fields(self) -> dict:
        return {}

    def _stage_entering(self, k: int) -> None:
        """Stage ``k`` is about to begin: before the controller enters it (and searches its candidates)."""

    def _stage_entered(self, k: int) -> None:
        """Stage ``k`` began (after the controller entered it)."""

    def _module(self):
        """The model being trained (not the prepared wrapper)."""
        return self.prepared.module

    def _momentum_module(self):
        """The momentum (EMA) network whose weights a checkpoint keeps, or None."""
        return None

    def _task_state(self) -> dict:
        return {}

    def _load_task_state(self, state: dict) -> None:
        """The task's part of a checkpoint's state, after the engine's (budget mode's moved end included)."""

    def _load_weights(self, state: dict, weights: dict, ema: dict | None) -> None:
        """Load the checkpoint's model (and momentum) weights into the structure the state describes."""
        raise NotImplementedError


def enter_due_stage(trainer, step_subnet: bool = True) -> bool:
    """Drive the controller before a step: enter the stage it assigns to ``trainer.step`` when that is a new one
    (the step timer starts afresh, the trainer hears of it), then (``step_subnet``) the step's own sub-network if
    it names one. Returns whether a stage began. The one place a controller's stage calls are made, for every
    trainer and :class:`~autoprog.loop.ProgressiveLoop`."""
    k = trainer.controller.stage_at(trainer.step)
    entered = k != trainer.stage
    if entered:
        trainer.step_timer.clear()  # candidates are timed afresh at every stage, never for the whole run
        trainer._stage_entering(k)
        t0 = time.perf_counter()
        trainer.controller.enter_stage(trainer, k)
        if getattr(trainer, "prepared", None) is not None:
            trainer.prepared.keep_current_only()
        trainer._stage_entered(k)
        trainer.stage = k
        trainer.search_time += time.perf_counter() - t0
    if not step_subnet:
        return entered
    sub = trainer.controller.step_subnet(trainer, trainer.step)
    if sub is not None and sub != trainer.subnet:
        trainer.use_subnet(sub)
    return entered


OVERFLOW_PATIENCE = 20  # fp16: this many overflowing steps in a row (each skipped) count as divergence


class HealthWatch:
    """The divergence guard, without a host-device sync per step. Each step's loss and gradient norm are checked on
    the device, which keeps the first non-finite one (its step, which of the two, its value); :meth:`check` reads
    that (one sync) every ``every`` steps and before every evaluation and checkpoint, and raises
    :class:`~autoprog.errors.DivergedError` naming the step. A non-finite model is therefore never saved or scored;
    under several processes the check agrees on the earliest such step."""

    def __init__(self, every: int = 50):
        self.every = every
        self._first = None  # device tensor [step, 0 loss / 1 gradient norm, value]; step -1: none yet
        self._loss = None  # the last step's loss (device)
        self.last_loss: float | None = None  # the loss as of the last check: what the progress shows
        self.last_step: int | None = None  # the step of that loss
        self.overflow_patience: int | None = None  # fp16: a non-finite gradient is an overflow, skipped, until
        self._overflows = None  # this many in a row (device count)
        self._guards: list = []  # (device count that must stay 0, or None; what a non-zero count means)

    def guard(self, count, meaning: str) -> None:
        """Also read, at every check and in the same sync, the device count ``count()`` returns (None: nothing
        counted yet); a non-zero count raises ``RuntimeError("internal error: " + meaning)``: an invariant of
        autoprog's own broken."""
        self._guards.append((count, meaning))

    def watch(self, step: int, loss, grad_norm) -> None:
        """Step ``step``'s loss and gradient norm (None: not clipped), kept on the device."""
        import torch

        loss = loss.detach().float().reshape(())
        bad_loss = ~torch.isfinite(loss)
        bad, value = bad_loss, loss
        if grad_norm is not None:
            norm = grad_norm.detach().float().reshape(())
            bad_norm = ~torch.isfinite(norm)
            if self.overflow_patience:
                running = self._overflows if self._overflows is not None else torch.zeros((), device=loss.device)
                self._overflows = torch.where(bad_norm, running + 1, 0.0)
                bad_norm = self._overflows >= self.overflow_patience
            bad = bad_loss | bad_norm
            value = torch.where(bad_loss, loss, norm)
        if self._first is None:
            self._first = torch.full((3,), -1.0, device=loss.device)
        candidate = torch.stack([torch.full((), float(step), device=loss.device), torch.where(bad_loss, 0.0, 1.0),
                                 value])
        self._first = torch.where(bad & (self._first[0] < 0), candidate, self._first)
        self._loss, self._step = loss, step

    def check(self, acc) -> None:
        """Read the device's record (every process's, gathered); raise if a step was not finite."""
        import torch

        from .errors import DivergedError

        if self._first is None:
            return
        counts = [c() for c, _ in self._guards]
        counts = [torch.zeros((), device=self._loss.device) if c is None else c.to(self._loss) for c in counts]
        mine = torch.cat([self._first, self._loss.reshape(1), *(c.reshape(1) for c in counts)])[None]
        rows = (acc.gather(mine) if acc.num_processes > 1 else mine).tolist()
        for i, (_, meaning) in enumerate(self._guards):
            if any(r[4 + i] for r in rows):
                raise RuntimeError(f"internal error: {meaning}")
        self.last_loss = sum(r[3] for r in rows) / len(rows)
        self.last_step = self._step
        bad = sorted(r[:3] for r in rows if r[0] >= 0)
        if bad:
            step, what, value = bad[0]
            if what == 1 and self.overflow_patience:
                raise DivergedError(f"training diverged at step {int(step)}: the fp16 gradients overflowed "
                                    f"{self.overflow_patience} steps in a row")
            raise DivergedError(f"training diverged at step {int(step)}: the "
                                f"{'loss' if what == 0 else 'gradient norm'} is {value}")


def agree_stop(acc, requested: bool, at_check: bool) -> bool:
    """Whether to stop after this step: a single process stops at once when asked; several agree at check steps
    only (one reduction), so all stop at the same step and other steps make no collective call."""
    if acc.num_processes == 1:
        return requested
    if not at_check:
        return False
    import torch

    flag = torch.full((), 1.0 if requested else 0.0, device=acc.device)
    return bool(acc.reduce(flag, reduction="sum") > 0)


class StopRequest:
    """While active (``with``), the first Ctrl-C or SIGTERM only asks training to stop: the trainer finishes the
    step, checkpoints it and raises :class:`~autoprog.errors.Interrupted`. A second one stops at once (the last
    checkpoint is kept). Outside the main thread it does nothing (signals are delivered there)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:  # a forked data-loader worker: its parent decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if os.environ.get("RANK", "0") == "0":  # os.write: safe even inside another print
            os.write(2, b"autoprog: stopping after this step (checkpointing it); press Ctrl-C again to stop at once\n")

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a launcher that ignores it (`cmd &`) is obeyed
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def diverged_note(trainer, error: Exception, write_results) -> str:
    """Record a divergence on ``trainer`` (``results.json`` gets ``diverged``, ``done`` stays false) and say where
    the last good checkpoint is."""
    import json

    trainer.diverged = str(error)
    write_results()
    from .checkpoint import CHECKPOINT_DIR

    state = trainer.out / CHECKPOINT_DIR / "state.json"
    if state.is_file():
        step = json.loads(state.read_text()).get("step")
        where = f"{state.parent} keeps the last good checkpoint (step {step})"
    else:
        where = "no checkpoint had been written yet"
    return f"{error}; {where}. Lower --lr (or raise the warm-up, or clip gradients) and start again"
