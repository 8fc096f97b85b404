"""End-to-end fine-tuning: every method on a few steps, AutoProg-Zero's choices, resume, the CLI commands."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_base_dit
from safetensors.torch import load_file

from autoprog.algorithms.proxies import TIME_RTOL, tie_within
from autoprog.diffusion.runner import FinetuneSpec, finetune
from autoprog.diffusion.trainer import DiffusionConfig
from autoprog.models.dit import load_backbone, save_backbone

pytestmark = pytest.mark.slow

TINY = DiffusionConfig(steps=8, batch_size=16, lr=1e-3, warmup_steps=1, eval_points=4, curve_samples=10,
                       fd_samples=20, sample_steps=3, proxy_batches=2, proxy_batch_size=4, time_repeats=1)
TRAIN_FLAGS = ["--steps", "8", "--batch-size", "16", "--eval-points", "2", "--curve-samples", "10", "--fd-samples", "20",
               "--sample-steps", "3", "--feature-epochs", "1", "--cpu"]
TINY_FLAGS = [*TRAIN_FLAGS, "--proxy-batches", "2", "--proxy-batch-size", "4"]


@pytest.fixture(scope="module")
def base(fake_fmnist, cache_dir, tmp_path_factory):
    return tiny_base_dit(fake_fmnist, cache_dir, tmp_path_factory.mktemp("base"),
                         replace(TINY, steps=6, eval_points=1, ema_decay=0.9))


def spec_for(method, base, fake_fmnist, cache_dir, **train):
    return FinetuneSpec(method=method, base=str(base), data_root=str(fake_fmnist), feature_epochs=1,
                        cache_dir=str(cache_dir), train=replace(TINY, **train))


def test_base_model_is_saved_with_its_classes(base):
    model, meta = load_backbone(base)
    assert meta["classes"] == [0, 1, 2, 3, 4]
    assert model.num_classes == 10 and model.depth == 4 and model.sid is None


@pytest.mark.parametrize("method", ["full", "bitfit", "difffit", "lora-r4", "adapter-parallel", "adapter-sequential",
                                    "vpt-deep", "prog", "autoprog-one", "autoprog-zero", "autoprog-zero-nosid"])
def test_every_method_finetunes_end_to_end(method, base, fake_fmnist, cache_dir, tmp_path):
    res = finetune(spec_for(method, base, fake_fmnist, cache_dir), tmp_path / method)
    s = res["summary"]
    assert res["done"] and s["steps"] == 8 and s["wall_time_s"] > 0
    assert math.isfinite(s["fd"]) and s["metric"] == "FD (classifier features)"
    assert s["classes"] == [5, 6, 7, 8, 9]
    assert [p["step"] for p in res["curve"]] == [2, 4, 6, 8] and all("fd" in p for p in res["curve"])
    # every curve point is also measured at the curve's sample count (FD depends on it); the last also at fd_samples
    assert [p["fd_samples"] for p in res["curve"]] == [10, 10, 10, 20]
    assert all(p["fd_curve"] == p["fd"] for p in res["curve"][:3]) and res["curve"][3]["fd_curve"] != res["curve"][3]["fd"]
    model, meta = load_backbone(tmp_path / method / "model")  # exported as a plain backbone (Adapter, VPT: + extras)
    assert meta["method"] == method
    assert not any("lora_" in n or "difffit" in n for n, _ in model.named_parameters())
    extras = method.startswith(("adapter", "vpt"))
    assert (getattr(model, "extras", None) is not None) == extras and ("extras" in meta) == extras
    total = s["total_params"]
    if method in ("bitfit", "difffit", "lora-r4", "adapter-parallel", "adapter-sequential", "vpt-deep"):
        assert s["trainable_params"] < total / 4
    progressive = method.startswith(("prog", "autoprog"))
    if progressive:
        stages = json.loads((tmp_path / method / "schedule.json").read_text())["stages"]
        assert len(stages) == 4 and stages[-1]["resolution"] == 28 and stages[-1]["depth"] == 4
        if method != "autoprog-one":  # 2-step stages leave its supernet phase one step: it may pick the full model
            assert s["mean_trainable_params"] < total  # earlier stages trained less than everything
        assert (model.sid is not None) == (not method.endswith("nosid"))
        if model.sid is not None:
            assert model.sid.num_stages == 4 and model.sid.stage == 3  # sampling uses the last stage's SID


def test_prog_replays_an_inline_schedule_with_one_sid_per_stage(base, fake_fmnist, cache_dir, tmp_path):
    spec = replace(spec_for("prog", base, fake_fmnist, cache_dir), schedule="16x2@1,28x4@3")
    res = finetune(spec, tmp_path / "inline")
    stages = json.loads((tmp_path / "inline" / "schedule.json").read_text())["stages"]
    assert [(st["resolution"], st["depth"], st["fraction"]) for st in stages] == [(16, 2, 0.25), (28, 4, 0.75)]
    assert [st["stage"] for st in res["stages"]] == [0, 1]
    model, _ = load_backbone(tmp_path / "inline" / "model")
    assert model.sid.num_stages == 2 and model.sid.stage == 1


def test_autoprog_zero_picks_the_ranked_vote_winner(base, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    from autoprog.algorithms.autoprog_zero import AutoProgZero

    searched_with, enter = [], AutoProgZero.enter_stage  # the stage identifier its proxies and timings see

    def spy(self, trainer, k):
        searched_with.append((k, trainer.model.sid.stage))
        enter(self, trainer, k)

    monkeypatch.setattr(AutoProgZero, "enter_stage", spy)
    res = finetune(spec_for("autoprog-zero", base, fake_fmnist, cache_dir), tmp_path / "az")
    assert searched_with == [(k, k) for k in range(4)], "stage k's candidates are searched with stage k's SID"
    search = res["summary"]["search"]
    assert [s["stage"] for s in search] == [1, 2, 3]
    # the official AutoProg-Zero candidates: the two smallest resolutions x depths of 0.25Ω, then neighbours
    assert all(s["candidate_space"] == "neighbours" for s in search)
    assert [(r["resolution"], r["depth"]) for r in search[0]["candidates"]] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert all(len(s["candidates"]) <= 4 for s in search[1:])
    prev = None
    for s in search:
        rows = s["candidates"]
        for r in rows:
            assert r["R"] == pytest.approx(0.5 * r["R_ntk"] + 0.5 * r["R_zico"] + r["R_time"])
            assert r["time_s"] > 0
        tied = tie_within([r["time_s"] for r in rows], TIME_RTOL)  # the default: exact ranks
        assert [r["R_time"] for r in rows] == [1 + sum(o < t for o in tied) for t in tied]
        best = min(range(len(rows)), key=lambda i: rows[i]["R"])
        assert s["chosen"] == best
        chosen = rows[best]
        if prev is not None:  # never smaller than the previous stage's choice
            assert all(r["resolution"] >= prev["resolution"] and r["depth"] >= prev["depth"] for r in rows)
        prev = chosen
    assert res["summary"]["search_time_s"] > 0


def test_progressive_unfreezing_leaves_frozen_blocks_untouched(base, fake_fmnist, cache_dir, tmp_path):
    out = tmp_path / "prog"
    finetune(spec_for("prog", base, fake_fmnist, cache_dir, stop_after_steps=2), out)
    stage1 = json.loads((out / "results.json").read_text())["stages"][0]
    learnable = set(stage1["learnable_blocks"])
    assert len(learnable) == 1  # 0.25 of 4 blocks
    before = load_file(base / "model.safetensors")
    after = load_file(out / "checkpoint" / "model.safetensors")
    opt = load_file(out / "checkpoint" / "optimizer.safetensors")
    for name, w in before.items():
        if not name.startswith("blocks."):
            continue
        block = int(name.split(".")[1])
        if block in learnable:
            continue
        assert torch.equal(w, after[name]), name
        assert not any(k.startswith(name + "::") for k in opt), f"{name} has optimizer state"
    changed = [n for n in before if n.startswith(f"blocks.{min(learnable)}.") and not torch.equal(before[n], after[n])]
    assert changed


def test_the_fine_tuning_ema_is_timms_and_moves_no_frozen_block(base, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    from timm.utils import ModelEmaV3

    from autoprog.ema import LazyEma

    refs, moved, init, update, lerp = [], [], LazyEma.__init__, LazyEma.update, LazyEma._foreach_lerp_

    def init_spy(self, model, decay, **kw):
        init(self, model, decay, **kw)
        refs.append(ModelEmaV3(model, decay=decay))  # timm's, alongside
        self.total = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())

    def update_spy(self, model, step=None):
        moved.append(0)
        self.counting = True  # (not the deferred updates applied before reads and optimizer steps)
        update(self, model, step)
        self.counting = False
        refs[-1].update(model)

    def lerp_spy(self, ema_values, model_values, weight):
        if getattr(self, "counting", False):
            moved[-1] += sum(t.numel() for t in ema_values)
        return lerp(self, ema_values, model_values, weight)

    monkeypatch.setattr(LazyEma, "__init__", init_spy)
    monkeypatch.setattr(LazyEma, "update", update_spy)
    monkeypatch.setattr(LazyEma, "_foreach_lerp_", lerp_spy)
    out = tmp_path / "prog"
    finetune(spec_for("prog", base, fake_fmnist, cache_dir, ema_decay=0.9), out)
    assert len(refs) == 1 and len(moved) == 8
    total = sum(v.numel() for v in refs[0].module.state_dict().values() if v.is_floating_point())
    assert moved[0] == total, "the first update moves everything"
    assert all(0 < m < total for m in moved[1:6]), "the partial stages leave their frozen blocks' updates to later"
    exported = load_file(out / "model" / "model.safetensors")  # the EMA
    expected = refs[0].module.state_dict()
    for name, w in exported.items():
        assert torch.allclose(w, expected[name], atol=1e-6), name


def test_the_official_layout_trains_input_side_blocks_and_everything_outside_the_blocks(base, fake_fmnist, cache_dir,
                                                                                       tmp_path):
    out = tmp_path / "official"
    spec = replace(spec_for("prog", base, fake_fmnist, cache_dir, stop_after_steps=2), learnable_layout="official")
    finetune(spec, out)
    stage1 = json.loads((out / "results.json").read_text())["stages"][0]
    assert stage1["learnable_blocks"] == [0]  # 1 of 4 blocks, the first group from the input side
    before = load_file(base / "model.safetensors")
    after = load_file(out / "checkpoint" / "model.safetensors")
    outside = [n for n in before if not n.startswith("blocks.")]
    assert outside and all(not torch.equal(before[n], after[n]) for n in outside if n in after)  # all trained
    frozen = [n for n in before if n.startswith(("blocks.1.", "blocks.2.", "blocks.3."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert json.loads((out / "config.json").read_text())["spec"]["learnable_layout"] == "official"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(base, fake_fmnist, cache_dir, tmp_path):
    finetune(spec_for("prog", base, fake_fmnist, cache_dir), tmp_path / "a")
    finetune(spec_for("prog", base, fake_fmnist, cache_dir, stop_after_steps=4), tmp_path / "b")
    assert not (tmp_path / "b" / "model").exists()
    res = finetune(None, tmp_path / "b", resume=True)
    assert res["done"] and res["summary"]["steps"] == 8
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_crash_between_evaluation_points_loses_at_most_checkpoint_every_steps(base, fake_fmnist, cache_dir,
                                                                                 tmp_path, monkeypatch):
    from autoprog.diffusion.trainer import DiffusionTrainer

    spec = spec_for("autoprog-zero", base, fake_fmnist, cache_dir)
    spec = replace(spec, train=replace(spec.train, eval_points=1, checkpoint_every=3, time_source="flops"))
    finetune(spec, tmp_path / "a")
    step = DiffusionTrainer._train_step

    def crash_at_7(self, batch=None):
        if self.step == 6:  # the 7th step: the checkpoint of step 6 is written, the search of stage 4 is past
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(DiffusionTrainer, "_train_step", crash_at_7)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 6
    monkeypatch.setattr(DiffusionTrainer, "_train_step", step)
    res = finetune(None, tmp_path / "b", resume=True)
    assert res["done"]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resumed from step 6, it ends where a did"
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    assert ra["summary"]["schedule"] == res["summary"]["schedule"]


def _signal_in_step(monkeypatch, sig, step: int):
    """Raise ``sig`` during training step ``step`` (1-based); returns the real ``_train_step`` to put back."""
    import signal

    from autoprog.diffusion.trainer import DiffusionTrainer

    real = DiffusionTrainer._train_step

    def signalled(self, batch=None):
        if self.step == step - 1:
            signal.raise_signal(sig)
        return real(self, batch)

    monkeypatch.setattr(DiffusionTrainer, "_train_step", signalled)
    return real


def test_sigterm_checkpoints_the_step_it_stops_at(base, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    import signal

    from autoprog.diffusion.trainer import DiffusionTrainer
    from autoprog.errors import Interrupted

    spec = spec_for("prog", base, fake_fmnist, cache_dir)
    spec = replace(spec, train=replace(spec.train, eval_points=1, checkpoint_every=0))
    finetune(spec, tmp_path / "a")
    step = _signal_in_step(monkeypatch, signal.SIGTERM, 5)
    with pytest.raises(Interrupted, match="step 5"):
        finetune(spec, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 5
    monkeypatch.setattr(DiffusionTrainer, "_train_step", step)
    assert finetune(None, tmp_path / "b", resume=True)["done"]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from step 5, it ends where a did"


def test_autoprog_zero_by_gain_unfreezes_the_largest_predicted_gain(base, fake_fmnist, cache_dir, tmp_path):
    import math

    spec = replace(spec_for("autoprog-zero", base, fake_fmnist, cache_dir, time_source="flops"), criterion="gain")
    res = finetune(spec, tmp_path / "gain")
    assert res["done"] and math.isfinite(res["summary"]["fd"])
    search = res["summary"]["search"]
    assert search and all(s["criterion"] == "gain" for s in search)
    for s in search:
        gains = [c["gain_per_s"] for c in s["candidates"]]
        assert all(math.isfinite(g) for g in gains) and s["chosen"] == gains.index(max(gains))


def test_a_stop_at_an_evaluation_step_keeps_that_evaluation(base, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    import signal

    from autoprog.diffusion.trainer import DiffusionTrainer
    from autoprog.errors import Interrupted

    spec = spec_for("prog", base, fake_fmnist, cache_dir)
    spec = replace(spec, train=replace(spec.train, eval_points=2, checkpoint_every=0))
    step = _signal_in_step(monkeypatch, signal.SIGINT, 4)  # step 4 of 8 is the first evaluation point
    with pytest.raises(Interrupted, match="step 4"):
        finetune(spec, tmp_path / "b")
    monkeypatch.setattr(DiffusionTrainer, "_train_step", step)
    res = finetune(None, tmp_path / "b", resume=True)
    assert [p["step"] for p in res["curve"]] == [4, 8], "the evaluation at the stopped step is kept"


def test_a_run_directory_is_not_overwritten(base, fake_fmnist, cache_dir, tmp_path):
    from autoprog.errors import ConfigError

    spec = spec_for("bitfit", base, fake_fmnist, cache_dir, stop_after_steps=2)
    finetune(spec, tmp_path / "r")
    with pytest.raises(ConfigError, match="--resume"):
        finetune(spec, tmp_path / "r")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_compare_finetune_writes_reports_and_budget_row(cli, base, fake_fmnist, cache_dir, tmp_path):
    out = tmp_path / "cmp"
    rc, stdout, err = cli("compare", "--task", "finetune", "--methods", "full,bitfit,prog", "--base", base,
                          "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, "--front", "0.5,1", *TRAIN_FLAGS)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    # the methods run at the paper's constant learning rate; the baseline's front (and full@budget) decays it to
    # the floor within each budget, the whole run included (full@1)
    assert list(rows) == ["full", "bitfit", "prog", "full@budget", "full@0.5", "full@1"]
    assert [r["front"] for r in rows.values()] == [True, False, False, True, True, True]
    assert all(r["tq_speedup"] > 0 and r["tq_bound"] in "=<>" for r in rows.values())
    train = {m: json.loads((out / m / "config.json").read_text())["spec"]["train"] for m in rows}
    assert train["full@0.5"]["steps"] == 4 and train["full@1"]["steps"] == 8
    assert {m: t["lr_schedule"] for m, t in train.items()} == {
        "full": "constant", "bitfit": "constant", "prog": "constant", "full@budget": "cosine", "full@0.5": "cosine",
        "full@1": "cosine"}
    assert summary["front"] and all(a[0] < b[0] and a[1] > b[1] for a, b in zip(summary["front"], summary["front"][1:]))
    assert rows["full"]["speedup"] == 1.0 and rows["full"]["flops_speedup"] == 1.0
    # frozen weights need no weight gradients; progressive stages also run at lower resolution
    assert rows["bitfit"]["flops_speedup"] > 1.1 and rows["prog"]["flops_speedup"] > rows["bitfit"]["flops_speedup"]
    assert rows["full@budget"]["budget_of"] == "prog"
    # full fine-tuning for prog's time: its steps follow from the two measured times (on a busy machine prog can
    # take longer than full, so no bound on the count itself)
    assert rows["full@budget"]["steps"] == max(1, round(8 * rows["prog"]["wall_time_s"] / rows["full"]["wall_time_s"]))
    for r in rows.values():
        assert math.isfinite(r["fd"]) and r["wall_time_s"] > 0 and r["trainable_params"] > 0
    md = (out / "summary.md").read_text()
    assert "FD (classifier features)" in md and "full@budget (time of prog)" in md and "time-to-quality" in md
    assert md.rstrip().splitlines()[-1].startswith("reading: ")
    assert "full@0.5" not in (out / "samples.txt").read_text(), "the front's runs are not sampled"
    assert "DDIM 3 steps" in (out / "samples.txt").read_text(), "--sample-steps sets the grid's steps too"
    for f in ("fd_curves.png", "front.png", "samples.png", "samples.txt"):
        assert (out / f).stat().st_size > 0
    # a second invocation reuses every finished run
    rc, stdout, _ = cli("compare", "--task", "finetune", "--methods", "full,bitfit,prog", "--base", base,
                        "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, "--front", "0.5,1", *TRAIN_FLAGS)
    assert rc == 0 and stdout.count("reusing finished run") == 6
    # a budget run made for another step count (the other rows changed since) is trained again
    cfg_file = out / "full@budget" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    steps = cfg["spec"]["train"]["steps"]
    cfg["spec"]["train"]["steps"] = steps + 1
    cfg_file.write_text(json.dumps(cfg))
    rc, stdout, err = cli("compare", "--task", "finetune", "--methods", "full,bitfit,prog", "--base", base,
                          "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, "--front", "0.5,1", *TRAIN_FLAGS)
    assert rc == 0, err
    assert "training it again" in stdout and stdout.count("reusing finished run") == 5
    assert json.loads(cfg_file.read_text())["spec"]["train"]["steps"] == steps
    # ... but refuses runs made with other settings rather than mixing them into one table
    rc, _, err = cli("compare", "--task", "finetune", "--methods", "full,bitfit,prog", "--base", base,
                     "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, "--front", "0.5,1", *TRAIN_FLAGS,
                     "--lr", "0.01")
    assert rc != 0 and "different settings" in err and "train.lr" in err
    # ... while a search setting (from a config shared with searches: typed, it is refused) changes none of these
    # methods' runs
    shared = tmp_path / "shared.yaml"
    shared.write_text("time_tolerance: 0.05\nstep_time_scope: whole\nproxy_batches: 2\n")
    rc, stdout, err = cli("compare", "--task", "finetune", "--methods", "full,bitfit,prog", "--base", base,
                          "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, "--front", "0.5,1",
                          *TRAIN_FLAGS, "--config", shared)
    assert rc == 0 and stdout.count("reusing finished run") == 6, err


def test_the_done_line_says_the_search_is_part_of_the_training_time():
    from autoprog.cli.diffusion import _training_time

    assert _training_time({"wall_time_s": 12.34, "search_time_s": 1.26}) == "12.3s of training, of which 1.3s search"
    assert _training_time({"wall_time_s": 12.34, "search_time_s": 0.01}) == "12.3s of training"


def test_cli_finetune_sample_and_stage(cli, base, fake_fmnist, cache_dir, tmp_path):
    out = tmp_path / "ft"
    rc, stdout, err = cli("finetune", "--method", "prog", "--base", base, "--data-root", fake_fmnist,
                          "--cache-dir", cache_dir, "--out", out, *TRAIN_FLAGS)
    assert rc == 0, err
    assert "model in" in stdout
    rc, stdout, err = cli("sample", out, "--per-class", "2", "--sample-steps", "2", "--stage", "1", "--cpu")
    assert rc == 0, err
    from PIL import Image

    for c in range(5, 10):
        assert Image.open(out / "model-samples" / f"class{c}.png").size[0] > 28
    assert (out / "model-samples" / "all.png").is_file()
    assert not (out / "model" / "samples").exists()  # a model folder is never written into
    rc, _, err = cli("sample", out / "model" / "config.json", "--cpu")
    assert rc == 2 and f"config.json is a file; give the model directory that holds it ({out / 'model'})" in err, err
    rc, _, err = cli("sample", out, "--classes", "6", "--per-class", "1", "--sample-steps", "2", "--cpu")
    assert rc == 0, err  # the folder again: the earlier call's grids of other classes are gone, not mixed in
    assert sorted(p.name for p in (out / "model-samples").iterdir()) == ["all.png", "class6.png"]
    rc, _, err = cli("sample", out, "--classes", "6", "--prompt", "a bag", "--cpu")
    assert rc == 2 and "--classes and --prompt: give one" in err, err


def test_cli_pretrain_diffusion_writes_a_base_model(cli, fake_fmnist, cache_dir, tmp_path):
    out = tmp_path / "base"
    rc, stdout, err = cli("pretrain", "--task", "diffusion", "--data-root", fake_fmnist, "--hidden-size", "16",
                          "--depth", "2", "--num-heads", "2", "--out", out, "--ema-decay", "0.9",
                          *TRAIN_FLAGS)
    assert rc == 0, err
    model, meta = load_backbone(out / "model")
    assert model.depth == 2 and meta["classes"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method", "nope", "--out", "x"], "unknown fine-tuning method 'nope'"),
    (["finetune", "--method", "full"], "finetune needs --out"),
    (["finetune", "--base", "/nonexistent/base", "--out", "x"], "--base /nonexistent/base: no model there"),
    (["compare", "--task", "finetune", "--methods", "bitfit,prog"], "needs 'full' among the methods"),
    (["finetune", "--classes", "5-x", "--out", "x"], "--classes '5-x'"),
    (["finetune", "--cfg-scale", "0.5", "--out", "x"], "--cfg-scale must be at least 1"),
    (["finetune", "--eta", "2", "--out", "x"], "--eta must be in [0, 1]"),
    (["finetune", "--time-tolerance", "-0.1", "--out", "x"], "--time-tolerance must be in [0, 1)"),
    (["sample", "/nonexistent/model"], "/nonexistent/model: no such model directory"),
])
def test_cli_errors_are_one_line(cli, base, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] != "sample" and "--base" not in argv:
        argv = [*argv, "--base", str(base)]
    rc, _, err = cli(*argv)
    assert rc == 2
    assert err.startswith("autoprog: error:") and message in err and err.count("\n") == 1, err


def test_cli_finetune_options_from_yaml(cli, base, fake_fmnist, cache_dir, tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("method: bitfit\npeft_lr: 0.005\nsteps: 4\nbatch_size: 16\neval_points: 1\nfd_samples: 10\n"
                   "sample_steps: 2\nfeature_epochs: 1\ncpu: true\n")
    rc, _, err = cli("finetune", "--config", cfg, "--base", base, "--data-root", fake_fmnist, "--cache-dir", cache_dir,
                     "--out", tmp_path / "run")
    assert rc == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["run"]["method"] == "bitfit" and res["run"]["lr"] == 0.005 and res["summary"]["steps"] == 4
    cfg.write_text("methd: bitfit\n")
    rc, _, err = cli("finetune", "--config", cfg, "--out", tmp_path / "x")
    assert rc == 2 and "unknown option 'methd'" in err


def test_cli_sample_stage_needs_a_sid_model(cli, base):
    rc, _, err = cli("sample", base, "--stage", "2")
    assert rc == 2 and "no stage identifiers" in err


def test_missing_shipped_base_explains_how_to_make_one(monkeypatch, tmp_path, fake_fmnist):
    from autoprog.diffusion import runner
    from autoprog.errors import ConfigError

    monkeypatch.setattr(runner, "DEFAULT_BASE", tmp_path / "none")
    with pytest.raises(ConfigError, match="autoprog pretrain --task diffusion"):
        runner.build_finetune(FinetuneSpec(data_root=str(fake_fmnist)))


def test_latent_space_pretrain_finetune_and_sample(cli, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    """--vae: a (tiny, locally saved) AutoencoderKL; the base remembers it and fine-tuning/sampling decode with it,
    on the run's device (the accelerator's: on a GPU job the VAE encodes the data and decodes every evaluation
    there, not on the host)."""
    from diffusers import AutoencoderKL

    from autoprog.diffusion.latent import LatentCodec

    devices = []  # the device each VAE was loaded for: the accelerator's torch.device, never the default "cpu"
    load = LatentCodec.from_pretrained.__func__
    monkeypatch.setattr(LatentCodec, "from_pretrained", classmethod(
        lambda cls, path, device="cpu", **kw: devices.append(device) or load(cls, path, device=device, **kw)))

    def loaded_on_the_runs_device():
        got = list(devices)
        devices.clear()
        return got and all(isinstance(d, torch.device) and d.type == "cpu" for d in got), got

    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=28).save_pretrained(vae_dir)
    base = tmp_path / "base"
    monkeypatch.chdir(tmp_path)  # a VAE given relative to here: the model records where it is, not as typed
    rc, _, err = cli("pretrain", "--task", "diffusion", "--vae", "vae", "--patch-size", "2", "--hidden-size", "16",
                     "--depth", "2", "--num-heads", "2", "--data-root", fake_fmnist, "--cache-dir", cache_dir,
                     "--out", base, *TRAIN_FLAGS)
    assert rc == 0, err
    model, meta = load_backbone(base / "model")
    assert model.in_chans == 4 and model.image_size == 14 and meta["vae"] == str(vae_dir.resolve())
    assert list((cache_dir / "latents").glob("latents-*.safetensors"))
    ok, got = loaded_on_the_runs_device()
    assert ok, got
    out = tmp_path / "ft"
    rc, _, err = cli("finetune", "--method", "prog", "--base", base / "model", "--data-root", fake_fmnist,
                     "--cache-dir", cache_dir, "--out", out, *TRAIN_FLAGS)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert math.isfinite(res["summary"]["fd"])
    assert [s["subnet"]["resolution"] for s in res["stages"]][-1] == 14  # stages are in latent pixels
    ok, got = loaded_on_the_runs_device()
    assert ok, got
    rc, _, err = cli("sample", out, "--per-class", "1", "--sample-steps", "2")
    assert rc == 0, err
    ok, got = loaded_on_the_runs_device()
    assert ok, got
    from PIL import Image

    assert Image.open(out / "model-samples" / "class5.png").mode == "RGB"  # decoded grey images, saved as PNG
    # the official encoding: each batch (the searches' too) encoded in its step, the posterior sampled
    encoded, encode_batch = [], LatentCodec.encode_batch
    monkeypatch.setattr(LatentCodec, "encode_batch", lambda self, x, generator=None: encoded.append(x.shape[-1])
                        or encode_batch(self, x, generator))
    monkeypatch.setattr(LatentCodec, "encode_cached", lambda *a, **k: pytest.fail("per-step caches no latents"))
    out = tmp_path / "ft-per-step"
    rc, _, err = cli("finetune", "--method", "autoprog-zero", "--latent-encoding", "per-step", "--base", base / "model",
                     "--data-root", fake_fmnist, "--cache-dir", cache_dir, "--out", out, *TINY_FLAGS)
    assert rc == 0, err
    assert len(encoded) >= 8 and 28 in encoded and min(encoded) < 28, "every step's batch, at its stage's pixels"
    encoded.clear()
    rc, _, err = cli("pretrain", "--task", "diffusion", "--vae", "vae", "--latent-encoding", "per-step", "--patch-size",
                     "2", "--hidden-size", "16", "--depth", "2", "--num-heads", "2", "--data-root", fake_fmnist,
                     "--cache-dir", cache_dir, "--out", tmp_path / "base-per-step", *TRAIN_FLAGS)
    assert rc == 0 and len(encoded) >= 8, err  # a base model too
    res = json.loads((out / "results.json").read_text())
    assert math.isfinite(res["summary"]["fd"]) and len(res["summary"]["search"]) == 3
    assert json.loads((out / "config.json").read_text())["spec"]["latent_encoding"] == "per-step"
    rc, _, err = cli("finetune", "--method", "full", "--latent-encoding", "per-step", "--data-root", fake_fmnist,
                     "--out", tmp_path / "pixels", *TRAIN_FLAGS)  # the shipped base: pixel space
    assert rc == 2 and "--latent-encoding per-step is for latent-space training" in err, err
    # a pixel-space base refuses latent data that does not fit it
    rc, _, err = cli("finetune", "--method", "full", "--base", base / "model", "--vae", "/nonexistent/vae",
                     "--data-root", fake_fmnist, "--out", tmp_path / "bad", *TRAIN_FLAGS)
    assert rc == 2 and "/nonexistent/vae" in err


def test_seed_rows_gives_mean_std_and_per_seed_values():
    from autoprog.experiment import seed_rows

    per_seed = {0: [{"method": "full", "fd": 10.0, "metric": "FD"}, {"method": "prog", "fd": None, "metric": "FD"}],
                1: [{"method": "full", "fd": 14.0, "metric": "FD"}, {"method": "prog", "fd": 3.0, "metric": "FD"}]}
    rows = seed_rows(per_seed, [0, 1], ("fd",), lambda runs: {"metric": runs[0]["metric"]})
    assert [r["method"] for r in rows] == ["full", "prog"]
    assert rows[0]["fd"] == 12.0 and rows[0]["fd_std"] == pytest.approx(2.8284, abs=1e-4)
    assert rows[0]["fd_per_seed"] == [10.0, 14.0] and rows[0]["metric"] == "FD" and rows[0]["seeds"] == [0, 1]
    assert rows[1]["fd"] == 3.0 and rows[1]["fd_std"] == 0.0 and rows[1]["fd_per_seed"] == [None, 3.0]


@pytest.mark.parametrize("method", ["full", "lora-r4", "prog"])
def test_a_step_budget_fine_tunes_to_the_learning_rate_floor(method, base, fake_fmnist, cache_dir, tmp_path):
    """--budget-steps 8: full fine-tuning runs 8 steps; LoRA (no weight gradients) and prog (cheaper stages)
    more, each spending the budget to within a step and ending at the learning-rate floor, evaluated at the end."""
    res = finetune(spec_for(method, base, fake_fmnist, cache_dir, budget_steps=8.0, min_lr=1e-6,
                            lr_schedule="cosine"), tmp_path / method)
    s, b = res["summary"], res["summary"]["budget"]
    assert res["done"] and b["unit"] == "full-model steps" and s["steps"] == b["steps"]
    assert (s["steps"] == 8) if method == "full" else (s["steps"] > 8)
    assert 1 - 1 / 8 <= b["used"] <= 1.0, b
    assert res["curve"][-1]["step"] == s["steps"] and math.isfinite(s["fd"])
    assert res["curve"][-1]["lr"] == pytest.approx(1e-6)


def test_a_budget_fine_tuning_run_resumes_to_the_same_weights(base, fake_fmnist, cache_dir, tmp_path):
    spec = spec_for("prog", base, fake_fmnist, cache_dir, budget_steps=8.0)
    finetune(spec, tmp_path / "a")
    finetune(replace(spec, train=replace(spec.train, stop_after_steps=4)), tmp_path / "b")
    res = finetune(None, tmp_path / "b", resume=True)
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["done"] and res["summary"]["budget"] == ra["summary"]["budget"]
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_learning_rate_is_constant_by_default_and_cosine_on_request(base, fake_fmnist, cache_dir, tmp_path):
    """The paper fine-tunes at a constant rate (after the warm-up); --lr-schedule cosine decays it to --min-lr."""
    const = finetune(spec_for("full", base, fake_fmnist, cache_dir, eval_points=2, min_lr=1e-5), tmp_path / "c")
    assert [p["lr"] for p in const["curve"]] == [pytest.approx(1e-3)] * 2
    cos = finetune(spec_for("full", base, fake_fmnist, cache_dir, eval_points=2, min_lr=1e-5, lr_schedule="cosine"),
                   tmp_path / "k")
    assert 1e-5 < cos["curve"][0]["lr"] < 1e-3 and cos["curve"][-1]["lr"] == pytest.approx(1e-5)


def test_sid_dropout_resumes_identically_and_exports_its_null_row(base, fake_fmnist, cache_dir, tmp_path):
    """SID dropout (default: the class-dropout probability) draws from a step-seeded generator: a stopped and
    resumed run equals an uninterrupted one; the export keeps the null-stage row and loads back."""
    spec = replace(spec_for("prog", base, fake_fmnist, cache_dir), sid_dropout=0.5)  # prog: a schedule not timed
    finetune(spec, tmp_path / "a")
    finetune(replace(spec, train=replace(spec.train, stop_after_steps=4)), tmp_path / "b")
    finetune(None, tmp_path / "b", resume=True)
    finetune(replace(spec, sid_dropout=0.0), tmp_path / "z")
    a, b, z = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("a", "b", "z"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["sid.embedding.weight"].shape[0] == 5 and z["sid.embedding.weight"].shape[0] == 4  # + the null row
    model, _ = load_backbone(tmp_path / "a" / "model")
    assert model.sid.null_row and model.sid.stage == 3


def test_search_time_is_inside_the_runtime_under_flops_time(base, fake_fmnist, cache_dir, tmp_path):
    """--time-source flops counts every candidate's FLOPs during the search: search time, so inside the runtime."""
    res = finetune(spec_for("autoprog-zero", base, fake_fmnist, cache_dir, time_source="flops"), tmp_path / "az")
    s = res["summary"]
    assert 0 < s["search_time_s"] <= s["wall_time_s"]


