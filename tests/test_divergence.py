"""Nothing silently wrong: a diverged run stops, says where, keeps its last good checkpoint and never scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from autoprog.algorithms.elastic import choose
from autoprog.checkpoint import strict_json, write_json
from autoprog.classification.report import summary_markdown
from autoprog.data import DataBundle
from autoprog.diffusion.quality import to_uint8
from autoprog.errors import ConfigError, DivergedError
from autoprog.experiment import diverged_rows, run_methods


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_huge_learning_rate_stops_with_one_line_and_strict_json(cli, fake_fmnist, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = cli("pretrain", "--method", "prog", "--lr", "1e6", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 3, err
    line = _one_line(err)
    assert "diverged at step" in line and "--lr" in line
    res = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert res["done"] is False and "diverged" in res["diverged"]
    assert not (out / "checkpoint").exists() or all(
        torch.isfinite(v).all() for v in load_file(out / "checkpoint" / "model.safetensors").values())


def test_divergence_mid_run_keeps_the_last_good_checkpoint(cli, fake_fmnist, tmp_path, monkeypatch):
    calls = {"n": 0}
    prepare = DataBundle.prepare

    def poisoned(self, x, train, **kw):  # the 12th training batch is NaN: epoch 1 (8 steps) ended well
        y = prepare(self, x, train, **kw)
        if train:
            calls["n"] += 1
            if calls["n"] == 12:
                y = torch.full_like(y, float("nan"))
        return y

    monkeypatch.setattr(DataBundle, "prepare", poisoned)
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 3
    line = _one_line(err)
    assert "diverged at step 12" in line and "last good checkpoint (step 8)" in line
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint" / "model.safetensors").values())
    # a re-run with the same settings in a comparison says so at once instead of training into it again
    monkeypatch.setattr(DataBundle, "prepare", prepare)
    from autoprog.experiment import reuse_or_run

    with pytest.raises(DivergedError, match="step 12"):
        reuse_or_run(out, "prog", [], lambda resume: pytest.fail("must not train"))


def test_a_non_finite_gradient_under_a_finite_loss_is_caught_without_clipping(cli, fake_fmnist, tmp_path,
                                                                               monkeypatch):
    """Clipping is off by default (as the official code): the guard still reads the gradient's norm, so step 8's NaN
    gradient (its loss finite) stops the run at step 8, and the checkpoint written at that step's epoch end is
    never one of NaN weights."""
    from autoprog.engine import RunTemplate

    apply = RunTemplate._apply_update

    def poisoned(self, loss):
        if self.step == 7:  # the 8th step: its gradient NaN, its loss finite
            p = next(q for q in self.net.parameters() if q.requires_grad)
            p.register_hook(lambda g: torch.full_like(g, float("nan")))
        return apply(self, loss)

    monkeypatch.setattr(RunTemplate, "_apply_update", poisoned)
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "original", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 3 and "diverged at step 8" in _one_line(err), err
    assert not (out / "checkpoint").exists() or all(
        torch.isfinite(v).all() for v in load_file(out / "checkpoint" / "model.safetensors").values())


def test_diverged_finetuning_exports_nothing(cli, tmp_path, fake_fmnist):
    out = tmp_path / "ft"
    rc, _, err = cli("finetune", "--method", "full", "--lr", "1e6", "--steps", "20", "--batch-size", "16",
                     "--eval-points", "1", "--fd-samples", "8", "--curve-samples", "8", "--sample-steps", "2",
                     "--feature-epochs", "1", "--cache-dir", tmp_path / "cache", "--data-root", fake_fmnist,
                     "--out", out, "--cpu")
    assert rc == 3 and "diverged" in _one_line(err)
    assert not (out / "model").exists(), "a diverged model is never exported"
    assert json.loads((out / "results.json").read_text())["diverged"]


def test_non_finite_samples_are_refused():
    with pytest.raises(DivergedError, match="not finite"):
        to_uint8(torch.tensor([[[[0.0, float("nan")]]]]))
    assert to_uint8(torch.zeros(1, 1, 1, 2)).dtype == torch.uint8


def test_the_search_never_chooses_a_diverged_candidate():
    idx, alpha, score = choose([float("nan"), 2.0, 1.0], [1.0, 1.0, 2.0])
    assert idx in (1, 2) and math.isnan(score[0]) and math.isfinite(alpha)
    with pytest.raises(DivergedError):
        choose([float("nan"), float("inf")], [1.0, 1.0])


def test_a_diverged_method_is_listed_but_never_ranked():
    def run(m):
        if m == "bad":
            raise DivergedError("training diverged at step 3: the loss is nan")
        return {"summary": {}}

    results, diverged = run_methods(["original", "bad", "prog"], run, "original", log=lambda s: None)
    assert list(results) == ["original", "prog"] and "step 3" in diverged["bad"]
    rows = diverged_rows([{"method": "original", "wall_time_s": 1.0, "top1": 70.0}], diverged)
    assert rows[-1]["top1"] is None and rows[-1]["diverged"]
    assert "bad — diverged, not ranked" in summary_markdown(rows)
    table = summary_markdown([{"method": "prog", "wall_time_s": 4.3, "speedup": 1.4, "flops_speedup": 1.97,
                               "realised_fraction": 0.71, "top1": 70.0, "top1_ema": 70.0}]).splitlines()
    assert "realised / theoretical" in table[0] and "| 1.97× | 0.71 | 70.00 |" in table[2]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|")
    with pytest.raises(DivergedError):
        run_methods(["bad"], run, "bad", log=lambda s: None)


def test_json_outputs_are_strict(tmp_path):
    assert strict_json({"a": [1.0, float("nan")], "b": float("inf")}) == {"a": [1.0, None], "b": None}
    write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"loss": None}


# ------------------------------------------------------------------------------ bad inputs, one line each
@pytest.mark.parametrize("make_out, needle", [
    (lambda tmp: tmp / "afile" / "run", "Not a directory"),
    (lambda tmp: tmp / "afile", "a file is in the way"),
    (lambda tmp: "/proc/autoprog-run", "cannot create"),
])
def test_an_unusable_out_is_one_line(cli, fake_fmnist, tmp_path, make_out, needle):
    (tmp_path / "afile").write_text("x")
    rc, _, err = cli("pretrain", "--out", make_out(tmp_path), *tiny_args(fake_fmnist))
    assert rc == 2 and needle in _one_line(err)


def test_resume_with_other_settings_is_refused(cli, tmp_path):
    rc, _, err = cli("pretrain", "--resume", tmp_path, "--lr", "0.5", "--epochs", "3")
    line = _one_line(err)
    assert rc == 2 and "--lr" in line and "--epochs" in line


@pytest.mark.parametrize("flag, value", [("--eta", "-3"), ("--cfg-scale", "nan"), ("--cfg-scale", "0.5")])
def test_bad_sampling_options_are_one_line(cli, tmp_path, flag, value):
    from autoprog.diffusion.runner import DEFAULT_BASE

    rc, _, err = cli("sample", DEFAULT_BASE, "--out", tmp_path / "s", flag, value, "--per-class", "1")
    assert rc == 2 and flag in _one_line(err)
    assert not (tmp_path / "s").exists()


def test_lora_rank_zero_is_refused_not_replaced():
    from autoprog.diffusion.runner import FinetuneSpec, build_finetune

    with pytest.raises(Exception, match="rank"):
        build_finetune(FinetuneSpec(method="lora-r0"))


@pytest.mark.parametrize("damage, needle", [("missing", "no weights"), ("truncated", "cannot be read")])
def test_a_damaged_base_model_is_one_line(cli, tmp_path, damage, needle):
    import shutil

    from autoprog.diffusion.runner import DEFAULT_BASE

    base = tmp_path / "base"
    shutil.copytree(DEFAULT_BASE, base)
    weights = base / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    rc, _, err = cli("sample", base, "--out", tmp_path / "s", "--per-class", "1")
    assert rc == 2 and needle in _one_line(err)


def test_the_guard_names_the_first_non_finite_step_without_a_sync_per_step():
    from types import SimpleNamespace

    from autoprog.engine import HealthWatch

    acc = SimpleNamespace(num_processes=1)
    watch = HealthWatch(every=50)
    for step in range(1, 11):
        loss = torch.tensor(float("nan") if step >= 3 else 1.0)
        norm = torch.tensor(float("inf") if step == 2 else 0.5)
        watch.watch(step, loss, norm)
    with pytest.raises(DivergedError, match="at step 2: the gradient norm is inf"):
        watch.check(acc)
    watch = HealthWatch()
    for step in range(1, 5):
        watch.watch(step, torch.tensor(float("nan") if step == 4 else 2.0), None)
    with pytest.raises(DivergedError, match="at step 4: the loss is nan"):
        watch.check(acc)
    fine = HealthWatch()
    fine.watch(1, torch.tensor(0.25), torch.tensor(1.0))
    fine.check(acc)
    assert fine.last_loss == 0.25


def test_an_older_checkpoint_state_is_migrated():
    from types import SimpleNamespace

    from autoprog.checkpoint import RUN_STATE_FORMAT, migrate_state
    from autoprog.engine import RunTemplate

    pre = migrate_state({"step": 13, "lr_step": 13, "pending_epoch": None,
                         "in_epoch": {"start_step": 8, "time_s": 1.5, "step_times": [0.1],
                                      "per_process": [{"loss_sum": 4.0, "loss_n": 5}]},
                         "time_cache": {"16:2": 0.01}})
    assert pre["format"] == RUN_STATE_FORMAT and pre["in_segment"]["start_step"] == 8
    assert pre["pending_point"] is None and "in_epoch" not in pre and pre["search_time_s"] == 0.0
    ft = migrate_state({"step": 50, "loss_sum": 3.0, "loss_n": 6, "time_cache": [[16, [3, 4], 0.2]]})
    assert ft["lr_step"] == 50 and ft["time_cache"] == {"16:3,4": 0.2}
    trainer = SimpleNamespace(acc=SimpleNamespace(num_processes=2, process_index=1))
    # the old fine-tuning trainer read its one loss sum back on every process: any process count resumes it
    assert RunTemplate._own_share(trainer, ft["in_segment"]) == {"loss_sum": 3.0, "loss_n": 6}
    with pytest.raises(ConfigError, match="newer"):
        migrate_state({"format": "autoprog-run/9", "step": 1})
