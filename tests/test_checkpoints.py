"""Nothing lost: the previous checkpoint is kept as a fallback, damaged checkpoints are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ctrl_c_at_step, tiny_args
from safetensors.torch import load_file, save_file

from autoprog.checkpoint import has_checkpoint, read_checkpoint


def _weights(run):
    return load_file(run / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(fake_fmnist, tmp_path_factory):
    """An uninterrupted 3-epoch prog run, and the same run stopped after 2 epochs."""
    from autoprog.cli import main

    root = tmp_path_factory.mktemp("ck")
    args = ["pretrain", "--method", "prog", *tiny_args(fake_fmnist, epochs="3")]
    assert main([*args, "--out", str(root / "full")]) == 0
    assert main([*args, "--out", str(root / "stopped"), "--stop-after-epochs", "2"]) == 0
    return root


def _copy(runs, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(runs / "stopped", dst)
    return dst


def test_the_previous_checkpoint_is_kept(runs):
    new = json.loads((runs / "stopped" / "checkpoint" / "state.json").read_text())
    prev = json.loads((runs / "stopped" / "checkpoint.prev" / "state.json").read_text())
    assert (new["epoch"], prev["epoch"]) == (2, 1)


@pytest.mark.parametrize("damage", ["truncate-model", "garbage-state", "nan-weights", "no-optimizer", "no-rng",
                                    "no-ema", "tensor-missing", "tensor-reshaped", "moment-missing",
                                    "moment-reshaped"])
def test_a_damaged_newest_checkpoint_falls_back_and_ends_identical(runs, cli, tmp_path, damage):
    run = _copy(runs, tmp_path)
    ck = run / "checkpoint"
    if damage == "truncate-model":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage-state":
        (ck / "state.json").write_text("{not json")
    elif damage == "nan-weights":
        w = load_file(ck / "model.safetensors")
        w[next(iter(w))] = torch.full_like(w[next(iter(w))], float("nan"))
        save_file(w, ck / "model.safetensors")
    elif damage == "no-optimizer":
        (ck / "optimizer.safetensors").unlink()
    elif damage == "no-ema":
        (ck / "ema.safetensors").unlink()
    elif damage in ("tensor-missing", "tensor-reshaped"):  # files that read but do not fit the model
        w = load_file(ck / "model.safetensors")
        name = "model.blocks.0.attn.proj.bias"
        if damage == "tensor-missing":
            del w[name]
        else:
            w[name] = torch.zeros(3, 3)
        save_file(w, ck / "model.safetensors")
    elif damage in ("moment-missing", "moment-reshaped"):
        opt = load_file(ck / "optimizer.safetensors")
        name = next(k for k in opt if k.endswith("::exp_avg"))
        if damage == "moment-missing":
            del opt[name]
        else:
            opt[name] = torch.zeros(3, 3)
        save_file(opt, ck / "optimizer.safetensors")
    else:
        opt = load_file(ck / "optimizer.safetensors")
        del opt["__rng__"]
        save_file(opt, ck / "optimizer.safetensors")
    rc, out, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    assert "previous checkpoint" in out + err
    want = _weights(runs / "full")
    got = _weights(run)
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed from epoch 1, it must end where the full run did"


def test_both_damaged_is_one_line_and_names_the_files(runs, cli, tmp_path):
    run = _copy(runs, tmp_path)
    (run / "checkpoint" / "state.json").write_text("[]")
    (run / "checkpoint.prev" / "model.safetensors").write_bytes(b"\x00" * 10)
    rc, _, err = cli("pretrain", "--resume", run)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "no usable checkpoint" in lines[0] and "state.json" in lines[0] and "model.safetensors" in lines[0]


def test_a_checkpoint_of_another_process_count_is_one_line(runs, cli, tmp_path):
    """Under torchrun the global batch, and so the steps, follow from the process count: a run resumed by another
    count is refused naming both (a checkpoint records its count)."""
    run = _copy(runs, tmp_path)
    for ck in ("checkpoint", "checkpoint.prev"):
        state = json.loads((run / ck / "state.json").read_text())
        assert state["processes"] == 1
        (run / ck / "state.json").write_text(json.dumps({**state, "processes": 2}))
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert "this run was trained by 2 processes and this launch has 1: resume it with 2" in err


def test_a_crash_between_the_renames_loses_nothing(runs, cli, tmp_path, fake_fmnist):
    run = _copy(runs, tmp_path)
    shutil.rmtree(run / "checkpoint.prev")
    (run / "checkpoint").rename(run / "checkpoint.prev")  # the newest moved aside, the new one not yet in place
    assert has_checkpoint(run)
    rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 2 and "--resume" in err, "a fresh start must not overwrite the surviving checkpoint"
    state, *_ = read_checkpoint(run, json.loads((run / "checkpoint.prev" / "state.json").read_text())["total_steps"],
                                "cpu", log=lambda s: None)
    assert state["epoch"] == 2
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    want, got = _weights(runs / "full"), _weights(run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_crash_in_the_final_evaluation_keeps_the_training(runs, cli, fake_fmnist, tmp_path, monkeypatch):
    from autoprog.classification.trainer import Trainer

    evaluate = Trainer.evaluate

    def crash_on_the_final(self, full=False):
        if full:
            raise KeyboardInterrupt
        return evaluate(self, full)

    monkeypatch.setattr(Trainer, "evaluate", crash_on_the_final)
    run = tmp_path / "run"
    rc, _, _ = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 130
    assert json.loads((run / "checkpoint" / "state.json").read_text())["pending_point"]["epoch"] == 3
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    want = json.loads((runs / "full" / "results.json").read_text())
    got = json.loads((run / "results.json").read_text())
    assert got["done"] and [e["epoch"] for e in got["epochs"]] == [1, 2, 3]
    assert got["summary"]["top1"] == want["summary"]["top1"], "only the evaluation was left, and it is the same"
    assert all(torch.equal(_weights(run)[k], v) for k, v in _weights(runs / "full").items())


def test_sigterm_stops_cleanly_and_keeps_the_checkpoint(fake_fmnist, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "autoprog.cli", "pretrain", "--method", "prog", "--out", str(run),
                             *tiny_args(fake_fmnist, epochs="50")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint" / "state.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert has_checkpoint(run)


def test_sigterm_to_the_process_group_with_loader_workers_stops_at_the_step(image_folder, tmp_path):
    """``scancel`` and ``timeout`` signal the whole process group: the ImageFolder loader's workers ignore it, so
    the trainer stops at its step (130) instead of dying of a killed worker (1, from the last checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "autoprog.cli", "pretrain", "--method", "prog", "--out", str(run),
                             "--dataset", str(image_folder), "--subset", "0", "--batch-size", "4", "--epochs", "400",
                             "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size", "4",
                             "--no-flops", "--cpu", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoint" / "state.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err and "killed by signal" not in err
    assert has_checkpoint(run)


@pytest.mark.parametrize("at", [5, 13, 24])
def test_ctrl_c_mid_epoch_checkpoints_that_step_and_resumes_identical(runs, cli, fake_fmnist, tmp_path, at):
    """Ctrl-C during step ``at`` (8 steps an epoch): that step is finished and checkpointed with the epoch's
    position and random states; the resumed run ends bit-identical to the uninterrupted one."""


    run = tmp_path / "run"
    with ctrl_c_at_step(at - 1):
        rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="3"))
        assert rc == 130 and f"interrupted at step {at}" in err, err
        state = json.loads((run / "checkpoint" / "state.json").read_text())
        assert state["step"] == at and state["in_segment"]["start_step"] == (at - 1) // 8 * 8
    rc, _, err = cli("pretrain", "--resume", run, "--cpu")
    assert rc == 0, err
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, runs / "full"))
    assert [e["train_loss"] for e in got["epochs"]] == [e["train_loss"] for e in want["epochs"]]
    assert got["summary"]["top1"] == want["summary"]["top1"]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(r / "checkpoint" / name) for r in (run, runs / "full"))
        assert all(torch.equal(a[k], b[k]) for k in b), name


