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
