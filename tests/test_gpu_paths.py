"""The code paths a CUDA run takes, checked on the CPU where they run too (#26): the precision a run picks and
the fused AdamW that CUDA parameters get."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file


def test_auto_precision_is_fp32_on_the_cpu_and_explicit_choices_stay():
    from autoprog.cli import resolve_precision

    assert resolve_precision("auto", cpu=True) == "no"
    assert resolve_precision("bf16", cpu=True) == "bf16" and resolve_precision("no", cpu=False) == "no"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", cpu=False) == "no"


def test_the_optimizer_is_fused_exactly_when_every_parameter_is_on_cuda():
    from autoprog.optim import build_optimizer

    opt = build_optimizer(torch.nn.Linear(3, 3), 1e-3, 0.05)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    assert build_optimizer(torch.nn.Linear(3, 3), 1e-3, 0.05, fused=True).defaults["fused"]


def test_growth_and_resume_with_fused_adamw(cli, fake_fmnist, tmp_path, monkeypatch):
    """The fused optimizer CUDA runs get follows grown weights and gates (ReZero, identity growth) and resumes from
    a checkpoint to the same weights as an uninterrupted run."""
    import autoprog.optim as optim

    build, made = optim.build_optimizer, []

    def fused_always(m, lr, wd, fused=None):
        made.append(build(m, lr, wd, fused=True))
        return made[-1]

    monkeypatch.setattr(optim, "build_optimizer", fused_always)
    for module in ("autoprog.classification.trainer", "autoprog.diffusion.trainer"):
        monkeypatch.setattr(f"{module}.build_optimizer", optim.build_optimizer)
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "prog", "--growth", "identity", *tiny_args(fake_fmnist)]
    assert cli("pretrain", "--out", a, *args)[0] == 0
    assert cli("pretrain", "--out", b, "--stop-after-epochs", "1", *args)[0] == 0
    rc, _, err = cli("pretrain", "--resume", b, "--cpu")
    assert rc == 0, err
    assert json.loads((b / "results.json").read_text())["done"] is True
    wa, wb = (load_file(r / "checkpoint" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    opt = load_file(b / "checkpoint" / "optimizer.safetensors")
    assert any(".gate" in k for k in opt), "the gates' moments are kept"
    assert made and all(o.defaults["fused"] for o in made)


@pytest.mark.parametrize("fused", [False, True])
def test_shadow_update_builds_the_same_kind_of_optimizer(fused):
    from autoprog.optim import build_optimizer
    from autoprog.steptime import ShadowUpdate

    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, 1e-3, 0.0, fused=fused)
    model(torch.randn(2, 3)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ShadowUpdate(model.parameters(), opt, 1.0, 0.99)()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "shadow copies only"


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state, made with the first Accelerator's precision: start and end these
    tests with a new one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class _OneLayer:
    """The engine's update on a one-layer model, with ``--mixed-precision`` ``precision`` (CPU)."""

    def __new__(cls, precision: str):
        from types import SimpleNamespace

        from accelerate import Accelerator

        from autoprog.engine import RunTemplate

        class Tiny(RunTemplate):
            def _set_lr(self, position):
                pass

        t = Tiny.__new__(Tiny)
        t.acc = Accelerator(mixed_precision=precision, cpu=True)
        t.cfg = SimpleNamespace(grad_clip=1.0)
        torch.manual_seed(0)
        t.model = torch.nn.Linear(8, 1)
        t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=0.1)
        t._init_run_state()
        return t


def _step(t, scale_grads: float = 1.0):
    x = torch.full((4, 8), 0.1)
    with t.autocast():
        loss = t.model(x).float().pow(2).mean()  # a loss in fp32, as cross-entropy and MSE are under autocast
    hook = t.model.weight.register_hook(lambda g: g * scale_grads)
    try:
        t._apply_update(loss, t.model)
    finally:
        hook.remove()
    t.step += 1


def test_fp16_unscales_before_clipping_and_skips_an_overflow(monkeypatch, fresh_accelerate):
    from autoprog.errors import DivergedError

    t = _OneLayer("fp16")
    assert t._scaler is not None and t._scaler.get_scale() == 65536.0
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        seen.append(float(torch.stack([p.grad.norm() for p in params]).norm()))
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 1)  # the same weights in fp32
    loss = ref(torch.full((4, 8), 0.1)).pow(2).mean()
    loss.backward()
    true_norm = float(torch.stack([p.grad.norm() for p in ref.parameters()]).norm())
    _step(t)
    assert seen[0] == pytest.approx(true_norm, rel=0.05), "clipping sees the unscaled gradients"
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    _step(t, scale_grads=float("inf"))  # an overflow: skipped, the scale halves, no divergence
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert t._scaler.get_scale() == 32768.0
    t.health.check(t.acc)
    for _ in range(t.health.overflow_patience):
        _step(t, scale_grads=float("inf"))
    with pytest.raises(DivergedError, match="overflowed"):
        t.health.check(t.acc)


def test_fp16_training_runs_and_resumes(cli, fake_fmnist, tmp_path, fresh_accelerate):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "prog", "--mixed-precision", "fp16", *tiny_args(fake_fmnist)]
    rc, _, err = cli("pretrain", "--out", a, *args)
    assert rc == 0, err
    assert cli("pretrain", "--out", b, "--stop-after-epochs", "1", *args)[0] == 0
    assert json.loads((b / "checkpoint" / "state.json").read_text())["scaler"]["scale"] > 0
    rc, _, err = cli("pretrain", "--resume", b, "--cpu", "--mixed-precision", "fp16")
    assert rc == 0, err
    wa, wb = (load_file(r / "checkpoint" / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
