"""Our search criterion ``gain`` (autoprog.algorithms.gain): the predicted decrease of the full model's
full-resolution loss per second of training a candidate, for AutoProg-Zero on both tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args
from torch import nn

from autoprog.algorithms.gain import Gradients, choose_by_gain, gain_per_second, gradients, predicted_gain
from autoprog.controllers import ProxyTask


def test_the_gain_is_the_first_order_decrease_of_the_target_loss():
    target = {"w": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([1.0])}
    # g = (1, 1, 1) on w only: one Adam-like step along g/rms(g) = (1, 1, 1) lowers the target loss by 3 per lr
    assert predicted_gain(target, {"w": torch.ones(3)}) == pytest.approx(3.0)
    # scaling the candidate's gradient changes nothing (Adam normalises it); opposing it makes the gain negative
    assert predicted_gain(target, {"w": 10 * torch.ones(3)}) == pytest.approx(3.0)
    assert predicted_gain(target, {"w": -torch.ones(3)}) == pytest.approx(-3.0)
    # a parameter the target does not have (or of another shape) is left out
    assert predicted_gain(target, {"w": torch.ones(3), "x": torch.ones(2), "b": torch.ones(2)}) == pytest.approx(3.0)
    assert predicted_gain(target, {"x": torch.ones(2)}) == 0.0
    assert predicted_gain(target, {"w": torch.tensor([math.nan, 1.0, 1.0])}) == -math.inf


def test_per_second_and_the_choice():
    target, grads = {"w": torch.ones(4)}, {"w": torch.ones(4)}
    assert gain_per_second(target, grads, 2.0) == pytest.approx(2.0)
    assert gain_per_second(target, grads, 0.0) == -math.inf
    assert choose_by_gain([1.0, 3.0, 3.0, -math.inf]) == 1, "the largest, the first of equals"
    from autoprog.errors import DivergedError

    with pytest.raises(DivergedError, match="non-finite"):
        choose_by_gain([-math.inf, math.nan])


def test_gradients_are_the_mean_over_batches_and_leave_no_grad():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    task = ProxyTask(net, batches, forward=lambda m, b: m(b[0]), loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    net.weight.grad = torch.full_like(net.weight, 7.0)  # a caller's accumulating gradient is kept
    got = gradients(task)
    assert len(got.folds) == 2 and set(got.mean) == {"weight"}
    assert torch.equal(net.weight.grad, torch.full_like(net.weight, 7.0))
    net.weight.grad = None
    losses = [F.cross_entropy(net(x), y) for x, y in batches]
    for fold, loss in zip(got.folds, losses):  # batch i is in fold i % 2
        torch.testing.assert_close(fold["weight"], torch.autograd.grad(loss, net.weight, retain_graph=True)[0])
    torch.testing.assert_close(got.mean["weight"], torch.autograd.grad(sum(losses) / 2, net.weight)[0])
    assert got.loss == pytest.approx(float(sum(losses)) / 2)
    one = gradients(task, folds=1)
    assert len(one.folds) == 1
    torch.testing.assert_close(one.folds[0]["weight"], got.mean["weight"])
    assert len(gradients(ProxyTask(net, batches[:1], task.forward, task.loss), folds=2).folds) == 1, \
        "fewer batches than folds: one fold"


def test_cross_fitting_pairs_different_folds_only():
    a1, a2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    b1, b2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    target, cand = Gradients([{"w": a1}, {"w": a2}]), Gradients([{"w": b1}, {"w": b2}])
    rms = math.sqrt(((b1 + b2) / 2).pow(2).mean())
    cross = (float(a1 @ b2) + float(a2 @ b1)) / 2  # = 0: every matching-fold product is left out
    assert predicted_gain(target, cand) == pytest.approx(cross / rms)
    plain = float(((a1 + a2) / 2) @ ((b1 + b2) / 2))
    assert predicted_gain(target, Gradients([cand.mean])) == pytest.approx(plain / rms), "one fold: the plain dot"
    assert predicted_gain({"w": target.mean["w"]}, cand.mean) == pytest.approx(plain / rms)


def test_cross_fitting_removes_the_noise_bias_toward_the_target():
    """At a minimum the expected gradient is zero, so no candidate should look like it helps; the same-sample
    estimate still scores the target model against itself by its gradient noise (always > 0)."""
    plain, cross = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        xs, ys = torch.randn(64, 5, generator=g), torch.randn(64, generator=g)
        net = nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            net.weight.zero_()  # y is independent of x: zero weights are the population's minimum
        batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
        task = ProxyTask(net, batches, lambda m, b: m(b[0]), lambda m, b: (m(b[0]).squeeze(1) - b[1]).pow(2).mean())
        grads = gradients(task)
        plain.append(predicted_gain(grads.mean, grads.mean))
        cross.append(predicted_gain(grads, grads))
    assert min(plain) > 0
    assert any(c < 0 for c in cross), "an unbiased estimate of zero takes both signs"
    assert abs(sum(cross) / len(cross)) < 0.25 * sum(plain) / len(plain)


def test_pretraining_autoprog_zero_by_gain(cli, fake_fmnist, tmp_path):
    out = tmp_path / "gain"
    rc, _, err = cli("pretrain", "--method", "autoprog-zero", "--criterion", "gain", "--time-source", "flops",
                     "--out", out, *tiny_args(fake_fmnist))
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    search = res["summary"]["search"]
    assert [s["stage"] for s in search] == [1, 2, 3] and all(s["criterion"] == "gain" for s in search)
    for s in search:
        gains = [c["gain_per_s"] for c in s["candidates"]]
        assert all(g is not None and math.isfinite(g) for g in gains)
        assert s["chosen"] == max(range(len(gains)), key=lambda i: (gains[i], -i)), "the largest gain wins"
    assert (res["summary"]["schedule"]["stages"][-1]["resolution"], res["summary"]["schedule"]["stages"][-1]["depth"]) \
        == (28, 4)
    # the same seed on the same machine chooses the same (FLOPs time source: no timing noise)
    rc, _, err = cli("pretrain", "--method", "autoprog-zero", "--criterion", "gain", "--time-source", "flops",
                     "--out", tmp_path / "again", *tiny_args(fake_fmnist))
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["summary"]["schedule"] == res["summary"]["schedule"]


def test_autoprog_one_by_gain_keeps_the_largest_predicted_gain(cli, fake_fmnist, tmp_path):
    rc, _, err = cli("pretrain", "--method", "autoprog-one", "--criterion", "gain", "--time-source", "flops",
                     "--search-samples", "32", "--out", tmp_path / "one", *tiny_args(fake_fmnist))
    assert rc == 0, err
    search = json.loads((tmp_path / "one" / "results.json").read_text())["summary"]["search"]
    assert [s["stage"] for s in search] == [1, 2, 3] and all(s["criterion"] == "gain" for s in search)
    for s in search:
        scores = [c["score"] for c in s["candidates"]]
        assert all(math.isfinite(g) for g in scores)
        chosen = [c["chosen"] for c in s["candidates"]].index(True)
        assert chosen == scores.index(max(scores)), "the largest gain per second wins"


def test_the_gain_variant_names_run_the_gain_criterion(cli, fake_fmnist, tmp_path):
    from autoprog.methods import FINETUNE, get_method

    m = get_method("autoprog-zero-gain", FINETUNE)
    assert (m.base, m.options) == ("autoprog-zero", {"criterion": "gain"})
    rc, _, err = cli("pretrain", "--method", "autoprog-zero-gain", "--time-source", "flops", "--out", tmp_path / "g",
                     *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    search = json.loads((tmp_path / "g" / "results.json").read_text())["summary"]["search"]
    assert search and all(s["criterion"] == "gain" for s in search)
    rc, _, err = cli("pretrain", "--method", "autoprog-one-gain", "--time-source", "flops", "--search-samples", "32",
                     "--out", tmp_path / "g1", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    search = json.loads((tmp_path / "g1" / "results.json").read_text())["summary"]["search"]
    assert search and all(s["criterion"] == "gain" for s in search)


def test_an_unknown_criterion_is_one_line(cli, fake_fmnist, tmp_path):
    from autoprog.algorithms.autoprog_zero import AutoProgZero
    from autoprog.errors import ConfigError
    from autoprog.space import GrowthSpace

    rc, _, err = cli("pretrain", "--method", "autoprog-zero", "--criterion", "best", "--out", tmp_path / "r",
                     *tiny_args(fake_fmnist))
    assert rc == 2 and "--criterion" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="criterion"):
        AutoProgZero(GrowthSpace(28, 4, 4), criterion="best")
