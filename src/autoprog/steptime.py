"""T, a candidate's training step time (Eq. 18): one timer for every search of every task.

* :func:`measure_step_time` -- the median seconds of a step over timed repeats (5) after untimed warm-ups (2); on
  a GPU timed by CUDA events.
* :class:`ShadowUpdate` -- the update half of a training step (gradient clipping, the optimizer step, the
  momentum update) run on shadow copies of the learnable parameters, so timing it changes no weight and no
  optimizer state.
* :class:`StepMarks` -- marks between the steps of a running training loop, read later: on a GPU CUDA events, so
  timing a run's own steps (AutoProg-One's supernet phase) never waits for the device.
* :class:`StepTimer` -- measures a candidate once per stage (a cache keyed by the candidate) in one of
  :data:`SCOPES`: ``"forward-backward"`` is the paper's runtime ("the total GPU hours used in forward and backward
  pass", footnote 1) and what the official code times; ``"whole"`` (ours) adds the update: gradient clipping and
  the optimizer step, which freezing saves (frozen weights have neither), and the momentum update, as the trainers
  run it (fine-tuning's skips the frozen weights).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .options import option

SCOPES = ("forward-backward", "whole")
TIME_SOURCES = ("measured", "flops")


@dataclass
class SearchMeasurements:
    """How the searches measure their candidates, in every task: the zero-shot proxies' fixed batches, and where
    a candidate's step time T comes from and what it covers. The task configs extend it."""

    proxy_batches: int = option(4, "AutoProg-Zero: fixed training batches for the NTK and ZiCo proxies, at least 2 "
                                   "(ZiCo needs a spread across batches)", minimum=2, group="searches")
    proxy_batch_size: int = option(8, "AutoProg-Zero: samples per proxy batch", minimum=1, group="searches")
    time_source: str = option("measured", "step times of the searches' candidates: measured (median of repeats, "
                                          "afresh each stage; pre-training's AutoProg-One by default times its "
                                          "candidates' own supernet steps, see --search-step-time), or flops "
                                          "(training FLOPs times one calibration, so a busy machine cannot change "
                                          "a choice)", choices=TIME_SOURCES, group="searches")
    step_time_scope: str = option("forward-backward", "what a candidate's measured step time covers: "
                                                      "forward-backward (the paper's runtime, footnote 1, and the "
                                                      "official code's timer) or whole (ours: also gradient "
                                                      "clipping and the optimizer step, which freezing saves, and "
                                                      "the momentum update, on shadow copies). Budget mode always "
                                                      "plans with forward-backward; pre-training's AutoProg-One "
                                                      "supernet steps are whole steps",
                                  choices=SCOPES, group="searches")


REPEATS = 5  # timed steps per candidate (their median), after WARMUP untimed ones: one default for every search
WARMUP = 2  # a new resolution's or sub-network's first steps pay one-off costs (allocation, autotuning)


def measure_step_time(
    step: Callable[[], None],
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    device: torch.device | str | None = None,
    clock: Callable[[], float] | None = None,
) -> float:
    """T of Eq. 18: median seconds of ``step()`` over ``repeats`` timed calls after ``warmup`` untimed ones.

    On a CUDA ``device`` each call is timed by CUDA events recorded on the device's stream around it (the span
    from the first queued kernel to the last, launch gaps included), read after one synchronisation at the end;
    elsewhere by ``clock`` (default ``time.perf_counter``).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        step()
    if cuda and clock is None:
        return statistics.median(_cuda_event_times(step, repeats, torch.device(device)))
    clock = clock or time.perf_counter
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        step()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def _cuda_event_times(step: Callable[[], None], repeats: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` calls of ``step()`` on ``device``, by CUDA events (one synchronisation, at the end)."""
    with torch.cuda.device(device):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        marks[0].record()
        for k in range(repeats):
            step()
            marks[k + 1].record()
        marks[-1].synchronize()
    return [a.elapsed_time(b) / 1000.0 for a, b in zip(marks, marks[1:])]  # elapsed_time is in milliseconds


@dataclass(frozen=True)
class StepMark:
    """A point between two training steps (see :class:`StepMarks`): the training clock's seconds, the stretch of
    the clock it belongs to and, on a GPU, a CUDA event recorded there. It refers to no trainer, so a controller
    may keep marks without keeping the trainer alive."""

    seconds: float
    stretch: object = None
    event: object = None

    def seconds_to(self, end: StepMark) -> float | None:
        """Seconds from this mark to ``end`` (a mark made after it), or None where they cannot be compared: on a
        GPU the device's time between the two events (waiting for ``end``'s), and None across two stretches of
        the clock; elsewhere the clock's."""
        if self.event is None or end.event is None:
            return end.seconds - self.seconds
        if self.stretch != end.stretch:
            return None
        end.event.synchronize()
        return self.event.elapsed_time(end.event) / 1000.0  # elapsed_time is in milliseconds


