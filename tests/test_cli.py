"""The ``autoprog`` command line, in-process: error messages, tiny end-to-end runs, resume, compare, --config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import replay_fixed, tiny_args
from safetensors.torch import load_file

from autoprog.cli import main

pytestmark = pytest.mark.slow

EPOCH_KEYS = {"stage", "resolution", "depth", "lr", "train_loss", "top1", "top1_ema", "train_time_s", "flops_per_step"}
SUMMARY_KEYS = {"top1", "top1_ema", "wall_time_s", "flops_per_step", "epochs", "steps", "total_steps", "schedule",
                "growth"}
ROW_KEYS = {"method", "wall_time_s", "speedup", "flops_speedup", "top1", "top1_ema"}
CHECKPOINT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}
# 4 blocks, 28 px, patch 4, ratio 0.5: the four stages of prog
PROG_STAGES = [(16, 2), (20, 3), (24, 3), (28, 4)]


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("autoprog: error:"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prog_run(tmp_path_factory, fake_fmnist) -> Path:
    """One tiny `pretrain --method prog` run: 2 epochs of 8 steps, the stages change at steps 4, 8 and 12."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cli") / "prog"
    assert main(["pretrain", "--method", "prog", "--out", str(out), *tiny_args(fake_fmnist)]) == 0
    return out


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("extra, needle", [
    (["--model", "nope"], "unknown model"),
    (["--model", "timm:not_a_model"], "unknown timm model"),
    (["--img-size", "30", "--patch-size", "4"], "not divisible"),
    (["--method", "fixed"], "--schedule"),
    (["--method", "fixed", "--schedule", "/nonexistent/schedule.json"], "does not exist"),
    (["--start-ratio", "1.5"], "start-ratio"),
    (["--growth", "identity", "--epochs", "0"], "epochs"),
    (["--subset", "16"], "smaller than one batch"),
])
def test_bad_inputs_exit_2_with_one_line(cli, fake_fmnist, tmp_path, extra, needle):
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--out", out, *tiny_args(fake_fmnist), *extra)
    assert rc == 2
    assert needle in _one_error_line(err)
    assert not (out / "checkpoint").exists()


def test_missing_dataset_dir(cli, tmp_path):
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--data-root", "/nonexistent", "--cpu")
    assert rc == 2
    line = _one_error_line(err)
    assert "apt-get install dataset-fashion-mnist" in line and "--data-root" in line


def test_pretrain_without_out(cli, fake_fmnist):
    rc, _, err = cli("pretrain", *tiny_args(fake_fmnist))
    assert rc == 2
    assert "--out" in _one_error_line(err)


def test_resume_a_directory_without_a_run(cli, tmp_path):
    rc, _, err = cli("pretrain", "--resume", tmp_path, "--cpu")
    assert rc == 2
    assert "--resume" in _one_error_line(err)


def test_config_with_unknown_key(cli, tmp_path, fake_fmnist):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nbogus_option: 3\n")
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--config", cfg, *tiny_args(fake_fmnist))
    assert rc == 2
    assert "bogus_option" in _one_error_line(err)


@pytest.mark.parametrize("text, needle", [("[1, 2]\n", "mapping"), ("epochs: [unclosed\n", "not valid YAML")])
def test_a_bad_config_file_gives_one_line(cli, tmp_path, text, needle):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--config", cfg)
    assert rc == 2
    assert needle in _one_error_line(err)


def test_a_copy_of_a_shipped_preset_is_a_config_file(cli, tmp_path):
    """The natural way to customise a preset: copy its file, edit it, pass it with --config; its task must fit
    the command, as a preset's must."""
    from importlib import resources

    from autoprog.cli import _parse, build_parser

    text = (resources.files("autoprog") / "configs" / "cpu-pretrain.yaml").read_text()
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(text.replace("epochs: 8", "epochs: 3"))
    args = _parse(build_parser(), ["pretrain", "--out", "x", "--config", str(cfg)])
    assert (args.__dict__["train.epochs"], args.subset, args.__dict__["train.batch_size"]) == (3, 10000, 128)
    rc, _, err = cli("pretrain", "--task", "diffusion", "--out", tmp_path / "run", "--config", cfg)
    assert rc == 2 and "is for autoprog pretrain / autoprog compare, not for pretrain --task diffusion" in \
        _one_error_line(err)
    cfg.write_text("description: mine\noptions: [1]\n")
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--config", cfg)
    assert rc == 2 and "options must be a mapping" in _one_error_line(err)