def test_a_diffusers_dit_trains_with_gradient_checkpointing_and_its_sid_dropout(fake_fmnist, cache_dir, tmp_path):
    """diffusers' DiT adds the SID inside every block; with --gradient-checkpointing the backward pass runs those
    blocks again, so it must see the same SID dropout as the forward pass (else a CheckpointError)."""
    from autoprog.models.dit import DiffusersDiT

    torch.manual_seed(0)
    save_backbone(DiffusersDiT(image_size=28, patch_size=4, in_chans=1, num_classes=10, hidden_size=16, depth=2,
                               num_heads=2), tmp_path / "base", extra={"classes": list(range(10))})
    spec = spec_for("prog", tmp_path / "base", fake_fmnist, cache_dir, gradient_checkpointing=True,
                    class_dropout=0.5, steps=4)
    res = finetune(spec, tmp_path / "run")
    assert res["done"] and res["summary"]["steps"] == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["spec"]["train"]["gradient_checkpointing"]


@pytest.mark.parametrize("kind", ["dit", "diffusers-dit"])
def test_hybrid_loss_finetunes_a_learned_sigma_dit_and_moves_its_variance_head(kind, base, fake_fmnist, cache_dir,
                                                                              tmp_path):
    from autoprog.models.dit import build_backbone, save_backbone

    plain, meta = load_backbone(base)
    torch.manual_seed(0)
    sigma = {"learn_sigma": True} if kind == "dit" else {"learned_sigma": True}
    m = build_backbone(kind, image_size=28, patch_size=4, in_chans=1, num_classes=10, hidden_size=16, depth=2,
                       num_heads=2, **sigma)
    save_backbone(m, tmp_path / "base", extra={"classes": meta["classes"]})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    spec = spec_for("full", tmp_path / "base", fake_fmnist, cache_dir, hybrid_loss=True)
    res = finetune(spec, tmp_path / "run")
    assert res["done"] and math.isfinite(res["summary"]["fd"])
    tuned, _ = load_backbone(tmp_path / "run" / "model")
    assert tuned.learned_sigma
    head = "final_layer.linear" if kind == "dit" else "model.proj_out_2"
    w0, w1 = before[head + ".weight"], tuned.state_dict()[head + ".weight"]
    out = w0.shape[0] // 16  # rows per pixel (2C), channel fastest
    variance = (torch.arange(w0.shape[0]) % out) >= out // 2
    assert not torch.equal(w0[variance], w1[variance]), "the variance rows learned"
    res = finetune(replace(spec, train=replace(spec.train, hybrid_loss=False)), tmp_path / "plain")
    tuned, _ = load_backbone(tmp_path / "plain" / "model")
    assert torch.equal(w0[variance], tuned.state_dict()[head + ".weight"][variance]), "without it they do not"


