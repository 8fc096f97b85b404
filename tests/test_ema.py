"""LazyEma: timm's ModelEmaV3 average, with no work for the weights a step leaves unchanged."""

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from autoprog.ema import LazyEma


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))


def _train(schedule, reads=(), decay=0.9, fused=False, stale=()):
    """Train the same model under timm's EMA and LazyEma; ``schedule[i]`` names the learnable layers at step i.
    Returns both averages' state dicts at each step of ``reads`` and at the end, and the elements each update
    of the lazy one moved. ``fused``: an optimizer that changes weights without moving their version; ``stale``:
    steps at which a frozen layer keeps a gradient, which the optimizer steps."""
    model = _model()
    ref, lazy = ModelEmaV3(model, decay=decay), LazyEma(model, decay=decay)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, fused=fused)
    lazy.follow(opt)
    moved, per_update = [], []
    orig = lazy._foreach_lerp_

    def counting(ema_values, model_values, weight):
        moved.append(sum(t.numel() for t in ema_values))
        return orig(ema_values, model_values, weight)

    lazy._foreach_lerp_ = counting
    seen = []
    g = torch.Generator().manual_seed(1)
    for i, learnable in enumerate(schedule):
        for j, layer in enumerate(model):
            layer.requires_grad_(j in learnable)
        loss = model(torch.randn(16, 6, generator=g)).square().mean()
        loss.backward()
        if i in stale:
            model[0].weight.grad = torch.ones_like(model[0].weight)
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved.clear()
        ref.update(model)
        lazy.update(model)
        per_update.append(sum(moved))
        if i in reads:
            seen.append(({k: v.clone() for k, v in ref.module.state_dict().items()},
                         {k: v.clone() for k, v in lazy.averaged().state_dict().items()}))
    seen.append((ref.module.state_dict(), lazy.averaged().state_dict()))
    return seen, per_update


@pytest.mark.parametrize("reads", [(), (4, 12)])
@pytest.mark.parametrize("fused", [False, True])
def test_the_same_average_as_timms_while_layers_freeze_and_thaw(reads, fused):
    schedule = [{4}] * 6 + [{0, 3, 4}] * 5 + [{3}] * 4 + [{0, 1, 3, 4}] * 3 + [{4}] * 4
    seen, _ = _train(schedule, reads, fused=fused, stale=(2, 17))
    assert len(seen) == len(reads) + 1
    for ref, lazy in seen:
        assert ref.keys() == lazy.keys()
        for k in ref:
            assert torch.allclose(ref[k].float(), lazy[k].float(), atol=1e-6, rtol=1e-5), k


def test_an_update_moves_only_what_the_step_changed():
    model = _model()
    frozen = sum(p.numel() for j in (0, 1, 3) for p in model[j].parameters())
    learnable = sum(p.numel() for p in model[4].parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())  # BatchNorm's running statistics
    _, per_update = _train([{4}] * 5)
    assert per_update[0] == learnable + frozen + buffers  # the first update: no version is known yet
    assert per_update[1:] == [learnable + buffers] * 4  # later: the frozen layers' updates are deferred


def test_a_frozen_weight_changed_by_hand_is_refused_unless_settled_first():
    model = _model()
    model[0].requires_grad_(False)
    lazy = LazyEma(model, decay=0.9)
    lazy.update(model)
    lazy.update(model)  # frozen, unchanged: deferred
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="outside the optimizer"):
        lazy.update(model)
    lazy = LazyEma(model, decay=0.9)
    lazy.update(model)
    lazy.update(model)
    lazy.averaged()  # what was owed applied: the change is an ordinary one
    with torch.no_grad():
        model[0].weight.add_(1.0)
    lazy.update(model)
    ref = model[0].weight.detach()
    assert torch.allclose(lazy.averaged()[0].weight, 0.1 * ref + 0.9 * (ref - 1.0))