def test_an_interrupted_comparison_says_to_run_it_again_and_its_folder_is_not_resumed(cli, fake_fmnist, tmp_path):
    """A Ctrl-C inside a comparison's run: the way on is the same compare command (its finished runs reused, the
    stopped one resumed), not --resume of one run; --resume of the comparison's folder says so."""
    from conftest import ctrl_c_at_step

    out = tmp_path / "cmp"
    with ctrl_c_at_step(3):
        rc, _, err = cli("compare", "--methods", "original,prog", "--front", "1", "--no-budget-baseline", "--out",
                         out, *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 130 and "run the same compare command again to continue" in err and "--resume" not in err, err
    rc, _, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 2 and "that is a comparison's folder (runs original); run the same compare command again" in \
        _one_error_line(err)


@pytest.mark.parametrize("argv, says", [
    (["finetune", "--task", "classification", "--method", "lora", "--out", "x"],
     "(see 'autoprog finetune --task classification --help')"),
    (["pretrain", "--schedule", "16x4", "20x5", "--out", "x"], "unrecognized arguments: 20x5 (see 'autoprog pretrain "
                                                               "--help')"),
    (["sample", "x", "--cpux"], "(see 'autoprog sample --help')"),
    (["finetune", "--base", "SHIPPED_VIT", "--out", "x"], "it is an image classifier: fine-tune it with 'autoprog "
                                                          "finetune --task classification --base"),
])
def test_a_mistake_points_to_the_help_it_was_made_against(cli, argv, says):
    from autoprog.classification.runner import SHIPPED_VIT

    rc, _, err = cli(*[str(SHIPPED_VIT) if a == "SHIPPED_VIT" else a for a in argv])
    assert rc == 2 and says in _one_error_line(err)


def test_missing_config_file(cli, tmp_path):
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--config", tmp_path / "nope.yaml")
    assert rc == 2
    _one_error_line(err)


def test_compare_unknown_method(cli, tmp_path, fake_fmnist):
    rc, _, err = cli("compare", "--out", tmp_path / "cmp", "--methods", "prog,bogus", *tiny_args(fake_fmnist))
    assert rc == 2
    assert "bogus" in _one_error_line(err)


def test_no_command_prints_help(cli):
    rc, out, _ = cli()
    assert rc == 2 and "pretrain" in out and "compare" in out


@pytest.mark.parametrize("yaml_line, needle", [
    ("mixed_precision: fp32", "mixed-precision"),  # not one of the choices
    ("model: 5", "model"),
    ("lr: null", "lr"),
    ("epochs: [1, 2]", "epochs"),
    ("batch_size: zero", "batch-size"),
    ("no_flops: 3", "no_flops"),
])
def test_config_values_are_validated_like_options(cli, tmp_path, fake_fmnist, yaml_line, needle):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_line + "\n")
    args = [a for a in tiny_args(fake_fmnist) if a != "--no-flops"]
    args = args[:args.index("--epochs")] + args[args.index("--epochs") + 2:]  # the file's epochs, if any
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", "--config", cfg, *args)
    assert rc == 2
    assert needle in _one_error_line(err)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_schedule_json_records_the_growth_operator_used(cli, fake_fmnist, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--growth", "identity", "--out", out,
                     *tiny_args(fake_fmnist, epochs="1", subset="128"))
    assert rc == 0, err
    assert json.loads((out / "schedule.json").read_text())["growth"] == "identity"