def test_a_learned_sigma_base_is_pre_trained_with_the_hybrid_loss_and_fine_tunes_with_it(cli, fake_fmnist, cache_dir,
                                                                                         tmp_path):
    rc, _, err = cli("pretrain", "--task", "diffusion", "--data-root", fake_fmnist, "--hidden-size", "16",
                     "--depth", "2", "--num-heads", "2", "--learn-sigma", "--hybrid-loss", "--out", tmp_path / "base",
                     *TRAIN_FLAGS)
    assert rc == 0, err
    model, _ = load_backbone(tmp_path / "base" / "model")
    assert model.learned_sigma and model.config["learn_sigma"]
    rc, _, err = cli("finetune", "--base", tmp_path / "base" / "model", "--method", "prog", "--hybrid-loss",
                     "--data-root", fake_fmnist, "--out", tmp_path / "ft", *TRAIN_FLAGS)
    assert rc == 0, err
    assert load_backbone(tmp_path / "ft" / "model")[0].learned_sigma


def test_under_the_hybrid_loss_the_searches_measure_what_training_trains(base, fake_fmnist, cache_dir, tmp_path,
                                                                       monkeypatch):
    """As the official AutoProg-Zero search does under DiT's hybrid loss: ZiCo's gradients and the timed steps take
    the hybrid loss, and the NTK sees the whole output (ε and the variance values)."""
    import autoprog.diffusion.sampling as sampling
    import autoprog.diffusion.trainer as trainer_mod
    from autoprog.diffusion.trainer import DiffusionTrainer
    from autoprog.models.dit import build_backbone, save_backbone

    _, meta = load_backbone(base)
    torch.manual_seed(0)
    m = build_backbone("dit", image_size=28, patch_size=4, in_chans=1, num_classes=10, hidden_size=16, depth=2,
                       num_heads=2, learn_sigma=True)
    save_backbone(m, tmp_path / "base", extra={"classes": meta["classes"]})
    calls = []
    for module, where in ((sampling, "sampling"), (trainer_mod, "trainer")):
        real = module.hybrid_loss

        def spied(out, *a, _real=real, _where=where):
            calls.append((_where, out.shape[1]))
            return _real(out, *a)

        monkeypatch.setattr(module, "hybrid_loss", spied)
    spec = spec_for("autoprog-zero", tmp_path / "base", fake_fmnist, cache_dir, hybrid_loss=True)
    res = finetune(spec, tmp_path / "run")
    assert res["done"] and math.isfinite(res["summary"]["fd"])
    assert ("trainer", 2) in calls  # the proxies' loss (ZiCo) on both output halves
    timed = []
    real_timed = DiffusionTrainer._timed

    def spy_timed(self, *a, **k):
        before = len(calls)
        out = real_timed(self, *a, **k)
        timed.append(len(calls) - before)
        return out

    monkeypatch.setattr(DiffusionTrainer, "_timed", spy_timed)
    finetune(replace(spec, train=replace(spec.train, time_source="measured")), tmp_path / "timed")
    assert timed and all(n > 0 for n in timed)  # every timed step took the hybrid loss
    calls.clear()
    finetune(replace(spec, train=replace(spec.train, hybrid_loss=False)), tmp_path / "plain")
    assert calls == []  # without it nothing does


