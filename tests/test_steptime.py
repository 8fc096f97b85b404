"""The one step timer of every search: what a timed step covers, and that timing changes nothing it touches."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from autoprog.errors import ConfigError
from autoprog.steptime import ShadowUpdate, StepTimer


def _model_with_state():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.05, foreach=True)
    m(torch.randn(4, 6)).sum().backward()
    opt.step()  # the real optimizer has state, as mid-training
    opt.zero_grad(set_to_none=True)
    return m, opt


def _snapshot(m, opt):
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    return weights, state


def _same(m, opt, snap) -> bool:
    weights, state = snap
    return (all(torch.equal(p, weights[n]) for n, p in m.named_parameters())
            and {id(p) for p in opt.state} == set(state)
            and all(torch.equal(v, state[id(p)][k]) for p, s in opt.state.items() for k, v in s.items()
                    if torch.is_tensor(v)))


def test_the_shadow_update_steps_copies_and_leaves_the_real_weights_and_state_alone():
    m, opt = _model_with_state()
    m[0].requires_grad_(False)  # a frozen layer: neither stepped nor shadowed
    snap = _snapshot(m, opt)
    update = ShadowUpdate(m.parameters(), opt, grad_clip=1e-3, ema_decay=0.9)
    assert len(update.shadow) == 2 and update.optimizer.defaults["foreach"] is True
    assert len(update.momentum) == 4, "pre-training's momentum network covers every parameter, frozen ones too"
    assert len(ShadowUpdate(m.parameters(), opt, None, 0.9, ema_frozen=False).momentum) == 2, \
        "fine-tuning's defers the frozen weights"
    before = [s.detach().clone() for s in update.shadow]
    for _ in range(3):
        m(torch.randn(4, 6)).sum().backward()
        update()
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * 1.0001, "clipped"
        assert all(s.grad is None for s in update.shadow)
        for p in m.parameters():
            p.grad = None
    assert _same(m, opt, snap), "timing an update must not change the model or its optimizer"
    assert all(not torch.equal(a, b) for a, b in zip(before, update.shadow)), "the shadows were stepped"
    assert len(update.optimizer.state) == 2


def test_the_shadow_update_skips_parameters_without_a_gradient():
    m, opt = _model_with_state()
    update = ShadowUpdate(m.parameters(), opt, grad_clip=None, ema_decay=None)
    before = [s.detach().clone() for s in update.shadow]
    m[2](torch.randn(4, 8)).sum().backward()  # only the last layer gets gradients
    update()
    moved = [not torch.equal(a, b) for a, b in zip(before, update.shadow)]
    assert moved == [False, False, True, True]


def test_the_whole_scope_adds_the_update_to_every_timed_step_and_forward_backward_never_builds_it():
    calls = {"fb": 0, "built": 0, "update": 0, "clear": 0}

    def build():
        calls["built"] += 1
        return lambda: calls.__setitem__("update", calls["update"] + 1)

    def fb():
        calls["fb"] += 1

    def clear():
        calls["clear"] += 1

    StepTimer(repeats=3, warmup=2, scope="whole").measure(fb, build, clear)
    assert calls == {"fb": 5, "built": 1, "update": 5, "clear": 5}
    calls.update(fb=0, built=0, update=0, clear=0)
    StepTimer(repeats=3, warmup=2).measure(fb, build, clear)
    assert calls == {"fb": 5, "built": 0, "update": 0, "clear": 5}
    with pytest.raises(ConfigError, match="--step-time-scope"):
        StepTimer(scope="all")


def test_a_candidate_is_timed_once_until_the_timer_is_cleared():
    timer, measured = StepTimer(), []
    assert timer.time("16:2", lambda: measured.append(1) or 0.5) == 0.5
    assert timer.time("16:2", lambda: measured.append(1) or 9.0) == 0.5 and len(measured) == 1
    state = timer.state_dict()
    timer.clear()
    assert timer.time("16:2", lambda: 2.0) == 2.0
    timer.load_state_dict(state)
    assert timer.cache == {"16:2": 0.5}


def test_fine_tuning_times_whole_steps_without_changing_the_model_or_its_optimizer(fake_fmnist, cache_dir, tmp_path,
                                                                                  monkeypatch):
    from conftest import tiny_base_dit
    from test_finetune import TINY, spec_for

    from autoprog.diffusion.runner import finetune
    from autoprog.diffusion.trainer import DiffusionTrainer
    base = tiny_base_dit(fake_fmnist, cache_dir, tmp_path / "base", replace(TINY, steps=6, eval_points=1))
    real_measure, real_update, checked, updates = DiffusionTrainer.measure_step_time, ShadowUpdate.__call__, [], []

    def checked_measure(self, subnet):
        snap = _snapshot(self.model, self.optimizer)
        t = real_measure(self, subnet)
        assert _same(self.model, self.optimizer, snap), "a timed step changed the model or the optimizer"
        checked.append(t)
        return t

    def counted(self):
        updates.append(1)
        return real_update(self)

    monkeypatch.setattr(DiffusionTrainer, "measure_step_time", checked_measure)
    monkeypatch.setattr(ShadowUpdate, "__call__", counted)
    spec = spec_for("autoprog-zero", base, fake_fmnist, cache_dir, step_time_scope="whole", ema_decay=0.9)
    res = finetune(spec, tmp_path / "whole")
    assert res["done"] and len(checked) >= 3 and all(t > 0 for t in checked)
    assert len(updates) >= 3 * len(checked), "every timed step ran the update"
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())["spec"]["train"]
    assert saved["step_time_scope"] == "whole"


def test_a_fine_tuning_checkpoint_with_the_old_time_cache_resumes(fake_fmnist, cache_dir, tmp_path, monkeypatch):
    from conftest import tiny_base_dit
    from test_finetune import TINY, spec_for

    from autoprog.diffusion.runner import finetune

    base = tiny_base_dit(fake_fmnist, cache_dir, tmp_path / "base", replace(TINY, steps=6, eval_points=1))
    out = tmp_path / "run"
    finetune(spec_for("autoprog-zero", base, fake_fmnist, cache_dir, stop_after_steps=3), out)
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert isinstance(state["time_cache"], dict) and state["time_cache"]
    # before 2026-12-06 the cache was saved as [[resolution, blocks, seconds], ...]
    expected = dict(state["time_cache"])
    state["time_cache"] = [[int(k.split(":")[0]), [int(b) for b in k.split(":")[1].split(",")], v]
                           for k, v in state["time_cache"].items()]
    del state["format"]  # and then a checkpoint state had no format (read as autoprog-run/1, migrated)
    state_file.write_text(json.dumps(state))
    from autoprog.diffusion.trainer import DiffusionTrainer

    restored, load = [], DiffusionTrainer._load_checkpoint

    def capture(self):
        load(self)
        restored.append(dict(self.step_timer.cache))

    monkeypatch.setattr(DiffusionTrainer, "_load_checkpoint", capture)
    assert finetune(None, out, resume=True)["done"]
    assert restored == [expected], "the old cache is read, not dropped"