def test_a_finished_run_ends_on_the_full_model(cli, fake_fmnist, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", out, *tiny_args(fake_fmnist, epochs="1", subset="64"))
    assert rc == 0, err
    res = _results(out)
    assert res["done"] and res["summary"]["steps"] == 2
    assert (res["epochs"][-1]["resolution"], res["epochs"][-1]["depth"]) == (28, 4)


# ----------------------------------------------------------------------------------- pretrain
def test_pretrain_writes_results_schedule_and_checkpoint(prog_run):
    res = _results(prog_run)
    assert res["done"] is True
    epochs = res["epochs"]
    assert len(epochs) == 2
    for e in epochs:
        assert EPOCH_KEYS <= e.keys()
        assert 0.0 <= e["top1"] <= 100.0 and 0.0 <= e["top1_ema"] <= 100.0
        assert e["train_loss"] > 0 and e["lr"] > 0
    # 16 steps, stages start at steps 0, 4, 8, 12: epoch 1 ends in stage 2, epoch 2 in stage 4
    assert [(e["stage"], e["resolution"], e["depth"]) for e in epochs] == [(2, 20, 3), (4, 28, 4)]
    assert [e["step"] for e in epochs] == [8, 16]
    assert epochs[1]["train_time_s"] >= epochs[0]["train_time_s"] > 0
    assert epochs[1]["eval_samples"] == 100, "the last epoch evaluates on the whole test set"
    assert epochs[0]["eval_samples"] == 64

    stages = res["stages"]
    assert [s["step"] for s in stages] == [0, 4, 8, 12]
    assert [(s["subnet"]["resolution"], s["subnet"]["depth"]) for s in stages] == PROG_STAGES
    assert stages[0]["growth"] is None
    assert all(s["growth"]["operator"] == "mogrow" for s in stages[1:])
    assert stages[1]["growth"]["block_map"] == {"0": 0, "1": 1, "2": 1}  # interpolation 2 → 3

    s = res["summary"]
    assert SUMMARY_KEYS <= s.keys()
    assert s["steps"] == s["total_steps"] == 16 and s["epochs"] == 2
    assert s["top1"] == epochs[-1]["top1"] and s["method"] == "prog" and s["growth"] == "mogrow"
    assert res["config"]["batch_size"] == 32 and res["config"]["count_flops"] is False

    sched = json.loads((prog_run / "schedule.json").read_text())
    assert [(st["resolution"], st["depth"]) for st in sched["stages"]] == PROG_STAGES
    assert [st["fraction"] for st in sched["stages"]] == pytest.approx([0.25] * 4)
    assert sched["growth"] == "mogrow"

    ck = prog_run / "checkpoint"
    assert CHECKPOINT_FILES <= {p.name for p in ck.iterdir()}
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 16
    assert state["subnet"] == {"resolution": 28, "depth": 4}
    model = load_file(ck / "model.safetensors")
    ema = load_file(ck / "ema.safetensors")
    assert model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)
    assert sum(k.startswith("model.blocks.") and k.endswith(".attn.qkv.weight") for k in model) == 4
    opt = load_file(ck / "optimizer.safetensors")
    assert any(k.endswith("::exp_avg") for k in opt)
    cfg = json.loads((prog_run / "config.json").read_text())
    assert cfg["method"] == "prog" and cfg["depth"] == 4 and cfg["subset"] == 256


def test_every_parameter_was_trained(prog_run):
    """Rebuild the run's initial model (same seed) and check training moved every weight, including the
    blocks that only became active (and were grown into) late in the run."""
    from autoprog.classification.runner import RunSpec, build_run

    spec = RunSpec.from_dict(json.loads((prog_run / "config.json").read_text()))
    torch.manual_seed(spec.train.seed)
    _, net, _, _ = build_run(spec)
    init = net.state_dict()
    final = load_file(prog_run / "checkpoint" / "model.safetensors")
    assert init.keys() == final.keys()
    untouched = [k for k in init if torch.equal(init[k], final[k])]
    assert untouched == []


def test_checkpoint_loads_into_a_fresh_model(prog_run):
    from conftest import tiny_vit

    net = tiny_vit()
    net.load_state_dict(load_file(prog_run / "checkpoint" / "model.safetensors"))
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_fixed_replays_the_schedule(prog_run, cli, fake_fmnist, tmp_path):
    out = tmp_path / "fixed"
    a, b = replay_fixed(cli, prog_run, out, *tiny_args(fake_fmnist))
    strip = [{k: s[k] for k in ("stage", "step", "subnet", "growth")} for s in a["stages"]]
    assert [{k: s[k] for k in ("stage", "step", "subnet", "growth")} for s in b["stages"]] == strip
    key = [(e["stage"], e["resolution"], e["depth"], e["step"]) for e in a["epochs"]]
    assert [(e["stage"], e["resolution"], e["depth"], e["step"]) for e in b["epochs"]] == key
    assert b["summary"]["schedule"]["stages"] == a["summary"]["schedule"]["stages"]
    # same seed, data, stages and growth operator: the replay trains the same network
    wa = load_file(prog_run / "checkpoint" / "model.safetensors")
    wb = load_file(out / "checkpoint" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)