def test_the_evaluators_feature_classifier_trains_on_the_runs_device(base, fake_fmnist, cache_dir, monkeypatch):
    """The FD feature classifier is trained (once, then cached) on the device the evaluator is built for: on a GPU
    job that is the GPU, not the host (about 2 minutes of CPU for the default Fashion-MNIST one)."""
    import autoprog.diffusion.quality as quality
    from autoprog.diffusion.data import load_diffusion_data
    from autoprog.diffusion.runner import build_evaluator

    asked = []
    real = quality.load_or_train_feature_net
    monkeypatch.setattr(quality, "load_or_train_feature_net",
                        lambda *a, device="cpu", **k: asked.append(device) or real(*a, device=device, **k))
    spec = FinetuneSpec(data_root=str(fake_fmnist), cache_dir=str(cache_dir), feature_epochs=1)
    data = load_diffusion_data(spec.dataset, spec.data_root, (5, 6), 28, None, seed=0)
    run_device = torch.device("cpu", 0)  # the run's device, told apart from the "cpu" default
    build_evaluator(spec, data, run_device)
    assert asked == [run_device]


def test_the_comparisons_sample_grid_is_made_on_the_runs_device(base, tmp_path, monkeypatch):
    """``samples.png`` of a comparison: each method's model is sampled, and decoded, on the run's device."""
    import shutil

    import autoprog.diffusion.runner as runner

    shutil.copytree(base, tmp_path / "full" / "model")
    decoded_on = []
    real = runner.decode_samples
    monkeypatch.setattr(runner, "decode_samples",
                        lambda meta, x0, device="cpu": decoded_on.append(device) or real(meta, x0, device))
    run_device = torch.device("cpu", 0)
    png = runner.sample_comparison(["full"], tmp_path, (0, 1), per_class=1, steps=2, device=run_device)
    assert png.is_file() and decoded_on == [run_device]


