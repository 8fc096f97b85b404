"""Input checked at the door (the rules the README states): the output folder, options a method does not read,
runs of another task, prompt templates, the launcher's environment, and what an interrupt says."""

from __future__ import annotations

import argparse
import json
import shutil
import signal

import pytest
from conftest import tiny_args

from autoprog.engine import RunTemplate
from autoprog.errors import ConfigError

pytestmark = pytest.mark.slow


class WouldTrain(BaseException):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Training replaced by a sentinel: these tests are about what happens before the first step."""
    monkeypatch.setattr(RunTemplate, "fit", lambda self, resume=False: (_ for _ in ()).throw(WouldTrain()))


def _error(cli, *argv) -> str:
    rc, _, err = cli(*argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("autoprog: error:"), (rc, err)
    return lines[0]


def _accepted(cli, *argv) -> None:
    with pytest.raises(WouldTrain):
        cli(*argv)


# ------------------------------------------------------------------------------------------ --out
def test_out_must_not_be_a_model_folder_the_base_or_a_folder_of_other_files(cli, fake_fmnist, tmp_path):
    from autoprog.diffusion.runner import DEFAULT_BASE

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_BASE, model)
    before = (model / "config.json").read_bytes()
    assert "is a model folder" in _error(cli, "pretrain", "--task", "diffusion", "--out", model, "--cpu")
    assert "inside --base" in _error(cli, "finetune", "--base", model, "--out", model / "run", "--cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "holds files that are not a run's (notes.txt)" in _error(cli, "pretrain", "--out", mine,
                                                                    *tiny_args(fake_fmnist))
    assert (model / "config.json").read_bytes() == before and (mine / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_what_the_run_reads(cli, tmp_path):
    from autoprog.diffusion.runner import DEFAULT_BASE

    run = tmp_path / "run"
    shutil.copytree(DEFAULT_BASE, run / "model")
    (run / "results.json").write_text('{"done": true}')
    line = _error(cli, "finetune", "--base", run / "model", "--out", run, "--overwrite", "--cpu")
    assert "lies inside --out" in line and (run / "model" / "config.json").is_file()


def test_a_comparison_never_writes_into_a_model_folder_or_its_base(cli, tmp_path):
    from autoprog.diffusion.runner import DEFAULT_BASE

    assert f"is inside --base {DEFAULT_BASE}" in _error(cli, "compare", "--task", "finetune", "--out", DEFAULT_BASE,
                                                       "--cpu")
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_BASE, model)
    assert "is a model folder" in _error(cli, "compare", "--out", model, "--cpu")


def test_sample_grids_never_land_among_other_files(cli, tmp_path):
    from autoprog.diffusion.runner import DEFAULT_BASE

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "class0.png").write_bytes(b"old grid")  # a grid of an earlier sample run may be replaced
    (mine / "holiday.png").write_bytes(b"mine")
    assert "holds files that are not sample grids (holiday.png)" in _error(cli, "sample", DEFAULT_BASE, "--out", mine)


def test_only_path_settings_are_protected(tmp_path, monkeypatch):
    from autoprog.classification.runner import RunSpec
    from autoprog.experiment import input_paths

    monkeypatch.chdir(tmp_path)
    for name in ("prog", "digits", "vit"):
        (tmp_path / name).mkdir()
    spec = RunSpec(method="prog", dataset="digits", model="vit", schedule=None)
    assert input_paths(spec) == {}, "a method, a built-in dataset's or a model's name is no path"
    assert input_paths(RunSpec(dataset=str(tmp_path / "prog"))) == {"--dataset": str(tmp_path / "prog")}


def test_a_run_folder_is_resumed_or_overwritten_never_silently_reused(cli, fake_fmnist, tmp_path, no_training):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text("{}")
    (out / "config.json").write_text("{}")
    line = _error(cli, "pretrain", "--out", out, *tiny_args(fake_fmnist))
    assert f"--resume {out}" in line and "--overwrite" in line
    _accepted(cli, "pretrain", "--out", out, "--overwrite", *tiny_args(fake_fmnist))
    assert not (out / "checkpoint").exists(), "--overwrite removes the old run's files"
    started = tmp_path / "started"  # a run stopped before its first checkpoint starts again in its folder
    started.mkdir()
    (started / "config.json").write_text("{}")
    _accepted(cli, "pretrain", "--out", started, *tiny_args(fake_fmnist))


# ----------------------------------------------------------------------------- options and methods
def test_a_typed_flag_the_method_does_not_read_is_refused_a_config_may_set_it(cli, fake_fmnist, tmp_path,
                                                                              no_training):
    line = _error(cli, "pretrain", "--method", "prog", "--search-epochs", "2", "--out", tmp_path / "a",
                  *tiny_args(fake_fmnist))
    assert "--search-epochs is read only by autoprog-one" in line and "--method prog does not read it" in line
    assert "--schedule is read only by fixed" in _error(cli, "pretrain", "--method", "original", "--schedule",
                                                        "14x4,28x4", "--out", tmp_path / "b", *tiny_args(fake_fmnist))
    shared = tmp_path / "shared.yaml"
    shared.write_text("search_epochs: 2\n")
    _accepted(cli, "pretrain", "--method", "prog", "--config", shared, "--out", tmp_path / "c", *tiny_args(fake_fmnist))
    _accepted(cli, "pretrain", "--method", "autoprog-one", "--search-ep", "2", "--out", tmp_path / "d",
              *tiny_args(fake_fmnist))  # an abbreviation is the same flag
    assert "names no method" in _error(cli, "compare", "--methods", ",", "--out", tmp_path / "e")
    assert "--growth is read only by" in _error(cli, "pretrain", "--method", "original", "--growth", "identity",
                                                "--out", tmp_path / "f", *tiny_args(fake_fmnist))
    assert "--num-stages is read only by" in _error(cli, "pretrain", "--method", "fixed", "--schedule", "14x4,28x4",
                                                    "--num-stages", "3", "--out", tmp_path / "g",
                                                    *tiny_args(fake_fmnist))
    line = _error(cli, "pretrain", "--method", "autoprog-zero-gain", "--criterion", "paper", "--out", tmp_path / "h",
                  *tiny_args(fake_fmnist))
    assert "--criterion is read only by" in line and "autoprog-zero-gain does not read it" in line
    line = _error(cli, "finetune", "--method", "autoprog-zero-gain", "--criterion", "paper", "--out", tmp_path / "i",
                  "--cpu")
    assert "--criterion is read only by autoprog-zero, autoprog-zero-nosid" in line


def test_resume_of_a_model_folder_says_what_it_is(cli):
    from autoprog.diffusion.runner import DEFAULT_BASE

    assert "that is a model folder" in _error(cli, "finetune", "--resume", DEFAULT_BASE, "--cpu")


def test_resume_of_a_run_of_another_task_names_the_command(cli, tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "finetune", "spec_class": "FinetuneSpec", "spec": {}}))
    line = _error(cli, "pretrain", "--resume", run, "--cpu")
    assert f"continue it with 'autoprog finetune --resume {run}'" in line
    (run / "config.json").write_text(json.dumps({"method": "prog", "train": {"lr": float("nan")}}))
    assert "NaN is not a number JSON allows" in _error(cli, "pretrain", "--resume", run, "--cpu")


# --------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("template, needle", [
    ("a {} of a {}", "2 {} slots"), ("a photo of a {} }", "Single '}'"), ("a {name}", "only an empty {}"),
    ("a photo", "needs a {}"), ("a {0}", "only an empty {}"),
])
def test_prompt_templates_are_checked(template, needle):
    from autoprog.diffusion.data import check_template, fill_template
    from autoprog.errors import ConfigError

    with pytest.raises(ConfigError, match="--caption") as e:
        check_template(template, "--caption")
    assert needle in str(e.value)
    assert check_template("a {{braced}} {}", "--caption") == 1
    assert fill_template("a {{braced}} {}", "bag") == "a {braced} bag"


# ------------------------------------------------------------------------------ launch and interrupts
@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "do not describe a process of a group"),
])
def test_a_broken_launch_environment_is_one_line(cli, monkeypatch, tmp_path, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert needle in _error(cli, "pretrain", "--out", tmp_path / "r", "--cpu")


def test_one_process_ignores_stray_rank_variables(monkeypatch):
    from autoprog.accelerator import launch_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "-1")
    monkeypatch.setenv("RANK", "x")
    assert launch_env() == (1, 0)


def test_an_interrupt_before_the_first_checkpoint_says_so(cli, fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(RunTemplate, "fit", lambda self, resume=False: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = tmp_path / "r"
    rc, _, err = cli("pretrain", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 130 and err.strip() == f"autoprog: interrupted before the first checkpoint; nothing to resume in {out} " \
                                        "(start the run again)"


def test_the_interrupt_message_follows_what_is_on_disk(tmp_path):
    from autoprog.cli import _interrupted

    run = tmp_path / "r"
    args = argparse.Namespace(command="pretrain", out=str(run), resume=None)
    assert "before the first checkpoint" in _interrupted(args)
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.json").write_text("{}")
    assert f"the last checkpoint in {run} is kept" in _interrupted(args)
    (run / "results.json").write_text(json.dumps({"done": True}))
    assert "results complete" in _interrupted(args)


def _exit_of_entry(cli_module):
    """The SystemExit of the ``autoprog`` program's entry, with the signal handlers it changes put back."""
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            cli_module.entry()
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
    return e