def test_growth_option_overrides_the_schedule_default(cli, fake_fmnist, tmp_path):
    out = tmp_path / "ps"
    rc, _, err = cli("pretrain", "--method", "progstack", "--growth", "identity", "--out", out,
                     *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    res = _results(out)
    assert res["summary"]["growth"] == "identity"
    # progstack on 4 blocks: 1 → 2 → 4 blocks at full resolution, steps 1:2:5 of 8
    assert [(s["step"], s["subnet"]["resolution"], s["subnet"]["depth"]) for s in res["stages"]] == [
        (0, 28, 1), (1, 28, 2), (3, 28, 4)]
    # identity = interpolation + zero gates on the inserted copies: 1 → 2 gates block 1; 2 → 4 maps
    # [0, 0, 1, 1], gating the new copies 1 and 3, while block 2 inherits old block 1's (trained) gate
    assert res["stages"][1]["growth"]["gated"] == [1]
    assert res["stages"][2]["growth"]["gated"] == [1, 3]
    assert res["stages"][2]["growth"]["block_map"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["gated_blocks"] == [1, 2, 3]
    gates = {k: v for k, v in load_file(out / "checkpoint" / "model.safetensors").items() if k.endswith(".gate")}
    assert sorted(gates) == sorted(f"model.blocks.{i}.{ls}.gate" for i in (1, 2, 3) for ls in ("ls1", "ls2"))
    assert any(float(v) != 0.0 for v in gates.values()), "the gates are learned"



def test_pretrain_on_an_image_folder(cli, image_folder, tmp_path):
    out = tmp_path / "if"
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", out, "--subset", "0", "--batch-size", "4",
                     "--epochs", "2", "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size", "4",
                     "--no-flops", "--cpu")
    assert rc == 0, err
    res = _results(out)
    assert res["done"] and res["summary"]["steps"] == 4  # 10 images, batches of 4, last one dropped
    # 32 px RGB images, patch 4 (8 patches/side: 4, 5.33, 6.67, 8): prog grows 16 → 20 → 28 → 32 px
    assert [(s["subnet"]["resolution"], s["subnet"]["depth"]) for s in res["stages"]] == [
        (16, 2), (20, 3), (28, 3), (32, 4)]
    assert res["epochs"][-1]["eval_samples"] == 4
    w = load_file(out / "checkpoint" / "model.safetensors")
    assert w["model.patch_embed.proj.weight"].shape[1] == 3 and w["model.head.weight"].shape[0] == 2


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_mid_run_is_one_line_naming_it(cli, image_folder, tmp_path, workers):
    bad = image_folder / "train" / "square" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", tmp_path / "if", "--subset", "0",
                     "--batch-size", "4", "--epochs", "2", "--embed-dim", "16", "--depth", "4", "--num-heads", "2",
                     "--patch-size", "4", "--no-flops", "--cpu", "--workers", workers)
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("autoprog:")]
    assert len(lines) == 1 and f"cannot read image {bad}" in lines[0], err


def test_more_stages_than_sub_networks_warns(cli, fake_fmnist, tmp_path):
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "r", "--num-stages", "12",
                     *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    assert "warning: --num-stages 12: the growth space has 6 distinct sub-networks" in err, err
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "r4", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0 and "warning" not in err, err


def test_builtin_default_patch_leaves_a_7x7_grid_of_the_image(cli, image_folder, tmp_path):
    out = tmp_path / "grid"
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", out, "--subset", "0", "--batch-size", "4",
                     "--epochs", "1", "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--no-flops", "--cpu")
    assert rc == 0, err
    w = load_file(out / "checkpoint" / "model.safetensors")
    assert w["model.patch_embed.proj.weight"].shape[-2:] == (4, 4)  # 32 px ImageFolder images → 4 px patches, 8x8


# ------------------------------------------------------------------------------------- resume
def test_stop_and_resume_gives_the_same_weights(prog_run, cli, fake_fmnist, tmp_path):
    out = tmp_path / "b"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", out, "--stop-after-epochs", "1", *tiny_args(fake_fmnist))
    assert rc == 0, err
    part = _results(out)
    assert part["done"] is False and len(part["epochs"]) == 1
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 8

    rc, _, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 0, err
    res, ref = _results(out), _results(prog_run)
    assert res["done"] is True and len(res["epochs"]) == 2
    assert [e["step"] for e in res["epochs"]] == [8, 16]
    assert [s["step"] for s in res["stages"]] == [s["step"] for s in ref["stages"]]
    for e, r in zip(res["epochs"], ref["epochs"]):
        assert (e["stage"], e["resolution"], e["depth"]) == (r["stage"], r["resolution"], r["depth"])
        assert e["train_loss"] == pytest.approx(r["train_loss"], abs=1e-4)
        assert e["lr"] == pytest.approx(r["lr"], rel=1e-6)
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(prog_run / "checkpoint" / name)
        wb = load_file(out / "checkpoint" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=f"{name}: {k}")


