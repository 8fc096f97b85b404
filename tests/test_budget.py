"""Budget mode: a run sized to end at a budget (seconds or full-model steps) with its learning rate decayed."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import ctrl_c_at_step, tiny_args
from safetensors.torch import load_file

from autoprog.budget import Budget, LRRemap, parse_duration, plan_steps
from autoprog.controllers import moved_starts
from autoprog.errors import ConfigError

MIN_LR = 1e-5  # TrainConfig's default floor


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("20m", 1200), ("1.5h", 5400),
                                          ("1h30m", 5400), ("2m30s", 150), (" 5 M ", 300), (".5s", 0.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "m", "10x", "1h30", "-5s", "0s", "1e3s", "ten minutes", "5s5m"])
def test_a_bad_duration_is_one_line(text):
    with pytest.raises(ConfigError, match="--budget must be a") as e:
        parse_duration(text)
    assert "\n" not in str(e.value)


def test_a_budget_is_a_duration_or_steps_not_both():
    assert Budget.from_options(None, None) is None
    assert Budget.from_options("2m", None) == Budget(120.0, "s")
    assert Budget.from_options(None, 40).in_steps
    assert Budget(120.0, "s").scaled(0.25) == {"budget": "30s", "budget_steps": None}
    assert Budget(40.0, "full-model steps").scaled(0.5) == {"budget": None, "budget_steps": 20.0}
    with pytest.raises(ConfigError, match="not both"):
        Budget.from_options("2m", 40)
    with pytest.raises(ConfigError, match="positive"):
        Budget.from_options(None, 0)


def test_plan_solves_for_the_steps_that_spend_the_budget():
    # half the steps at a quarter of the cost, half at full cost: 0.625 per step
    assert plan_steps(10, [0.5, 0.5], [0.25, 1.0]) == 16
    assert plan_steps(10, [1.0], [1.0]) == 10
    assert plan_steps(0.1, [1.0], [1.0]) == 1  # never below one step
    with pytest.raises(ConfigError, match="cost"):
        plan_steps(10, [1.0], [0.0])


def test_lr_remap_is_continuous_and_ends_at_the_nominal_end():
    m = LRRemap(100)
    assert [m(p) for p in (0, 37, 100)] == [0, 37, 100]
    m.retarget(40, 70)  # the end moves from 100 to 70 at position 40
    assert m(40) == pytest.approx(40) and m(70) == pytest.approx(100) and m(55) == pytest.approx(70)
    assert m(90) == 100  # past the end: the floor
    m.retarget(55, 115)  # and later, out again
    assert m(55) == pytest.approx(70) and m(115) == pytest.approx(100)
    again = LRRemap(1)
    again.load_state_dict(m.state_dict())
    assert again(80) == m(80)


def test_moved_starts_stretch_what_is_left_and_keep_what_began():
    starts = [0, 25, 50, 75]  # a run of 100 steps, now at step 30 (stage 2 running)
    assert moved_starts(starts, 30, 100, 170) == [0, 25, 30 + round(20 * 2), 30 + round(45 * 2)]
    shrunk = moved_starts(starts, 30, 100, 44)
    assert shrunk[:2] == [0, 25] and 30 <= shrunk[2] <= shrunk[3] <= 43  # the full model keeps a step
    assert moved_starts(starts, 30, 100, 170, floor=90)[2:] == [90, 120]  # not into a running search


def _run(cli, fake_fmnist, out, method, *extra, epochs="3"):
    rc, _, err = cli("pretrain", "--method", method, "--out", out, *tiny_args(fake_fmnist, *extra, epochs=epochs))
    assert rc == 0, err
    return json.loads((out / "results.json").read_text())


def test_a_step_budget_is_spent_to_the_step_with_the_lr_decayed(cli, fake_fmnist, tmp_path):
    """--budget-steps 20: the original runs 20 steps; prog (cheaper stages, FLOPs-costed) runs more, keeps its
    equal stages, spends the budget to within a step, and both end at the learning-rate floor."""
    orig = _run(cli, fake_fmnist, tmp_path / "o", "original", "--budget-steps", "20")
    prog = _run(cli, fake_fmnist, tmp_path / "p", "prog", "--budget-steps", "20")
    assert orig["summary"]["steps"] == 20 and orig["summary"]["budget"]["used"] == 1.0
    b = prog["summary"]["budget"]
    assert prog["summary"]["steps"] == b["steps"] > 20 and 1 - 1 / 20 <= b["used"] <= 1.0, b
    assert [s["fraction"] for s in prog["summary"]["schedule"]["stages"]] == [0.25] * 4
    for res in (orig, prog):
        assert res["done"] and res["epochs"][-1]["lr"] == pytest.approx(MIN_LR)
        # what a run's FLOPs say it spent: its steps × per-step FLOPs, in full-model steps
        s = res["summary"]
        spent = s["flops_per_step"] * s["steps"] / s["full_model_flops_per_step"] if s["full_model_flops_per_step"] \
            else None
        assert spent is None or spent == pytest.approx(s["budget"]["spent"], rel=1e-6)


def test_a_search_under_a_budget_ends_with_the_full_model_and_the_lr_decayed(cli, fake_fmnist, tmp_path):
    res = _run(cli, fake_fmnist, tmp_path / "a", "autoprog-one", "--budget-steps", "30", "--search-epochs", "0.5")
    stages = res["summary"]["schedule"]["stages"]
    assert stages[-1]["resolution"] == 28 and stages[-1]["depth"] == 4
    assert math.isclose(sum(s["fraction"] for s in stages), 1.0, abs_tol=1e-4)
    assert res["epochs"][-1]["lr"] == pytest.approx(MIN_LR) and res["done"]
    assert res["summary"]["budget"]["planned_as"] == "prog"
    assert 0.8 <= res["summary"]["budget"]["used"] <= 1.2, res["summary"]["budget"]


def test_a_time_budget_ends_near_it(cli, fake_fmnist, tmp_path):
    """--budget 3s: re-planned every epoch from what steps really cost, the run's training time ends near 3 s
    (loose bounds: the machine is shared)."""
    res = _run(cli, fake_fmnist, tmp_path / "t", "prog", "--budget", "3s")
    b = res["summary"]["budget"]
    assert b["unit"] == "s" and b["amount"] == 3.0 and b["replans"] >= 4
    assert 0.7 <= res["summary"]["wall_time_s"] / 3.0 <= 1.3, b
    # decayed by the end: the last re-plan lands within a step or two of the real end (step times on a shared
    # machine; a re-plan that finds the budget spent ends the run at once, one step short of the decay), so the rate
    # is within 1 % of the way back to the peak (1e-3), not exactly the minimum (exact failed about one run in
    # four; within 1 % of the minimum failed once, at 2 %: 0.02 % of the way; within 0.1 % of the way failed once
    # in a fresh-clone CI run, at 0.17 % of the way); a run that never decayed is tens of percent of the way
    assert res["epochs"][-1]["lr"] - MIN_LR <= 1e-2 * (1e-3 - MIN_LR), res["epochs"][-1]["lr"]


def test_a_budget_run_stopped_mid_epoch_resumes_identical(cli, fake_fmnist, tmp_path):


    want = _run(cli, fake_fmnist, tmp_path / "full", "prog", "--budget-steps", "24")
    run = tmp_path / "run"
    with ctrl_c_at_step(12):
        rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, "--budget-steps", "24"))
        assert rc == 130 and "interrupted at step 13" in err, err
    rc, _, err = cli("pretrain", "--resume", run, "--cpu")
    assert rc == 0, err
    got = json.loads((run / "results.json").read_text())
    assert [e["train_loss"] for e in got["epochs"]] == [e["train_loss"] for e in want["epochs"]]
    assert got["summary"]["budget"] == want["summary"]["budget"]
    a, b = (load_file(r / "checkpoint" / "model.safetensors") for r in (run, tmp_path / "full"))
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("extra,message", [
    (["--budget", "10x"], "--budget must be a duration"),
    (["--budget", "1m", "--budget-steps", "5"], "not both"),
    (["--budget-steps", "0"], "--budget-steps must be"),
])
def test_bad_budgets_are_one_line(cli, fake_fmnist, tmp_path, extra, message):
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "x", *tiny_args(fake_fmnist, *extra))
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_compare_under_a_budget_draws_the_front_in_fractions_of_it(cli, fake_fmnist, tmp_path):
    rc, out, err = cli("compare", "--methods", "original,prog", "--front", "0.5,1", "--out", tmp_path / "c",
                       *tiny_args(fake_fmnist, "--budget-steps", "16"))
    assert rc == 0, err
    assert err.count("--epochs 2 is not read: --budget-steps sizes the run") == 1, err  # (not once per run)
    rows = {r["method"]: r for r in json.loads((tmp_path / "c" / "summary.json").read_text())}
    assert "original@budget" not in rows and "no original@budget" in out
    assert rows["original"]["steps"] == 16 and rows["original@0.5"]["steps"] == 8
    assert rows["prog"]["budget_used"] <= 1.0 and rows["prog"]["steps"] > 16


def test_a_budget_warns_that_the_length_it_replaces_is_unread(cli, fake_fmnist, tmp_path, capsys):
    """--budget/--budget-steps size the run: an --epochs (or fine-tuning's --steps) other than the default is
    said to be unread, once however many runs read it, and the run goes on; at the default, or without a budget,
    nothing is said."""
    from autoprog.budget import warn_unread_length
    from autoprog.classification.trainer import TrainConfig
    from autoprog.diffusion.runner import FinetuneSpec

    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "x",
                     *tiny_args(fake_fmnist, "--budget-steps", "8"))  # (tiny_args train 2 epochs)
    assert rc == 0 and err.count("--epochs 2 is not read: --budget-steps sizes the run") == 1, err
    from autoprog.errors import forget_warnings

    forget_warnings()  # (said once per command: the run above said its own)
    ft = FinetuneSpec().train
    for cfg, default, field in ((TrainConfig(budget="5m"), TrainConfig(), "epochs"),
                                (TrainConfig(epochs=3), TrainConfig(), "epochs"),
                                (replace(ft, budget_steps=100.0), ft, "steps")):
        warn_unread_length(cfg, default, field)
    for _ in range(2):
        warn_unread_length(replace(ft, steps=50, budget="2m"), ft, "steps")
    assert capsys.readouterr().err.strip().splitlines() == ["autoprog: warning: --steps 50 is not read: --budget sizes the run"]