def _ctrl_c_in_an_evaluation(monkeypatch, when) -> None:
    """Ctrl-C inside the trainer's evaluations for which ``when(full, calls so far)`` holds."""
    import signal

    from autoprog.classification.trainer import Trainer

    evaluate, calls = Trainer.evaluate, []

    def ctrl_c(self, full=False):
        calls.append(full)
        if when(full, len(calls)):
            signal.raise_signal(signal.SIGINT)
        return evaluate(self, full)

    monkeypatch.setattr(Trainer, "evaluate", ctrl_c)


def test_ctrl_c_during_the_final_evaluation_says_the_run_is_complete(cli, fake_fmnist, tmp_path, monkeypatch):
    _ctrl_c_in_an_evaluation(monkeypatch, lambda full, calls: full)
    run = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 130 and "had finished training and is complete" in err, err
    assert json.loads((run / "results.json").read_text())["done"] is True


def test_ctrl_c_during_an_evaluation_stops_at_its_point_and_resumes_identical(runs, cli, fake_fmnist, tmp_path,
                                                                              monkeypatch):
    """A stop asked while an evaluation runs (minutes on a big model) stops at that point, which is checkpointed,
    instead of training one more step first; the resumed run ends as the uninterrupted one."""
    _ctrl_c_in_an_evaluation(monkeypatch, lambda full, calls: calls == 1)
    run = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 130 and "interrupted at step 8" in err, err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 8
    monkeypatch.undo()  # (the evaluation as it is)
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    want, got = _weights(runs / "full"), _weights(run)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_ctrl_c_while_starting_up_is_one_line(cli, monkeypatch):
    import autoprog.cli as cli_module

    def interrupted(task):
        raise KeyboardInterrupt  # Ctrl-C while the command imports torch and the tasks

    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    rc, _, err = cli("pretrain", "--out", "x")
    assert rc == 130 and err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err