def test_a_resumed_run_may_stop_again_and_says_done_at_its_end(cli, fake_fmnist, tmp_path):
    """A run continued in parts: --resume with --stop-after-epochs stops again (at that many epochs of the whole
    run) and says how to go on; the last --resume prints the run's done line, as a run that never stopped."""
    out = tmp_path / "r"
    args = tiny_args(fake_fmnist, epochs="3")
    assert cli("pretrain", "--method", "prog", "--out", out, "--stop-after-epochs", "1", *args)[0] == 0
    rc, stdout, err = cli("pretrain", "--resume", out, "--stop-after-epochs", "2", "--cpu")
    assert rc == 0, err
    assert f"stopped early as asked; continue with `autoprog pretrain --resume {out}`" in stdout
    assert len(_results(out)["epochs"]) == 2
    rc, stdout, err = cli("pretrain", "--resume", out, "--stop-after-epochs", "1", "--cpu")  # already past it
    assert rc == 0 and "stopped early as asked" in stdout and len(_results(out)["epochs"]) == 2, err
    rc, stdout, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 0, err
    assert _results(out)["done"] and "done: top-1" in stdout and f"model in {out}/model" in stdout


def test_stop_and_resume_with_rezero_gates(cli, fake_fmnist, tmp_path):
    """identity growth adds gate parameters (and their AdamW moments) that the checkpoint must restore."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "prog", "--growth", "identity", *tiny_args(fake_fmnist)]
    assert cli("pretrain", "--out", a, *args)[0] == 0
    assert cli("pretrain", "--out", b, "--stop-after-epochs", "1", *args)[0] == 0
    state = json.loads((b / "checkpoint" / "state.json").read_text())
    assert state["gated_blocks"] == [2], "2 → 3 blocks at step 4 gates the inserted copy"
    rc, _, err = cli("pretrain", "--resume", b, "--cpu")
    assert rc == 0, err
    assert _results(b)["done"] is True
    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() and sum(k.endswith(".gate") for k in wa) == 4
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


def test_resume_runs_to_the_end(cli, fake_fmnist, tmp_path):
    out = tmp_path / "r"
    rc, _, err = cli("pretrain", "--out", out, "--stop-after-epochs", "1", *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 0, err
    assert len(_results(out)["epochs"]) == 1
    rc, _, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 0, err
    res = _results(out)
    assert len(res["epochs"]) == 3 and res["done"] is True


def test_pretrain_into_an_existing_run_needs_resume(prog_run, cli, fake_fmnist):
    before = (prog_run / "results.json").read_text()
    rc, _, err = cli("pretrain", "--method", "prog", "--out", prog_run, *tiny_args(fake_fmnist))
    assert rc == 2
    assert "--resume" in _one_error_line(err)
    assert (prog_run / "results.json").read_text() == before


def test_resume_a_finished_run_changes_nothing(prog_run, cli, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prog_run, copy)
    before = load_file(copy / "checkpoint" / "model.safetensors")
    rc, _, err = cli("pretrain", "--resume", copy, "--cpu")
    assert rc == 0, err
    after = load_file(copy / "checkpoint" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _results(copy)["done"] is True and len(_results(copy)["epochs"]) == 2


# ------------------------------------------------------------------------------------ compare
def test_compare_writes_summary_and_reuses_runs(cli, fake_fmnist, tmp_path):
    out = tmp_path / "cmp"
    # FLOPs are counted here (no --no-flops) so the FLOPs speed-up is meaningful
    args = [a for a in tiny_args(fake_fmnist) if a != "--no-flops"]
    rc, _, err = cli("compare", "--methods", "prog", "--out", out, "--no-budget-baseline", "--front", "1", *args)
    assert rc == 0, err
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["original", "prog"]
    mtimes = {m: (out / m / "results.json").stat().st_mtime_ns for m in ("original", "prog")}

    rc, _, err = cli("compare", "--methods", "prog", "--out", out, "--front", "0.5,0.25,1", *args)
    assert rc == 0, err
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["original", "prog", "original@budget", "original@0.25", "original@0.5"]
    for r in rows:
        assert ROW_KEYS <= r.keys()
        assert r["wall_time_s"] > 0 and r["top1"] is not None and r["top1_ema"] is not None
        assert r["tq_speedup"] > 0 and r["tq_bound"] in "=<>"
        assert r["front"] == r["method"].startswith("original")
    # the front's runs: the original cut to 4 and 8 of its 16 steps, each with its learning rate decayed by then
    for name, steps in (("original@0.25", 4), ("original@0.5", 8)):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["method"] == "original" and cfg["train"]["max_steps"] == steps
        assert _results(out / name)["epochs"][-1]["lr"] == pytest.approx(cfg["train"]["min_lr"], rel=0.05)
    by = {r["method"]: r for r in rows}
    assert by["original"]["speedup"] == pytest.approx(1.0) and by["original"]["flops_speedup"] == pytest.approx(1.0)
    assert by["prog"]["flops_speedup"] > 1.2, "prog trains smaller sub-networks for 3/4 of the steps"
    assert by["original@budget"]["budget_of"] == "prog"
    assert by["original"]["budget_of"] is None and by["prog"]["budget_of"] is None
    # at least one epoch (8 steps); beyond that it follows prog's wall-clock, which is noise at this size
    assert by["original@budget"]["steps"] >= 8
    assert by["prog"]["schedule"]["stages"][0] == {"resolution": 16, "depth": 2, "fraction": 0.25}
    budget_cfg = json.loads((out / "original@budget" / "config.json").read_text())
    assert budget_cfg["method"] == "original" and budget_cfg["train"]["max_steps"] == by["original@budget"]["steps"]
    # finished runs were reused, not trained again
    assert {m: (out / m / "results.json").stat().st_mtime_ns for m in mtimes} == mtimes
    # a budget run made for another step count (the other rows changed since) is trained again
    budget_cfg["train"]["max_steps"] += 1
    (out / "original@budget" / "config.json").write_text(json.dumps(budget_cfg))
    rc, stdout, err = cli("compare", "--methods", "prog", "--out", out, "--front", "0.5,0.25,1", *args)
    assert rc == 0, err
    assert "training it again" in stdout
    again = json.loads((out / "original@budget" / "config.json").read_text())
    assert again["train"]["max_steps"] == by["original@budget"]["steps"]

    md = (out / "summary.md").read_text()
    assert "| original |" in md and "| prog |" in md and "budget of prog" in md and "time-to-quality" in md
    last = md.rstrip().splitlines()[-1]  # the printed reading, kept with the table
    assert last.startswith("reading: ") and last in stdout
    for png in ("curves.png", "front.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_directory_with_other_settings(cli, fake_fmnist, tmp_path):
    out = tmp_path / "cmp"
    rc, _, err = cli("compare", "--methods", "original", "--out", out, "--no-budget-baseline", "--front", "1",
                     *tiny_args(fake_fmnist, epochs="1", subset="64"))
    assert rc == 0, err
    assert [r["method"] for r in json.loads((out / "summary.json").read_text())] == ["original"]
    rc, _, err = cli("compare", "--methods", "original", "--out", out, "--no-budget-baseline", "--front", "1",
                     "--seed", "1",
                     *tiny_args(fake_fmnist, epochs="1", subset="64"))
    assert rc == 2
    assert "different settings" in _one_error_line(err) and "train.seed: 0 there, 1 now" in err


def test_compare_reuses_runs_whose_method_does_not_read_the_changed_setting(cli, fake_fmnist, tmp_path):
    out, args = tmp_path / "cmp", tiny_args(fake_fmnist, epochs="4", subset="64")
    rc, _, err = cli("compare", "--methods", "original,autoprog-one", "--out", out, "--no-budget-baseline",
                     "--front", "1", *args)
    assert rc == 0, err
    rc, stdout, err = cli("compare", "--methods", "original,autoprog-one", "--out", out, "--no-budget-baseline",
                          "--front", "1", "--search-fraction", "0.5", *args)
    assert rc == 2 and "different settings" in _one_error_line(err) and "search_fraction: 0.08 there, 0.5 now" in err
    assert "original: reusing finished run" in stdout, "the original reads no search setting"
    shared = tmp_path / "shared.yaml"  # a config shared by several commands may set what a method does not read
    shared.write_text("search_fraction: 0.5\ncriterion: gain\n")
    rc, stdout, err = cli("compare", "--methods", "original", "--out", out, "--no-budget-baseline",
                          "--front", "1", "--config", shared, *args)
    assert rc == 0 and "original: reusing finished run" in stdout, err
    rc, _, err = cli("compare", "--methods", "original", "--out", out, "--no-budget-baseline",
                     "--front", "1", "--search-fraction", "0.5", *args)  # typed for no method that reads it
    assert rc == 2 and "--search-fraction is read only by autoprog-one" in _one_error_line(err)


# ------------------------------------------------------------------------------------- --config
def test_config_values_are_used_and_flags_override_them(cli, fake_fmnist, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data_root: {fake_fmnist}\n"
        "method: original\n"
        "subset: 64\n"
        "batch-size: 32\n"  # dashes work too
        "epochs: 1\n"
        "embed_dim: 16\n"
        "num_heads: 2\n"
        "depth: 2\n"
        "eval_samples: 32\n"
        "no_flops: true\n"
        "seed: 5\n"
        "lr: 0.002\n"
    )
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--config", cfg, "--out", out, "--lr", "0.003", "--depth", "3", "--cpu")
    assert rc == 0, err
    spec = json.loads((out / "config.json").read_text())
    assert spec["method"] == "original" and spec["subset"] == 64 and spec["embed_dim"] == 16
    assert spec["data_root"] == str(fake_fmnist)
    assert spec["train"]["batch_size"] == 32 and spec["train"]["epochs"] == 1 and spec["train"]["seed"] == 5
    assert spec["train"]["eval_samples"] == 32 and spec["train"]["count_flops"] is False
    assert spec["train"]["lr"] == pytest.approx(0.003), "the command line wins over the file"
    assert spec["depth"] == 3
    res = _results(out)
    assert res["summary"]["steps"] == 2 and res["epochs"][0]["depth"] == 3
    assert len(load_file(out / "checkpoint" / "model.safetensors")) > 0
    assert os.path.isfile(out / "schedule.json")


def test_eval_size_reports_top1_at_a_larger_test_resolution(cli, fake_fmnist, tmp_path, monkeypatch):
    import autoprog.adapters.vit as vit_adapter

    seen, resize = set(), vit_adapter.resize_input
    monkeypatch.setattr(vit_adapter, "resize_input", lambda x, r: seen.add(r) or resize(x, r))
    out = tmp_path / "r"
    rc, stdout, err = cli("pretrain", "--method", "prog", "--eval-size", "36", "--out", out,
                          *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    s = _results(out)["summary"]
    assert s["eval_size"] == 36 and 0 <= s["top1_at_eval_size"] <= 100 and 0 <= s["top1_ema_at_eval_size"] <= 100
    assert "top1 at 36px" in stdout and 36 in seen, "the model ran at the evaluation size"
    rc, _, err = cli("pretrain", "--eval-size", "30", "--out", tmp_path / "bad", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 2 and "not a multiple of the patch size 4" in _one_error_line(err)


def test_a_subset_larger_than_the_dataset_is_said_and_the_images_used_are_recorded(cli, fake_fmnist, tmp_path):
    from conftest import FAKE_TRAIN

    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "r",
                     *tiny_args(fake_fmnist, epochs="1", subset="100000"))
    assert rc == 0, err
    assert f"--subset 100000: fashion-mnist has {FAKE_TRAIN} training images, and all of them are used" in err
    summary = json.loads((tmp_path / "r" / "results.json").read_text())["summary"]
    assert summary["train_images"] == FAKE_TRAIN


def test_task_given_twice_is_the_last_as_every_option(cli):
    from autoprog.cli import _parse, build_parser, task_of

    argv = ["finetune", "--task", "dreambooth", "--task=text-to-image", "--out", "x"]
    assert task_of(argv) == "text-to-image"
    assert _parse(build_parser(task_of(argv)), argv).task == "text-to-image"
    rc, out, _ = cli("finetune", "--task", "dreambooth", "--task", "text-to-image", "--help")
    assert rc == 0 and "--caption" in out and "--instance-dir" not in out


def test_a_comparison_never_reuses_a_run_trained_on_other_data(cli, image_folder, tmp_path):
    """A comparison run again after images were added to its folder: a finished run on the old data is refused by
    name instead of reused beside new runs in one table; on the same data it is reused."""
    from PIL import Image

    args = ["compare", "--methods", "original", "--front", "1", "--no-budget-baseline", "--dataset", image_folder,
            "--batch-size", "2", "--epochs", "1", "--embed-dim", "16", "--depth", "2", "--num-heads", "2",
            "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu", "--out", tmp_path / "c"]
    assert cli(*args)[0] == 0
    rc, stdout, err = cli(*args)
    assert rc == 0 and "original: reusing finished run" in stdout, err
    assert json.loads((tmp_path / "c" / "original" / "results.json").read_text())["summary"]["processes"] == 1
    state_file = tmp_path / "c" / "original" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "processes": 2}))  # as torchrun --nproc_per_node 2 records it
    rc, _, err = cli(*args)
    assert rc == 2 and "holds an original run trained by 2 processes and this launch has 1 (another global batch)" \
        in err and err.strip().count("\n") == 0, err
    state_file.write_text(json.dumps(state))
    Image.new("RGB", (24, 24)).save(image_folder / "train" / "circle" / "new.png")
    rc, _, err = cli(*args)
    assert rc == 2 and "holds an original run on other training data (10 images then, 11 now)" in err


def test_the_python_api_stops_new_runs_and_refuses_a_changed_spec_on_resume(fake_fmnist, tmp_path):
    """pretrain(spec, out, stop_after=1) stops a new run too (it was read on a resume only); resume=True with a
    spec of other settings is refused (it was silently replaced by the saved one), with the same spec it goes on."""
    from dataclasses import replace

    from autoprog.classification.runner import RunSpec, pretrain
    from autoprog.classification.trainer import TrainConfig
    from autoprog.errors import ConfigError

    spec = RunSpec(method="prog", data_root=str(fake_fmnist), subset=256, embed_dim=16, depth=4, num_heads=2,
                   patch_size=4, train=TrainConfig(epochs=2, batch_size=32, eval_samples=64, count_flops=False))
    res = pretrain(spec, tmp_path / "r", stop_after=1)
    assert not res["done"] and len(res["epochs"]) == 1
    with pytest.raises(ConfigError, match="the spec given differs"):
        pretrain(replace(spec, train=replace(spec.train, epochs=3)), tmp_path / "r", resume=True)
    assert pretrain(spec, tmp_path / "r", resume=True)["done"]


def test_a_comparison_never_writes_into_a_runs_folder_or_a_folder_of_other_files(cli, fake_fmnist, tmp_path):
    """As --out of pretrain refuses them: a folder of the user's files, or a run's folder (a comparison's own
    folder, with its summaries and run folders, is reused as ever)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    for out, message in ((notes, "holds files that are not a comparison's (notes.txt)"),
                         (run, "holds a run, not a comparison")):
        rc, _, err = cli("compare", "--methods", "prog", "--out", out, *tiny_args(fake_fmnist))
        assert rc == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"]


