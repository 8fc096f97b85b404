"""An EMA of a model's weights that does no work for the weights a step leaves unchanged.

timm's ``ModelEmaV3`` moves every floating tensor of the state dict after every optimizer step. When most of a
model is frozen (progressive unfreezing, BitFit, LoRA), that is most of its memory traffic for nothing new: a
frozen weight ``v`` is constant, and ``k`` updates with decays ``d_1 … d_k`` towards a constant are one,

    ema ← v + (Π d_i)·(ema − v)  =  lerp(ema, v, 1 − Π d_i).

:class:`LazyEma` defers the update of every frozen weight (a parameter that does not require a gradient) left
unchanged since the previous update (its in-place version counter has not moved) and applies the deferred steps
at once, before anything reads the average (:meth:`LazyEma.averaged`) and before the optimizer changes the weight
(a step pre-hook, :meth:`LazyEma.follow`). Learnable weights and buffers are moved at every update, as timm moves
them (a fused optimizer and BatchNorm's running statistics change tensors without moving their version). The
average is the one timm's computes, up to float rounding.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class LazyEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (every floating tensor of the state dict, buffers too), skipping unchanged tensors.

    Read the average through :meth:`averaged` (it applies what is owed); call :meth:`follow` with the optimizer
    that trains the model, :meth:`settle` before changing weights any other way, and :meth:`forget` after loading
    weights into the model or the average.
    """

    def __init__(self, model: nn.Module, decay: float, **kw):
        super().__init__(model, decay=decay, **kw)
        self._seen: dict[int, int] = {}  # id(model tensor) → its version counter at the previous update
        self._owed: dict[int, list] = {}  # id(model tensor) → [ema tensor, model tensor, product of decays owed]
        self._paired: tuple | None = None  # (the model, its state's tensors beside the average's), listed once

    def follow(self, optimizer: torch.optim.Optimizer):
        """Apply the deferred updates of the tensors ``optimizer`` is about to change, before each of its steps
        (a tensor it steps has a gradient). Returns the hook's handle."""
        return optimizer.register_step_pre_hook(lambda opt, *_: self._before_step(opt))

    def settle(self) -> None:
        """Apply every deferred update now: before anything changes the model's weights other than the optimizer
        (a DDP wrapper's build broadcasts every parameter in place, which moves their versions)."""
        self._settle(None)

    def averaged(self) -> nn.Module:
        """The average, with every deferred update applied. Checks that the model still holds the tensors the
        updates have been moving towards (they are listed once, not at every update)."""
        self.settle()
        if self._paired is not None and not _same_tensors(self._listed(self._paired[0]), self._paired[1]):
            raise RuntimeError("a tensor of the model was replaced after its EMA was made (the EMA moved towards "
                               "the old one); call LazyEma.forget() after replacing parameters or buffers")
        return self.module

    def forget(self) -> None:
        """Drop what is owed, every remembered version and the list of the model's tensors: after weights were
        loaded into either model (or tensors replaced), the next update moves every tensor."""
        self._seen.clear()
        self._owed.clear()
        self._paired = None

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_listed`, once per model (walking a large model's module tree costs milliseconds of Python at
        every step)."""
        if self._paired is None or self._paired[0] is not model:
            self._paired = (model, self._listed(model))
        return self._paired[1]

    def _listed(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The average's state tensors beside ``model``'s."""
        return list(zip(self.module.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        super().set(model)
        self.forget()

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        ema_values, model_values = [], []
        for ema_v, model_v in self._pairs(model):
            if not ema_v.is_floating_point():
                ema_v.copy_(model_v)
                continue
            key, version = id(model_v), model_v._version
            owed = self._owed.get(key)
            frozen = isinstance(model_v, nn.Parameter) and not model_v.requires_grad
            if frozen and self._seen.get(key) == version:  # unchanged since the previous update: defer this one
                if owed is None:
                    self._owed[key] = [ema_v, model_v, decay]
                else:
                    owed[2] *= decay
                continue
            if owed is not None:
                if self._seen.get(key) != version:  # changed while its updates were owed, not by the optimizer
                    raise RuntimeError("a frozen weight changed outside the optimizer while its EMA updates were "
                                       "deferred; call LazyEma.settle() before changing weights by hand")
                self._settle({key})  # learnable again but not stepped (no gradient, or a skipped step): unchanged
            self._seen[key] = version
            ema_values.append(ema_v.data)
            model_values.append(model_v.data)
        if ema_values:
            self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)

    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        raise NotImplementedError("LazyEma averages buffers too (exclude_buffers=False)")

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer is about to step every parameter with a gradient (a frozen one too, should it hold a
        stale gradient): apply what they owe towards the values they still have. (Deferring again after the step
        is exact whatever their version says: the owed updates move towards the value they then have.)"""
        if self._owed:
            self._settle({id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None})

    @torch.no_grad()
    def _settle(self, keys: set[int] | None) -> None:
        """Apply the deferred updates of the owed tensors (those of ``keys``, or all)."""
        due = [k for k in self._owed if keys is None or k in keys]
        groups: dict[float, tuple[list, list]] = {}
        for key in due:
            ema_v, model_v, product = self._owed.pop(key)
            ema_list, model_list = groups.setdefault(1.0 - product, ([], []))
            ema_list.append(ema_v.data)
            model_list.append(model_v.data)
        for weight, (ema_list, model_list) in groups.items():
            self._foreach_lerp_(ema_list, model_list, weight=weight)


def _same_tensors(a: list[tuple], b: list[tuple]) -> bool:
    """Whether two lists of tensor pairs hold the very same tensor objects (identity, never values)."""
    return len(a) == len(b) and all(x is y for pa, pb in zip(a, b) for x, y in zip(pa, pb))