def test_an_ignored_signal_stays_ignored():
    import signal

    from autoprog.engine import StopRequest

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a launcher's `cmd &` leaves it
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_signal_stops_at_once_and_handlers_come_back():
    import signal

    from autoprog.engine import StopRequest

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_main_gives_the_callers_sigterm_handler_back(cli):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    rc, _, _ = cli("presets")
    assert rc == 0 and signal.getsignal(signal.SIGTERM) is before


def test_checkpoints_by_elapsed_time_change_no_weight_and_report_their_time(runs, cli, fake_fmnist, tmp_path,
                                                                             monkeypatch):
    """--checkpoint-minutes (here: every step) checkpoints inside epochs; training is the same, and the seconds the
    checkpoints took are reported (outside the training time)."""
    from autoprog import engine

    saved = []
    save = engine.RunTemplate._save_checkpoint
    monkeypatch.setattr(engine.RunTemplate, "_save_checkpoint", lambda self: (saved.append(self.step), save(self)))
    run = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", run, "--checkpoint-minutes", "1e-9",
                     *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 0, err
    assert saved[:4] == [1, 2, 3, 4], "a checkpoint after every step once the time is due"
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, runs / "full"))
    assert got["summary"]["checkpoint_time_s"] > 0
    a, b = (load_file(r / "checkpoint" / "model.safetensors") for r in (run, runs / "full"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_overwrite_removes_the_sample_grids_autoprog_sample_wrote_beside_the_model(tmp_path):
    from autoprog.checkpoint import new_run_dir

    run = tmp_path / "run"
    for d in ("checkpoint", "model", "model-samples"):
        (run / d).mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "model-samples" / "all.png").write_bytes(b"")
    new_run_dir(run, overwrite=True)
    assert not (run / "model-samples").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(cli, fake_fmnist, tmp_path,
                                                                                   monkeypatch):
    """safetensors names a full disk only in its own error's text: it is raised as the OSError it is, the half-written
    checkpoint is removed, and the command says in one line what is kept and how to go on."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def fills_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 3:  # the first checkpoint's three files are written, then the disk is full
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    run = tmp_path / "run"
    rc, _, err = cli("pretrain", "--method", "prog", "--out", run, *tiny_args(fake_fmnist, epochs="3"))
    assert rc == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert f"cannot write {run / 'checkpoint.tmp'}" in err and "No space left on device" in err
    assert f"the last checkpoint in {run} is kept" in err and f"continue with --resume {run}" in err
    assert not (run / "checkpoint.tmp").exists() and has_checkpoint(run)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