def test_forget_after_loading_weights():
    model = _model().requires_grad_(False)
    lazy = LazyEma(model, decay=0.5)
    lazy.update(model)
    lazy.update(model)
    with torch.no_grad():
        model[0].weight.zero_()
    lazy.forget()  # (the owed updates dropped: the loaded weights are the truth now)
    lazy.module.load_state_dict(model.state_dict())
    lazy.update(model)
    assert torch.equal(lazy.averaged()[0].weight, torch.zeros_like(model[0].weight))


def test_the_models_tensors_are_listed_once_and_a_replaced_one_is_caught_at_the_next_read(monkeypatch):
    model = _model()
    lazy = LazyEma(model, decay=0.9)
    walks = []
    real = nn.Module.state_dict
    tops = (model, lazy.module)  # (state_dict calls itself on every submodule)
    monkeypatch.setattr(nn.Module, "state_dict",
                        lambda self, *a, **k: (self in tops and walks.append(1)) or real(self, *a, **k))
    for _ in range(5):
        lazy.update(model)
    assert len(walks) == 2, "the average's and the model's state listed at the first update only"
    lazy.averaged()  # the check: listed afresh, the same tensors
    model[0].bias = nn.Parameter(torch.zeros(8))  # replaced, not changed in place
    lazy.update(model)
    with pytest.raises(RuntimeError, match="replaced after its EMA was made"):
        lazy.averaged()
    lazy.forget()
    before = lazy.module[0].bias.detach().clone()
    lazy.update(model)  # listed afresh: towards the new bias
    assert torch.allclose(lazy.averaged()[0].bias, 0.9 * before)


def test_a_weight_learnable_again_but_not_stepped_keeps_timms_average():
    """Unfrozen, then no gradient at its first step (or a skipped step): its deferred updates are applied at the
    next update, not refused."""
    model = _model()
    ref, lazy = ModelEmaV3(model, decay=0.9), LazyEma(model, decay=0.9)
    model[0].requires_grad_(False)
    for _ in range(3):
        ref.update(model), lazy.update(model)
    model[0].requires_grad_(True)  # learnable again, no optimizer step
    ref.update(model), lazy.update(model)
    assert torch.allclose(ref.module[0].weight, lazy.averaged()[0].weight, atol=1e-7)


class _TwoProcesses:
    """An accelerator as PreparedModel sees one under DDP (its wrappers built by the patched ``_ddp``)."""

    num_processes = 2

    def prepare_model(self, module):
        return module


@pytest.mark.parametrize("settled", [True, False])
def test_a_ddp_wrapper_built_mid_stage_settles_the_ema_first(settled, monkeypatch):
    """Building a DDP wrapper broadcasts every parameter in place (their versions move, their values do not): the
    EMA's deferred updates are applied before, as the fine-tuning trainer asks (``before_build``); a search that
    trains sets A, B, A, C (AutoProg-One's supernet phase) then keeps timm's average."""
    from autoprog.engine import PreparedModel

    def broadcast(self):
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(p.detach().clone())
        return self.module

    monkeypatch.setattr(PreparedModel, "_ddp", broadcast)
    model = _model()
    ref, lazy = ModelEmaV3(model, decay=0.9), LazyEma(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    lazy.follow(opt)
    prepared = PreparedModel(_TwoProcesses(), model)
    if settled:
        prepared.before_build = lazy.settle
    g = torch.Generator().manual_seed(1)
    for learnable in ({0}, {0, 3}, {0}, {0, 3, 4}):
        for j, layer in enumerate(model):
            layer.requires_grad_(j in learnable)
        wrapped = prepared.current()
        wrapped(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.update(model)
        if not settled and learnable == {0, 3, 4}:
            with pytest.raises(RuntimeError, match="outside the optimizer"):
                lazy.update(model)
            return
        lazy.update(model)
    for k, v in ref.module.state_dict().items():
        assert torch.allclose(v.float(), lazy.averaged().state_dict()[k].float(), atol=1e-6), k