class _Roles:
    """An accelerator of two processes as one of them sees it."""

    def __init__(self, main: bool):
        self.num_processes, self.is_main_process, self.device = 2, main, torch.device("cpu")

    def print(self, *args):
        pass


def test_only_the_main_process_builds_the_evaluator_and_the_others_learn_what_it_scores(monkeypatch):
    """Under several processes the evaluator (feature classifier, real features, CLIP or DINO weights) is built
    on the main process alone; the others get what they need of it: its headline, its direction, whether it
    scores --eval-prompts."""
    import autoprog.diffusion.runner as runner

    class Subject:
        headline, higher_is_better = "dino", True

        def prompt_scores(self, *a):
            return {}

    built, told = [], []
    monkeypatch.setattr(runner, "build_evaluator", lambda *a, **k: built.append(a) or Subject())
    monkeypatch.setattr(runner, "broadcast", lambda acc, obj: told.append(obj) or told[0])
    evaluator = runner.run_evaluator(None, None, _Roles(main=True))
    assert isinstance(evaluator, Subject) and len(built) == 1
    assert told == [{"error": None, "headline": "dino", "higher_is_better": True, "prompt_scores": True}]
    other = runner.run_evaluator(None, None, _Roles(main=False))  # told[0]: what the main process said
    assert len(built) == 1 and isinstance(other, runner.ScoredOnMainProcess)
    assert (other.headline, other.higher_is_better, hasattr(other, "prompt_scores")) == ("dino", True, True)
    with pytest.raises(RuntimeError, match="only the main process scores"):
        other.evaluate(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_an_evaluator_the_main_process_cannot_build_stops_every_process(monkeypatch):
    import autoprog.diffusion.runner as runner
    from autoprog.errors import AutoprogError, ConfigError

    told = []

    def fail(*a, **k):
        raise ConfigError("--fid-weights /x: no such file")

    monkeypatch.setattr(runner, "build_evaluator", fail)
    monkeypatch.setattr(runner, "broadcast", lambda acc, obj: told.append(obj) or told[0])
    with pytest.raises(ConfigError, match="no such file"):  # the main process raises its own error, after telling
        runner.run_evaluator(None, None, _Roles(main=True))
    assert told[0]["error"] == (True, "--fid-weights /x: no such file")
    with pytest.raises(AutoprogError, match="main process could not build the evaluator: --fid-weights /x"):
        runner.run_evaluator(None, None, _Roles(main=False))
    told[0]["error"] = (False, "CUDA out of memory")  # not the user's to fix: not an AutoprogError
    with pytest.raises(RuntimeError, match="CUDA out of memory") as caught:
        runner.run_evaluator(None, None, _Roles(main=False))
    assert not isinstance(caught.value, AutoprogError)


def test_compare_finetune_takes_the_spec_first_as_compare_does_and_still_reads_the_old_order(monkeypatch):
    import inspect

    import autoprog.diffusion.runner as runner
    from autoprog.classification.runner import compare

    assert list(inspect.signature(compare).parameters)[:3] == ["base", "methods", "out"]
    for f in (runner.compare_finetune, runner.compare_finetune_seeds):
        assert list(inspect.signature(f).parameters)[:3] == ["spec", "methods", "out"]
    spec = FinetuneSpec()
    assert runner._spec_first(spec, ["full"], "compare_finetune") == (spec, ["full"])
    with pytest.warns(DeprecationWarning, match="pass the spec first"):
        assert runner._spec_first(["full"], spec, "compare_finetune") == (spec, ["full"])


def test_the_zero_shot_proxies_run_in_fp32_when_training_runs_in_bf16(base, fake_fmnist, cache_dir, tmp_path,
                                                                       monkeypatch, fresh_accelerate):
    """As the official search computes them (fp32): the NTK condition number and ZiCo see the model's own forward,
    not the bf16 autocast Accelerate wraps it in for training (bf16 on the CPU here, as on a GPU)."""
    from accelerate import Accelerator

    import autoprog.algorithms.autoprog_zero as zero
    import autoprog.diffusion.runner as runner
    import autoprog.diffusion.trainer as trainer_module

    seen = {"proxy": [], "other": []}  # autocast inside a block's forward: in a proxy, or elsewhere (training)
    where = ["other"]

    def in_proxy(f):
        def run(*a, **k):
            where.append("proxy")
            try:
                return f(*a, **k)
            finally:
                where.pop()
        return run

    monkeypatch.setattr(zero, "ntk_condition_number", in_proxy(zero.ntk_condition_number))
    monkeypatch.setattr(zero, "zico", in_proxy(zero.zico))

    class Watching(trainer_module.DiffusionTrainer):
        def __init__(self, model, *a, **k):
            model.blocks[0].register_forward_pre_hook(
                lambda m, args: seen[where[-1]].append(torch.is_autocast_enabled("cpu")))
            super().__init__(model, *a, **k)

    monkeypatch.setattr(runner, "DiffusionTrainer", Watching)
    spec = spec_for("autoprog-zero", base, fake_fmnist, cache_dir, eval_points=1)
    finetune(spec, tmp_path / "run", accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    assert seen["proxy"] and not any(seen["proxy"]), "the proxies ran under autocast"
    assert seen["other"] and all(seen["other"]), "training ran in bf16"


def test_an_interrupt_while_the_main_process_builds_the_evaluator_is_told_to_the_others(monkeypatch):
    import autoprog.diffusion.runner as runner

    told = []

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build_evaluator", interrupted)
    monkeypatch.setattr(runner, "broadcast", lambda acc, obj: told.append(obj) or told[0])
    with pytest.raises(KeyboardInterrupt):
        runner.run_evaluator(None, None, _Roles(main=True))
    assert told[0]["error"] == (False, "KeyboardInterrupt")  # the others stop too, instead of waiting


def test_the_built_in_class_split_is_the_default_of_fashion_mnist_and_digits_only():
    """Unset --classes: the built-in task's classes on Fashion-MNIST and digits (base 0-4, fine-tuning 5-9); a
    folder of the user's own whole; None is all, as ever; a saved spec names what it took."""
    from autoprog.diffusion.runner import BaseSpec, DreamBoothSpec, FinetuneSpec, TextFinetuneSpec

    assert FinetuneSpec().class_selection == "5-9" and FinetuneSpec(dataset="digits").class_selection == "5-9"
    assert TextFinetuneSpec().class_selection == "5-9" and BaseSpec().class_selection == "0-4"
    for cls in (FinetuneSpec, TextFinetuneSpec, BaseSpec):
        assert cls(dataset="/data/flowers").class_selection == "all"
        assert cls(dataset="/data/flowers", classes="1,2").class_selection == "1,2"
        assert cls().to_dict()["classes"] == cls().class_selection  # saved as taken
    assert DreamBoothSpec().class_selection == "all"  # (its data is the subject's)
    assert FinetuneSpec.from_dict({**FinetuneSpec().to_dict(), "classes": None}).class_selection == "all"
    assert FinetuneSpec(classes=None).class_selection == "all" == BaseSpec(classes=None).class_selection  # as ever


def test_a_base_and_its_fine_tuning_on_an_image_folder_take_all_its_classes(cli, image_folder, cache_dir, tmp_path):
    """A two-class folder: the base trains on both (the built-in 0-4 once asked for classes it lacks) and so
    does fine-tuning it (5-9 once)."""
    flags = [*TRAIN_FLAGS, "--dataset", image_folder, "--image-size", "16", "--batch-size", "4"]
    rc, _, err = cli("pretrain", "--task", "diffusion", "--hidden-size", "16", "--depth", "2", "--num-heads", "2",
                     "--out", tmp_path / "base", *flags)
    assert rc == 0, err
    _, meta = load_backbone(tmp_path / "base" / "model")
    assert meta["classes"] == [0, 1]
    rc, _, err = cli("finetune", "--method", "full", "--base", tmp_path / "base" / "model", "--out", tmp_path / "ft",
                     *flags)
    assert rc == 0, err
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["spec"]["classes"] == "all"


def test_a_greyscale_base_on_colour_images_says_to_train_a_base_on_them(cli, base, image_folder, tmp_path):
    rc, _, err = cli("finetune", "--method", "full", "--base", base, "--dataset", image_folder, "--out",
                     tmp_path / "ft", *TRAIN_FLAGS)
    assert rc == 2 and "the images have 3 channels (colour), the base model takes 1: give a base made for 3-channel" \
        in err and "autoprog pretrain --task diffusion --dataset" in err
    assert "--vae" not in err and "\n" not in err.strip()


def test_a_folder_of_greyscale_images_fine_tunes_a_greyscale_base(cli, base, image_folder, tmp_path):
    """Greyscale files (which an ImageFolder reads as RGB) train a 1-channel base as one channel, value for value;
    one colour file among them keeps the folder colour (refused as above)."""
    from PIL import Image

    from autoprog.diffusion.data import load_diffusion_data

    for f in image_folder.rglob("*.png"):
        Image.open(f).convert("L").save(f)
    rgb = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    assert rgb.in_chans == 3 and rgb.to_greyscale() and rgb.in_chans == 1
    assert torch.equal(rgb.train_images[:, 0], load_diffusion_data(str(image_folder), classes=None, image_size=16).train_images[:, 1])
    rc, out, err = cli("finetune", "--method", "full", "--base", base, "--dataset", image_folder, "--image-size", "16",
                       "--batch-size", "4", "--out", tmp_path / "ft", *TRAIN_FLAGS[:2], *TRAIN_FLAGS[4:])
    assert rc == 0, err
    assert "greyscale images, trained as one channel" in out
    Image.new("RGB", (20, 20), (255, 0, 0)).save(image_folder / "train" / "circle" / "red.png")
    rc, _, err = cli("finetune", "--method", "full", "--base", base, "--dataset", image_folder, "--image-size", "16",
                     "--out", tmp_path / "ft2", *TRAIN_FLAGS)
    assert rc == 2 and "have 3 channels (colour)" in err
    from autoprog.diffusion.data import DiffusionData

    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)  # the feature classifier's colour images: as PIL
    d = DiffusionData("x", x, torch.zeros(2).long(), x.clone(), torch.zeros(2).long(), 1, (0,))
    assert not d.to_greyscale() and d.to_greyscale(luma=True) and d.in_chans == 1
    pil = Image.fromarray(x[1].permute(1, 2, 0).numpy()).convert("L")
    assert torch.equal(d.train_images[1, 0], torch.from_numpy(np.asarray(pil).copy()))


def test_a_search_of_fewer_steps_than_stages_runs_the_stages_that_get_a_step(base, fake_fmnist, cache_dir, tmp_path):
    """Two steps for three stages: the stages without a step are left out of the schedule (before, the first
    checkpoint's schedule had no stage and the run stopped with 'a schedule needs at least one stage')."""
    res = finetune(spec_for("autoprog-zero", base, fake_fmnist, cache_dir, steps=2, eval_points=1,
                            time_source="flops"), tmp_path / "az")
    stages = res["summary"]["schedule"]["stages"]
    assert res["done"] and 1 <= len(stages) <= 2 and sum(s["fraction"] for s in stages) == pytest.approx(1)


def test_autoprog_zero_searches_a_dataset_smaller_than_its_proxy_batches(base, fake_fmnist, cache_dir, tmp_path):
    """Fewer training images than --proxy-batches × --proxy-batch-size (8 here): the proxies' fixed images repeat
    to fill their batches (before, the timesteps drawn for 8 met 6 images and the search crashed)."""
    spec = replace(spec_for("autoprog-zero", base, fake_fmnist, cache_dir, steps=4, eval_points=1, batch_size=4),
                   subset=6)
    res = finetune(spec, tmp_path / "az")
    assert res["done"]
    assert len(res["summary"]["search"]) >= 1


def test_a_diffusion_resume_refuses_training_data_that_changed(cli, image_folder, tmp_path):
    """A class folder added before a resume: one line naming the change (before, the base's class table failed to
    load), and the same data resumes."""
    import shutil

    flags = ["--dataset", image_folder, "--image-size", "16", "--batch-size", "4", "--hidden-size", "16", "--depth",
             "2", "--num-heads", "2", "--steps", "4", "--eval-points", "1", "--curve-samples", "4", "--fd-samples",
             "4", "--sample-steps", "2", "--feature-epochs", "1", "--cpu"]
    out = tmp_path / "base"
    assert cli("pretrain", "--task", "diffusion", "--out", out, "--stop-after-steps", "2", *flags)[0] == 0
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "circle", image_folder / split / "triangle")
    rc, _, err = cli("pretrain", "--task", "diffusion", "--resume", out, "--cpu")
    assert rc == 2 and "the training data differ from those this run started with (10 images then, 15 now)" in err
    assert "\n" not in err.strip()
    for split in ("train", "val"):
        shutil.rmtree(image_folder / split / "triangle")
    rc, _, err = cli("pretrain", "--task", "diffusion", "--resume", out, "--cpu")
    assert rc == 0, err