def test_a_warm_up_set_over_half_the_run_warns_that_it_is_cut(cli, fake_fmnist, tmp_path):
    """The schedule warms up over at most half the run: --warmup-epochs set longer is said, not cut silently;
    the default's cut in a one-epoch run is what its help says."""
    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "a",
                     *tiny_args(fake_fmnist, "--warmup-epochs", "1.5", epochs="2"))
    assert rc == 0 and "warning: --warmup-epochs 1.5 is over half the run (2 epochs): the learning rate warms up " \
        "over its first half" in err, err
    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "b", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0 and "warning" not in err, err


def test_each_fine_tuning_task_compares_into_its_own_default_folder():
    """compare --task text-to-image and --task dreambooth both wrote runs/finetune, so the README's commands run
    one after the other collided (refused as "different settings")."""
    from autoprog.cli import _parse, build_parser, task_of

    outs = {}
    for task in ("finetune", "text-to-image", "dreambooth"):
        argv = ["compare", "--task", task]
        outs[task] = _parse(build_parser(task_of(argv)), argv).out
    assert outs == {"finetune": "runs/finetune", "text-to-image": "runs/text-to-image", "dreambooth": "runs/dreambooth"}


def test_a_two_step_run_prints_no_scheduler_noise(cli, fake_fmnist, tmp_path, caplog):
    """timm warned, once per process, that a one-step cosine "will have no effect" on a run of two steps."""
    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "r",
                     *tiny_args(fake_fmnist, epochs="0.25"))
    assert rc == 0, err
    assert not [r for r in caplog.records if "Cosine annealing" in r.getMessage()]


def test_the_task_flags_help_points_to_every_tasks_options(cli):
    """It named only the last task (``--task classification``), so text-to-image's and DreamBooth's options looked
    absent from ``autoprog finetune --help``."""
    rc, out, _ = cli("finetune", "--help")
    assert rc == 0 and "see 'autoprog finetune --task TASK --help'" in " ".join(out.split())