def test_the_program_does_not_die_by_the_signal_after_finishing(monkeypatch, capsys):
    import autoprog.cli as cli_module

    def late_interrupt(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "main", late_interrupt)
    e = _exit_of_entry(cli_module)
    assert e.value.code == 130 and "results complete" in capsys.readouterr().err


@pytest.mark.parametrize("world", [1, 2])
def test_a_launched_process_leaves_without_the_interpreters_shutdown(world, monkeypatch, capsys):
    """One of several launched processes exits at once after its output is flushed (the shutdown's destruction of
    a gloo group's threads, kept by DDP, aborted finished two-process runs); a lone process exits normally."""
    import os

    import autoprog.cli as cli_module

    monkeypatch.setattr(cli_module, "main", lambda argv=None: print("done") or 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    left = []

    def leave(code):
        left.append((code, capsys.readouterr().out))
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    e = _exit_of_entry(cli_module)
    assert e.value.code == 0
    assert left == ([(0, "done\n")] if world > 1 else [])


def test_out_of_memory_is_one_line(cli, fake_fmnist, tmp_path, monkeypatch):
    def no_memory(self, resume=False):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 9 bytes")

    monkeypatch.setattr(RunTemplate, "fit", no_memory)
    line = _error(cli, "pretrain", "--out", tmp_path / "r", *tiny_args(fake_fmnist))
    assert "out of memory" in line and "--batch-size" in line


def test_other_runtime_errors_still_raise(cli, fake_fmnist, tmp_path, monkeypatch):
    def bug(self, resume=False):
        raise RuntimeError("a bug, not a user's mistake")

    monkeypatch.setattr(RunTemplate, "fit", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli("pretrain", "--out", tmp_path / "r", *tiny_args(fake_fmnist))


def test_seeds_are_refused_outside_numpys_range(cli, tmp_path):
    assert "--seed must be in [-2147483648, 4294967295]" in _error(cli, "pretrain", "--seed", str(-2 ** 31 - 1),
                                                                  "--out", tmp_path / "r", "--cpu")
    assert "fits in 64 bits" in _error(cli, "pretrain", "--seed", str(2 ** 70), "--out", tmp_path / "r", "--cpu")
    assert "--seeds must be 32-bit integers" in _error(cli, "compare", "--seeds", "0,4294967296", "--out",
                                                       tmp_path / "c", "--cpu")


def test_a_seed_named_twice_and_methods_as_one_string(cli, tmp_path):
    """--seeds 0,0 once trained seed 0 once and showed two agreeing seeds (std 0); the Python API read
    compare(spec, "original,prog", ...) letter by letter; a refused comparison leaves no folder behind."""
    from autoprog.classification.runner import RunSpec, compare, compare_seeds
    from autoprog.diffusion.runner import FinetuneSpec, compare_finetune_seeds
    from autoprog.experiment import method_list

    assert "--seeds names 0 twice" in _error(cli, "compare", "--seeds", "0,1,0", "--out", tmp_path / "c", "--cpu")
    for call in (lambda: compare_seeds(RunSpec(), ["original"], tmp_path / "p", [3, 3]),
                 lambda: compare_finetune_seeds(FinetuneSpec(), ["full"], tmp_path / "f", [1, 1])):
        with pytest.raises(ConfigError, match="names 3 twice|names 1 twice"):
            call()
    assert method_list("original, prog,original") == ["original", "prog"] == method_list(("original", "prog"))
    with pytest.raises(ConfigError, match="unknown method.*bogus"):
        compare(RunSpec(), "original,bogus", tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="must be names"):
        method_list(["original", 3])


def test_a_refused_run_leaves_no_folder_behind(cli, fake_fmnist, tmp_path):
    """A setting refused once the run's folder is made (a model that cannot be built) left an empty --out."""
    err = _error(cli, "pretrain", "--out", tmp_path / "new" / "run", *tiny_args(fake_fmnist, "--num-heads", "3"))
    assert "is not divisible by --num-heads 3" in err
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    _error(cli, "pretrain", "--out", tmp_path / "kept", *tiny_args(fake_fmnist, "--num-heads", "3"))
    assert (tmp_path / "kept").is_dir()