def test_a_folders_classes_take_the_base_models_rows_by_name(cli, image_folder, tmp_path, capsys):
    """A base of circle and square fine-tuned on square and triangle: square starts from the base's square row
    (before, from circle's, by position) and triangle from a new one; the built-in split of one label space and a
    base of other classes keep every row in place."""
    from autoprog.diffusion.runner import class_rows

    flags = ["--image-size", "16", "--batch-size", "4", "--hidden-size", "16", "--depth", "2", "--num-heads", "2",
             "--steps", "2", "--eval-points", "1", "--curve-samples", "4", "--fd-samples", "4", "--sample-steps", "2",
             "--feature-epochs", "1", "--cpu"]
    rc, _, err = cli("pretrain", "--task", "diffusion", "--dataset", image_folder, "--out", tmp_path / "b", *flags)
    assert rc == 0, err
    base, _ = load_backbone(tmp_path / "b" / "model")
    for split in ("train", "val"):
        (image_folder / split / "circle").rename(image_folder / split / "triangle")
    from autoprog.diffusion.runner import FinetuneSpec, build_finetune

    spec = FinetuneSpec(method="full", base=str(tmp_path / "b" / "model"), dataset=str(image_folder), image_size=16)
    data, model, *_ = build_finetune(spec)
    assert data.class_names == ("square", "triangle")
    table, old = model.class_embedding_modules()[0].weight, base.class_embedding_modules()[0].weight
    assert torch.equal(table[0], old[1]) and not torch.equal(table[1], old[0]) and not torch.equal(table[1], old[1])
    assert torch.equal(table[2], old[2]), "the null class keeps its row"
    assert "classes the base model knows, by name: square (the others new)" in capsys.readouterr().out
    names = ["t-shirt", "trouser", "pullover"]
    assert class_rows(names, names, 3) is None and class_rows(["a", "b"], ["c", "d"], 2) is None
    assert class_rows(["a", "b"], ["a", "c"], 2) == [0, None] and class_rows(None, ["a"], 1) is None