class StepMarks:
    """Marks between the steps of a running training loop, and the seconds between two of them.

    ``clock()`` gives the training clock's seconds (evaluation and measurement left out). On a CUDA ``device`` a
    mark also records a CUDA event on the device's stream, and the seconds between two marks are the device's:
    from the end of the work queued before the first to the end of the work queued before the second, launch and
    data waits included. So a loop's steps are timed as they run, overlapped with the host, without a host-device
    synchronisation per step; :meth:`StepMark.seconds_to` synchronises on the later mark's event, so read the
    marks when a decision needs them. ``stretch()`` names the clock's running stretch: on a GPU two marks of different
    stretches (an evaluation or a measurement came between them, which the events would count) give ``None``.
    Elsewhere the seconds are the clock's, as before. Build one when marking (a trainer's ``step_marks``
    property): it holds the trainer's clock, and kept on the trainer it would make a reference cycle.
    """

    def __init__(self, clock: Callable[[], float], device: torch.device | str | None = None,
                 stretch: Callable[[], object] | None = None):
        self.clock, self.stretch = clock, stretch or (lambda: None)
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.device = torch.device(device) if self.cuda else None

    def mark(self) -> StepMark:
        """A mark here, after the work queued so far (no synchronisation)."""
        event = None
        if self.cuda:
            with torch.cuda.device(self.device):
                event = torch.cuda.Event(enable_timing=True)
                event.record()
        return StepMark(self.clock(), self.stretch(), event)


class ShadowUpdate:
    """The update half of a training step for a model's ``params``, on shadow copies.

    Each call clips the learnable parameters' real gradients (they are discarded after timing), hands them to an
    optimizer of the trainer's optimizer's class and default settings (per-group settings such as the no-decay
    group cost the same and are not copied) over shadows of the learnable parameters, steps it, and moves a
    momentum copy of the parameters the trainer's momentum network moves: every one (``ema_frozen``, as
    pre-training's does), or only the learnable ones (as fine-tuning's :class:`~autoprog.ema.LazyEma`, which
    defers the frozen weights' updates): the work a real step does, touching none of the real weights or state.
    Parameters without a gradient are skipped by the optimizer, as the real one skips them. It holds about three
    copies of the learnable parameters and one of the momentum's while it lives.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None,
                 ema_decay: float | None, ema_frozen: bool = True):
        every = list(params)
        self.params = [p for p in every if p.requires_grad]
        self.shadow = [p.detach().clone().requires_grad_(True) for p in self.params]
        self.optimizer = None
        if self.params:  # an optimizer refuses an empty parameter list
            real = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            accepts = inspect.signature(type(real)).parameters  # defaults may hold more than the constructor takes
            self.optimizer = type(real)(self.shadow, **{k: v for k, v in real.defaults.items() if k in accepts})
        self.grad_clip = grad_clip
        self.decay = ema_decay
        moved = every if ema_frozen else self.params
        self.targets = [p.detach() for p in moved if p.is_floating_point()] if ema_decay else []
        self.momentum = [t.clone() for t in self.targets]

    def __call__(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if live:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_([self.params[i] for i in live], self.grad_clip)
            for i in live:
                self.shadow[i].grad = self.params[i].grad
            self.optimizer.step()
            for s in self.shadow:
                s.grad = None
        if self.momentum:
            with torch.no_grad():
                torch._foreach_lerp_(self.momentum, self.targets, 1.0 - self.decay)


class StepTimer:
    """Each candidate's step time, measured once per stage (see the module docstring for ``scope``)."""

    def __init__(self, repeats: int = REPEATS, warmup: int = WARMUP, scope: str = "forward-backward",
                 device: torch.device | str | None = None):
        if scope not in SCOPES:
            raise ConfigError(f"--step-time-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.repeats, self.warmup, self.scope, self.device = repeats, warmup, scope, device
        self.cache: dict[str, float] = {}

    def measure(self, forward_backward: Callable[[], None], update: Callable[[], ShadowUpdate] | None = None,
                clear_grads: Callable[[], None] | None = None, repeats: int | None = None,
                scope: str | None = None) -> float:
        """Seconds of one step: ``forward_backward()`` (which leaves the gradients), then with the ``"whole"``
        scope (``scope``, default: the timer's) the update that ``update()`` builds; ``clear_grads()`` after each
        step. Not cached."""
        shadow = update() if (scope or self.scope) == "whole" and update is not None else None

        def step():
            forward_backward()
            if shadow is not None:
                shadow()
            if clear_grads is not None:
                clear_grads()

        return measure_step_time(step, repeats=repeats or self.repeats, warmup=self.warmup, device=self.device)

    def time(self, key: str, measure: Callable[[], float]) -> float:
        """The step time of the candidate ``key``, measured by ``measure()`` once per stage (until :meth:`clear`)."""
        if key not in self.cache:
            self.cache[key] = measure()
        return self.cache[key]

    def clear(self) -> None:
        """Forget the measured times (at a new stage every candidate is timed afresh)."""
        self.cache.clear()

    def state_dict(self) -> dict[str, float]:
        return dict(self.cache)

    def load_state_dict(self, state: dict) -> None:
        self.cache = {str(k): float(v) for k, v in state.items()}
