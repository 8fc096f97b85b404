"""The benchmark scripts run end to end on tiny settings and report what they measured."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

from autoprog.cli import main

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    monkeypatch.syspath_prepend(str(BENCH))  # as `python benchmarks/NAME` puts the script's folder first
    runpy.run_path(str(BENCH / name), run_name="__main__")


def test_finetune_step_speed_times_every_stage(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    run_script("finetune_step_speed.py", "--preset", "tiny", "--batch-size", "2", "--steps", "1",
               "--schedule", "8x2,16x4,28x6", "--out", str(out), monkeypatch=monkeypatch)
    d = json.loads(out.read_text())
    assert [r["subnet"] for r in d["stages"]] == ["8px/2blk", "16px/4blk", "28px/6blk"]
    learnable = [r["learnable_params"] for r in d["stages"]]
    assert learnable == sorted(learnable) and learnable[-1] == d["full"]["learnable_params"]
    assert d["stages"][0]["flops_speedup"] > 5  # 4 of 49 patches and a third of the weight gradients
    assert d["stages"][-1]["flops_speedup"] == pytest.approx(1.0)
    assert all(r["step_s"] > 0 for r in d["stages"])


def test_finetune_step_speed_times_a_text_to_image_unets_stages_with_their_memory(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    run_script("finetune_step_speed.py", "--preset", "t2i-tiny", "--latent-size", "16", "--batch-size", "2",
               "--steps", "1", "--warmup", "1", "--out", str(out), monkeypatch=monkeypatch)
    d = json.loads(out.read_text())
    assert [r["subnet"] for r in d["stages"]][-1] == "16px/5blk"  # down, down, mid, up, up
    learnable = [r["learnable_params"] for r in d["stages"]]
    assert learnable == sorted(learnable) and learnable[-1] == d["full"]["learnable_params"]
    assert d["stages"][0]["flops_speedup"] > 1.5
    assert all(r["peak_gib"] is not None and r["peak_gib"] >= 0 for r in [d["full"], *d["stages"]])


def test_ema_update_speed_times_both_emas_at_every_stage(tmp_path, monkeypatch):
    out = tmp_path / "ema.json"
    run_script("ema_update_speed.py", "--preset", "tiny", "--updates", "1", "--out", str(out), monkeypatch=monkeypatch)
    d = json.loads(out.read_text())
    assert [r["subnet"] for r in d["stages"]][-1] == "full" and len(d["stages"]) == 5
    shares = [r["learnable_share"] for r in d["stages"]]
    assert shares == sorted(shares) and shares[0] < 0.5 and shares[-1] == 1.0
    assert all(r["timm_s"] > 0 and r["lazy_s"] > 0 for r in d["stages"])


def test_the_previous_sid_rule_scores_stage_ks_candidates_with_the_stage_before(monkeypatch):
    """benchmarks/previous_sid_rule.py: the stage identifier is set after the controller enters (and searches) a
    stage, so the search sees the previous stage's; a trainer's own SID still changes at every stage."""
    from autoprog.diffusion.trainer import DiffusionTrainer

    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("_stage_entering", "_stage_entered"):  # put back after the test, whatever the script sets
        monkeypatch.setattr(DiffusionTrainer, name, getattr(DiffusionTrainer, name))
    set_stage = DiffusionTrainer._stage_entering
    runpy.run_path(str(BENCH / "previous_sid_rule.py"), run_name="previous_sid_rule")
    assert DiffusionTrainer._stage_entered is set_stage
    stages = []

    class Model:
        def set_stage(self, k):
            stages.append(k)

    trainer = type("T", (), {"model": Model()})()
    DiffusionTrainer._stage_entering(trainer, 2)
    assert stages == []
    DiffusionTrainer._stage_entered(trainer, 2)
    assert stages == [2]


def test_pretrain_schedules_reuses_the_reference_and_replays_inline_schedules(fake_fmnist, tmp_path, monkeypatch):
    like = tmp_path / "original"
    args = [a for a in tiny_args(fake_fmnist, epochs="1") if a != "--no-flops"]
    assert main(["pretrain", "--method", "original", "--out", str(like), *args]) == 0
    out = tmp_path / "sweep"
    run_script("pretrain_schedules.py", "--like", str(like), "--out", str(out), "--schedules", "16x2,28x4",
               "16x2@1,28x4@3", "--budgets", "0.5", monkeypatch=monkeypatch)
    assert not (out / "original").exists()  # the finished reference run was reused, not trained again
    rows = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["original", "original, 4 steps", "16px·2 → 28px·4",
                                       "16px·2 → 28px·4 (16x2@1,28x4@3)"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["flops_speedup"] == 1.0
    assert rows[1]["flops_speedup"] == pytest.approx(2.0)
    assert rows[2]["flops_speedup"] > rows[3]["flops_speedup"] > 1.0  # the second spends less time small
    sched = json.loads((out / "16x2_1-28x4_3" / "schedule.json").read_text())["stages"]
    assert [s["fraction"] for s in sched] == [0.25, 0.75]


def test_pretrain_schedules_rejects_a_bad_schedule_before_training(fake_fmnist, tmp_path, monkeypatch, capsys):
    like = tmp_path / "cfg"
    like.mkdir()
    spec = {"method": "original", "data_root": str(fake_fmnist), "subset": 64, "depth": 4, "embed_dim": 16,
            "num_heads": 2, "patch_size": 4, "train": {"epochs": 1, "batch_size": 32}}
    (like / "config.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as e:
        run_script("pretrain_schedules.py", "--like", str(like), "--out", str(tmp_path / "o"),
                   "--schedules", "16x2,24x4", monkeypatch=monkeypatch)
    assert e.value.code == 2 and "full model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fault_test_counts_clean_bad_inputs(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_test", BENCH / "fault_test.py")
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    assert len(ft.BAD_INPUTS) >= 50
    picked = [b for b in ft.BAD_INPUTS if b[1] in ("resume with other settings", "sample guidance nan",
                                                    "world size not a number")]
    monkeypatch.setattr(ft, "BAD_INPUTS", picked + [(["pretrain", "--help"], "not bad: help exits 0"),
                                                    (["RANK=0", "pretrain", "--help"], "not bad, with a variable")])
    counts = ft.bad_inputs(tmp_path, jobs=2)  # two at a time, each case with its own environment variables
    assert counts == {"bad inputs": 5, "clean": 3}, "three clean one-line errors; --help is not one"


def test_fault_test_fixtures_and_environment_prefixes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_test", BENCH / "fault_test.py")
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    used = {a[4:].partition("/")[0] for argv, _ in ft.BAD_INPUTS for a in argv if a.startswith("FIX:")}
    assert used <= set(ft.FIXTURES), f"cases name fixtures that do not exist: {used - set(ft.FIXTURES)}"
    argv, env = ft.case_argv(["WORLD_SIZE=x", "pretrain", "--out", "OUT", "--config", "FIX:yaml-duplicate-key",
                              "--x", "OUT/none"], tmp_path / "bad-0")
    assert env == {"WORLD_SIZE": "x"} and argv[:3] == ["pretrain", "--out", str(tmp_path / "bad-0")]
    assert Path(argv[4]).read_text() == "epochs: 1\nepochs: 2\n" and argv[6] == f"{tmp_path / 'bad-0'}/none"
    model = Path(ft.case_argv(["finetune", "--base", "FIX:model-wrong-type"], tmp_path / "bad-1")[0][2])
    assert json.loads((model / "config.json").read_text())["config"]["depth"] == "six"


def test_search_regret_replays_the_found_schedule_and_its_neighbours(fake_fmnist, tmp_path, monkeypatch):
    like, out = tmp_path / "searched", tmp_path / "regret"
    args = [a for a in tiny_args(fake_fmnist, epochs="1") if a != "--no-flops"]
    assert main(["pretrain", "--method", "autoprog-zero-gain", "--time-source", "flops", "--out", str(like),
                 *args]) == 0
    run_script("search_regret.py", "--like", str(like), "--out", str(out), "--max", "2", monkeypatch=monkeypatch)
    res = json.loads((out / "regret.json").read_text())
    rows = res["fixed"]
    assert rows[0]["schedule"] == "found schedule, replayed" and len(rows) == 3
    assert rows[0]["stages"] == res["searched"]["schedule"]
    assert all(r["stages"] != rows[0]["stages"] for r in rows[1:]), "neighbours differ from the found schedule"
    eligible = [r["top1"] for r in rows if r["within_flops"]]
    assert eligible, "the replay costs what the searched run did"
    assert res["regret"] == pytest.approx(max(eligible) - res["searched"]["top1"], abs=1e-3)
    assert "regret" in (out / "regret.md").read_text()


def test_search_regret_replays_a_fine_tuning_search(fake_fmnist, cache_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from conftest import tiny_base_dit
    from test_finetune import TINY, spec_for

    from autoprog.diffusion.runner import finetune

    base = tiny_base_dit(fake_fmnist, cache_dir, tmp_path / "base", replace(TINY, steps=6, eval_points=1))
    like, out = tmp_path / "searched", tmp_path / "regret"
    finetune(spec_for("autoprog-zero-nosid", base, fake_fmnist, cache_dir, eval_points=1, time_source="flops"), like)
    run_script("search_regret.py", "--like", str(like), "--out", str(out), "--max", "1", monkeypatch=monkeypatch)
    res = json.loads((out / "regret.json").read_text())
    assert res["metric"] == "fd" and len(res["fixed"]) == 2
    assert res["fixed"][0]["schedule"] == "found schedule, replayed"
    replay = json.loads(next(p for p in out.iterdir() if p.is_dir() and (p / "config.json").is_file())
                        .joinpath("config.json").read_text())
    assert replay["spec"]["method"] == "prog-nosid", "a -nosid search is replayed without the stage identifier"


def test_flops_to_quality_reads_the_front_against_flops(tmp_path, monkeypatch, capsys):
    rows = [{"method": "original", "flops_speedup": 1.0, "top1": 70.0},
            {"method": "original@0.5", "flops_speedup": 2.0, "top1": 60.0},
            {"method": "prog", "flops_speedup": 2.0, "top1": 65.0},  # the front needs 0.75 of the FLOPs: 1.5×
            {"method": "fast", "flops_speedup": 4.0, "top1": 50.0}]  # the shortest budget already does better
    for seed, shift in ((0, 0.0), (1, 5.0)):
        (tmp_path / f"seed{seed}").mkdir()
        seeded = [{**r, "top1": r["top1"] + (shift if r["method"] == "prog" else 0.0)} for r in rows]
        (tmp_path / f"seed{seed}" / "summary.json").write_text(json.dumps(seeded))
    run_script("flops_to_quality.py", str(tmp_path), monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "| prog | 1.75× ± 0.35 | 1.50×, 2.00× |" in out  # seed 1 reaches the whole run's 70 %: 1.0 / 0.5
    assert "| fast | <2.00× ± 0.00 | <2.00×, <2.00× |" in out  # at most 0.5 of the FLOPs, it took 0.25


def test_loader_speed_compares_the_defaults_with_the_old_loader(tmp_path, monkeypatch):
    out = tmp_path / "loader.json"
    run_script("loader_speed.py", "--images", "16", "--size", "32", "--batch-size", "4", "--epochs", "1",
               "--workers", "1", "--out", str(out), monkeypatch=monkeypatch)
    d = json.loads(out.read_text())
    assert d["workers"] == 1 and [r["what"] for r in d["rows"]] == ["data only", "with vit_tiny_patch16_224 training"]
    for row in d["rows"]:
        assert row["old_images_per_s"] > 0 and row["new_images_per_s"] > 0
        assert len(row["per_epoch"]["old"]) == len(row["per_epoch"]["new"]) == 1
        assert row["ratio"] == round(row["per_epoch"]["new"][0] / row["per_epoch"]["old"][0], 3)  # (the rates rounded)


def test_cuda_sync_count_attributes_each_sync_warning_to_its_step_and_line(fake_fmnist, tmp_path, monkeypatch):
    """The GPU check's counter (``benchmarks/cuda_sync_count.py``): a synchronising CUDA call warns under torch's
    sync debug mode; here a stand-in warning in every step's health watch and in every stage entry's growth is
    counted apart, each with its autoprog line, and nothing outside the steps is counted."""
    import importlib.util
    import warnings

    import autoprog.engine as engine
    from autoprog.classification.trainer import Trainer

    spec = importlib.util.spec_from_file_location("cuda_sync_count", BENCH / "cuda_sync_count.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real_watch, real_grow = engine.HealthWatch.watch, Trainer.grow_to

    def watch(self, *a, **k):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return real_watch(self, *a, **k)

    def grow_to(self, *a, **k):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return real_grow(self, *a, **k)

    monkeypatch.setattr(engine.HealthWatch, "watch", watch)
    monkeypatch.setattr(Trainer, "grow_to", grow_to)
    res = mod.count_syncs(["pretrain", "--method", "prog", "--out", str(tmp_path / "run"),
                           *tiny_args(fake_fmnist, epochs="2")])  # 16 steps, 4 stages: 3 growths
    assert res["exit"] == 0 and res["steps"] == 16
    assert res["syncs_in_steady_steps"] == 16 and res["syncs_in_stage_entries"] == 3, res
    (site, n), = res["steady_sites"]  # the autoprog line that called it (the stand-ins are this file's)
    assert site.startswith("engine.py:") and site.endswith(" _apply_update") and n == 16
    assert res["stage_entry_sites"][0][0].split(":")[0].endswith(".py")
    assert engine.RunTemplate._train_one.__name__ == "_train_one", "the engine is left as it was"


@pytest.mark.parametrize("checks, code, says", [
    (None, 0, "device check: 0 check(s) failed, 11 skipped for time"),  # CHECKS unset: every step, none in time
    ("deit_trainer,sync_pretrain", 0, "device check: 0 check(s) failed, 2 skipped for time"),
    ("deit_trainer,bogus", 2, "CHECKS: no step named bogus"),
])
def test_device_check_runs_every_step_or_the_named_ones(checks, code, says, tmp_path):
    """The device check's step selection, with no time left (``DEADLINE=0``: each step is skipped, not run): its
    ``set -u`` must not stop it when ``CHECKS`` is unset, and an unknown name is refused before anything runs."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "CHECKS"}
    env.update(OUT=str(tmp_path / "out"), DEADLINE="0", **({"CHECKS": checks} if checks else {}))
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "smoke"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code and says in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_folder_read_speed_compares_the_fine_tuning_read_with_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "read.json"
    run_script("folder_read_speed.py", "--images", "20", "--size", "32", "--read-size", "16", "--repeats", "1",
               "--workers", "2", "--out", str(out), monkeypatch=monkeypatch)
    d = json.loads(out.read_text())
    assert d["workers"] == 2 and len(d["times"]["old"]) == len(d["times"]["new"]) == 1
    assert d["old_s"] > 0 and d["new_s"] > 0 and d["speedup"] == round(d["old_s"] / d["new_s"], 3)