def test_a_runs_folder_given_as_a_model_says_where_its_model_is(cli, base, fake_fmnist, tmp_path):
    """--base of a finished run's folder names its model folder; sample of a run stopped before its end says it
    has no model yet; a path that does not exist says so."""
    rc, _, err = cli("finetune", "--method", "full", "--base", base.parent, "--out", tmp_path / "ft", *TRAIN_FLAGS)
    assert rc == 2 and f"{base.parent} is a run's folder: its model is {base}" in err
    stopped = tmp_path / "stopped"
    assert cli("pretrain", "--task", "diffusion", "--data-root", fake_fmnist, "--hidden-size", "16", "--depth", "2",
               "--num-heads", "2", "--out", stopped, "--stop-after-steps", "2", *TRAIN_FLAGS)[0] == 0
    rc, _, err = cli("sample", stopped, "--cpu")
    assert rc == 2 and "is a run's folder with no model yet (it stopped before its end): finish it with --resume" in err
    rc, _, err = cli("sample", tmp_path / "nowhere", "--cpu")
    assert rc == 2 and "nowhere: no such model directory" in err


def test_a_resumed_diffusion_run_may_stop_again(cli, fake_fmnist, tmp_path):
    out = tmp_path / "b"
    flags = ["--data-root", fake_fmnist, "--hidden-size", "16", "--depth", "2", "--num-heads", "2", "--steps", "4",
             "--eval-points", "4", "--batch-size", "16", "--curve-samples", "4", "--fd-samples", "8", "--sample-steps",
             "2", "--feature-epochs", "1", "--cpu"]
    assert cli("pretrain", "--task", "diffusion", "--out", out, "--stop-after-steps", "1", *flags)[0] == 0
    rc, stdout, err = cli("pretrain", "--task", "diffusion", "--resume", out, "--stop-after-steps", "2", "--cpu")
    assert rc == 0 and "stopped early as asked" in stdout, err
    assert json.loads((out / "results.json").read_text())["summary"]["steps"] == 2
    rc, stdout, err = cli("pretrain", "--task", "diffusion", "--resume", out, "--cpu")
    assert rc == 0 and "done: " in stdout and "after 4 steps" in stdout, err


def test_a_fine_tuning_comparison_never_reuses_a_run_trained_on_other_data(cli, base, image_folder, cache_dir,
                                                                          tmp_path):
    """Images added to the folder between two invocations of one comparison: its finished runs on the old images
    are refused by name instead of reused beside new ones; on the same images they are reused."""
    from PIL import Image

    for f in image_folder.rglob("*.png"):
        Image.open(f).convert("L").save(f)
    args = ["compare", "--task", "finetune", "--methods", "full", "--front", "1", "--no-budget-baseline", "--base",
            base, "--dataset", image_folder, "--image-size", "16", "--cache-dir", cache_dir, "--out", tmp_path / "c",
            *TRAIN_FLAGS[:2], "--batch-size", "4", *TRAIN_FLAGS[4:]]
    rc, _, err = cli(*args)
    assert rc == 0, err
    rc, stdout, err = cli(*args)
    assert rc == 0 and stdout.count("reusing finished run") == 2, err
    Image.new("L", (20, 20)).save(image_folder / "train" / "circle" / "new.png")
    rc, _, err = cli(*args)
    assert rc == 2 and "holds a full run on other training data (10 images then, 11 now)" in err, err


def test_a_warm_up_set_over_half_the_run_warns_that_it_is_cut(cli, base, fake_fmnist, cache_dir, tmp_path):
    rc, _, err = cli("finetune", "--method", "bitfit", "--base", base, "--data-root", fake_fmnist, "--cache-dir",
                     cache_dir, "--out", tmp_path / "ft", *TRAIN_FLAGS, "--warmup-steps", "6")
    assert rc == 0 and "warning: --warmup-steps 6 is over half the run (8 steps)" in err, err


def test_images_too_small_for_the_feature_classifier_are_one_line(cli, base, fake_fmnist, cache_dir, tmp_path):
    rc, _, err = cli("finetune", "--method", "full", "--base", base, "--data-root", fake_fmnist, "--cache-dir",
                     cache_dir, "--image-size", "4", "--out", tmp_path / "ft", *TRAIN_FLAGS)
    assert rc == 2 and "Traceback" not in err and "needs images of at least 8x8 px, got 4x4: give --image-size 8" \
        in err, err
