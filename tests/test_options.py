"""Options declared once: the CLI, YAML configs, presets and from_dict all come from the spec dataclasses."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny_args

from autoprog.classification.runner import RunSpec
from autoprog.classification.trainer import TrainConfig
from autoprog.cli import _parse, build_parser
from autoprog.cli.classification import spec_from_args
from autoprog.cli.config import list_presets, load_preset
from autoprog.cli.diffusion import base_spec, finetune_spec
from autoprog.diffusion.runner import BaseSpec, FinetuneSpec
from autoprog.errors import ConfigError
from autoprog.options import check_bounds, option_names

SPECS = [RunSpec, FinetuneSpec, BaseSpec]


@pytest.mark.parametrize("cls", SPECS)
def test_from_dict_round_trips_and_refuses_unknown_keys(cls):
    spec = cls()
    assert cls.from_dict(spec.to_dict()).to_dict() == spec.to_dict()  # (saved with its dataset's defaults filled in)
    with pytest.raises(ConfigError, match="unknown setting.*bogus") as e:
        cls.from_dict({**spec.to_dict(), "bogus": 1})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.nope"):
        cls.from_dict({**({"method": "prog"} if "method" in cls.__dataclass_fields__ else {}), "train": {"nope": 3}})


def test_missing_keys_take_defaults_but_not_the_method_or_a_section():
    d = dataclasses.replace(RunSpec(), method="original").to_dict()
    del d["train"]["warmup_epochs"], d["num_stages"]  # settings a file written before them lacks
    assert RunSpec.from_dict(d) == dataclasses.replace(RunSpec(), method="original", subset=10000)  # (as saved)
    for cut in ({"method": "original"}, {"train": {}}):
        with pytest.raises(ConfigError, match="lacks"):
            RunSpec.from_dict(cut, "run/config.json")


@pytest.mark.parametrize("key, value, needle", [
    ("epochs", "x", "train.epochs must be a number, got 'x'"),
    ("stop_after_epochs", 2.5, "train.stop_after_epochs must be an integer or null, got 2.5"),
    ("lr", float("nan"), "train.lr must be a finite number"),
    ("lr", -1.0, "train.lr must be above 0"),
    ("seed", 2 ** 70, "fits in 64 bits"),
    ("label_smoothing", True, "must be a number, got True"),
])
def test_a_saved_spec_is_type_and_bound_checked_naming_file_and_key(key, value, needle):
    d = RunSpec().to_dict()
    d["train"][key] = value
    with pytest.raises(ConfigError, match="run/config.json") as e:
        RunSpec.from_dict(d, "run/config.json")
    assert needle in str(e.value)


@pytest.mark.parametrize("argv, spec_of, cls", [
    (["pretrain", "--out", "x"], lambda a: spec_from_args(a, a.method), RunSpec),
    (["finetune", "--out", "x"], lambda a: finetune_spec(a, a.method), FinetuneSpec),
    (["pretrain", "--task", "diffusion", "--out", "x"], base_spec, BaseSpec),
])
def test_no_flags_give_the_spec_defaults(argv, spec_of, cls):
    task = "diffusion" if "diffusion" in argv else None
    assert spec_of(_parse(build_parser(task), argv)) == cls()


def test_every_field_with_a_flag_is_on_the_command_line():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["pretrain"]
    flags = {s[2:] for a in sub._actions for s in a.option_strings}
    assert set(option_names(RunSpec)) <= flags


@pytest.mark.parametrize("flag, value, needle", [
    ("--grad-clip", "-1", "--grad-clip"), ("--warmup-epochs", "-1", "--warmup-epochs"),
    ("--drop-path", "2", "--drop-path"), ("--weight-decay", "-1", "--weight-decay"),
    ("--label-smoothing", "2", "--label-smoothing"), ("--eval-samples", "-1", "--eval-samples"),
    ("--lr", "nan", "finite"), ("--epochs", "inf", "finite"), ("--start-ratio", "0", "--start-ratio"),
])
def test_out_of_range_values_are_one_line_errors(cli, fake_fmnist, tmp_path, flag, value, needle):
    rc, _, err = cli("pretrain", "--out", tmp_path / "r", *tiny_args(fake_fmnist), flag, value)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "r").exists()


def test_bounds_are_checked_on_library_specs_too():
    with pytest.raises(ConfigError, match="--grad-clip"):
        TrainConfig(grad_clip=-1.0).validate()
    check_bounds(RunSpec())


# ------------------------------------------------------------------------------------------- presets
def test_presets_are_listed_and_each_parses_into_a_valid_spec():
    names = [n for n, _, _ in list_presets()]
    assert {"cpu-pretrain", "cpu-deit", "deit-s-paper", "volo-d1-paper", "cpu-finetune", "dit-xl2-paper",
            "sd-t2i-paper", "dreambooth-paper"} <= set(names)
    for name in names:
        task = load_preset(name)["task"]
        argv, spec_of, task_flag = {
            "classification": (["pretrain"], lambda a: spec_from_args(a, a.method), None),
            "finetune": (["finetune"], lambda a: finetune_spec(a, a.method), None),
            "diffusion": (["pretrain", "--task", "diffusion"], base_spec, "diffusion"),
            "text-to-image": (["finetune", "--task", "text-to-image"], lambda a: finetune_spec(a, a.method),
                              "text-to-image"),
            "dreambooth": (["finetune", "--task", "dreambooth"], lambda a: finetune_spec(a, a.method), "dreambooth"),
        }[task]
        spec = spec_of(_parse(build_parser(task_flag), [*argv, "--preset", name, "--out", "x"]))
        check_bounds(spec)


def test_preset_values_apply_and_flags_win():
    args = _parse(build_parser(), ["pretrain", "--preset", "cpu-deit", "--epochs", "3", "--out", "x"])
    spec = spec_from_args(args, args.method)
    assert spec.model == "timm:deit_tiny_patch16_224" and spec.embed_dim == 96 and spec.train.epochs == 3


def test_paper_preset_values(cli):
    args = _parse(build_parser(), ["finetune", "--preset", "dit-xl2-paper", "--out", "x"])
    spec = finetune_spec(args, args.method)
    assert spec.train.lr == 1e-4 and spec.train.steps == 240000 and spec.start_ratio == 0.25
    # the paper's constant learning rate, by the schedule, not by a cosine floor: compare's front runs (cosine)
    # then still decay to --min-lr
    assert spec.train.lr_schedule == "constant" and spec.train.min_lr == 0 and spec.train.warmup_steps == 0


def test_the_stable_diffusion_presets_fit_their_fine_tuning_tasks_only(cli, tmp_path):
    from autoprog.diffusion.runner import DreamBoothSpec, TextFinetuneSpec

    args = _parse(build_parser("text-to-image"), ["finetune", "--task", "text-to-image", "--preset", "sd-t2i-paper",
                                                  "--out", "x"])
    spec = finetune_spec(args, args.method)
    assert isinstance(spec, TextFinetuneSpec) and spec.caption == "a {}." and spec.image_size == 256
    assert (spec.train.lr, spec.train.batch_size, spec.train.cfg_scale, spec.train.sample_steps) == (1e-5, 32, 3.0, 50)
    assert spec.train.lr_schedule == "constant" and spec.train.steps == 32 * (5994 // 32)
    args = _parse(build_parser("dreambooth"), ["finetune", "--task", "dreambooth", "--preset", "dreambooth-paper",
                                               "--out", "x"])
    spec = finetune_spec(args, args.method)
    assert isinstance(spec, DreamBoothSpec) and spec.train.lr == 5e-6 and spec.with_prior_preservation
    assert spec.eval_prompts.split("|") == ["a photo of sks dog sleeping under a tree", "a photo of sks dog on the beach"]
    from autoprog.cli.config import PRESET_TASKS

    for argv, preset, task in ((["finetune"], "sd-t2i-paper", "text-to-image"),  # class-conditional
                               (["finetune", "--task", "dreambooth"], "sd-t2i-paper", "text-to-image"),
                               (["pretrain", "--task", "text-to-image"], "sd-t2i-paper", "text-to-image"),  # a base
                               (["finetune", "--task", "text-to-image"], "dit-xl2-paper", "finetune"),
                               (["finetune", "--task", "classification"], "dit-xl2-paper", "finetune")):  # transfer
        rc, _, err = cli(*argv, "--preset", preset, "--out", tmp_path / "r")
        assert rc == 2 and f"is for {PRESET_TASKS[task]}, not for" in err, (argv, err)


def test_saved_specs_keep_what_they_ran_before_a_default_changed():
    """A config.json written before --lr-schedule, --candidate-space, --sid-init and --sid-dropout existed ran
    cosine decay, AutoProg-One's candidates and zero-initialised SIDs without dropout: loading it (resume, or
    reuse by compare) keeps that, while a new spec takes the paper's defaults."""
    from autoprog.diffusion.runner import BaseSpec, FinetuneSpec, TextFinetuneSpec

    new = FinetuneSpec()
    assert (new.train.lr_schedule, new.candidate_space, new.sid_init, new.sid_dropout) == \
        ("constant", "neighbours", "normal", None)
    old = new.to_dict()
    for key in ("candidate_space", "sid_init", "sid_dropout"):
        del old[key]
    del old["train"]["lr_schedule"]
    loaded = FinetuneSpec.from_dict(old)
    assert (loaded.train.lr_schedule, loaded.candidate_space, loaded.sid_init, loaded.sid_dropout) == \
        ("cosine", "autoprog-one", "zero", 0.0)
    assert FinetuneSpec.from_dict(new.to_dict()).to_dict() == new.to_dict()  # a spec that has the keys keeps them
    assert TextFinetuneSpec.from_dict(TextFinetuneSpec().to_dict()).to_dict() == TextFinetuneSpec().to_dict()
    base = BaseSpec().to_dict()
    assert BaseSpec().train.lr_schedule == "cosine"  # a base model trains from scratch: cosine by default
    del base["train"]["lr_schedule"]
    assert BaseSpec.from_dict(base).to_dict() == BaseSpec().to_dict()


def test_presets_command_and_bad_presets(cli, tmp_path):
    rc, out, _ = cli("presets")
    assert rc == 0 and "deit-s-paper" in out and "autoprog finetune" in out
    rc, _, err = cli("pretrain", "--preset", "nope", "--out", tmp_path / "r")
    assert rc == 2 and "unknown preset" in err and "cpu-deit" in err
    rc, _, err = cli("pretrain", "--preset", "cpu-finetune", "--out", tmp_path / "r")
    assert rc == 2 and "autoprog finetune" in err


def test_a_pretraining_spec_saved_before_2026_12_05_keeps_what_it_ran():
    """Resuming or reusing an old run must not change it: the old 4x4 default grid, the per-epoch momentum when
    none was given (an explicit one was per step), and AutoProg-One's earlier rules."""
    from autoprog.adapters.factory import ModelOverrides, build_model
    from autoprog.classification.runner import RunSpec

    old = RunSpec().to_dict()
    del old["train"]["ema_rescale"]
    for key in ("builtin_grid", "search_min_updates", "alpha_rule", "score_points", "score_momentum",
                "supernet_sampling", "search_step_time", "search_fraction", "forced_growth"):
        old.pop(key)
    old["train"]["ema_decay"] = None
    spec = RunSpec.from_dict(old)
    assert spec.train.ema_rescale is True and spec.train.ema_decay == 0.998
    assert spec.builtin_grid == 4 and spec.alpha_rule == "balanced" and spec.score_points == 1
    assert spec.supernet_sampling == "random" and spec.search_step_time == "probe" and not spec.score_momentum
    m = build_model("vit", 10, 1, ModelOverrides(grid=spec.builtin_grid))
    assert m.patch_embed.patch_size == (7, 7), "the old default: a 4x4 grid at 28 px"
    old["train"]["ema_decay"] = 0.99
    spec = RunSpec.from_dict(old)
    assert spec.train.ema_decay == 0.99 and spec.train.ema_rescale is False, "an explicit momentum was per step"
    new = RunSpec.from_dict(RunSpec().to_dict())
    assert new.to_dict() == RunSpec().to_dict(), "a spec saved now loads as it is"


def test_a_comparison_ignores_the_crops_of_in_memory_data(tmp_path):
    """``--loader-resolution`` and ``--crop-scale`` change nothing for Fashion-MNIST or digits, so a saved run that
    differs only there is the same run; for an ImageFolder it is another. A run saved before the options cropped at
    the training size (the default) and at 0.35 of the area and up."""
    import json

    from autoprog.classification.runner import RunSpec, TransferSpec, run_differences

    for cls in (RunSpec, TransferSpec):
        old = cls().to_dict()
        del old["train"]["loader_resolution"], old["train"]["crop_scale"]
        got = cls.from_dict(old).train
        assert got.loader_resolution == "full" and got.crop_scale == 0.35, "the crops it ran with"
        assert cls.from_dict(cls().to_dict()).train.crop_scale == 0.08
        unset = cls().to_dict()
        unset["train"]["loader_resolution"] = None  # (saved for some hours of 2026-12-07: it meant stage)
        assert cls.from_dict(unset).train.loader_resolution == "stage"

    def differ(saved: str, wanted: str, dataset: str) -> list[str]:
        spec = RunSpec(dataset=dataset)
        stored = spec.to_dict()
        stored["train"]["loader_resolution"] = saved
        (tmp_path / "config.json").write_text(json.dumps(stored))
        spec.train.loader_resolution = wanted
        return run_differences(tmp_path, spec)

    assert differ("stage", "full", str(tmp_path)) == ["train.loader_resolution: 'stage' there, 'full' now"]
    assert differ("stage", "full", "fashion-mnist") == [] and differ("full", "stage", "digits") == []
    spec = RunSpec(dataset="digits")
    stored = spec.to_dict()
    stored["train"]["crop_scale"] = 0.35
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert run_differences(tmp_path, spec) == []
    spec.dataset = stored["dataset"] = str(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert run_differences(tmp_path, spec) == ["train.crop_scale: 0.35 there, 0.08 now"]


def test_a_run_saved_before_the_official_growth_rules_keeps_its_own_and_is_reused_only_where_they_matter(tmp_path):
    """A pre-training run saved before 2026-12-08 ran spread copies, carried moments and a first supernet of random
    blocks: loading its config keeps them (a fine-tuning run, which never grows, is left alone). A comparison reuses
    it where the setting is unread (the original, progstack's stacking) and not where it matters (prog's copies)."""
    import json

    from autoprog.classification.runner import RunSpec, TransferSpec, run_differences

    def saved_before(spec):
        d = spec.to_dict()
        for key in ("growth_copies", "first_supernet"):
            d.pop(key, None)
        d["train"].pop("optimizer_at_growth", None)
        return d

    old = RunSpec.from_dict(saved_before(RunSpec()))
    assert (old.growth_copies, old.first_supernet, old.train.optimizer_at_growth) == ("spread", "random", "carry")
    now = RunSpec()
    assert (now.growth_copies, now.first_supernet, now.train.optimizer_at_growth) == ("last", "copies", "carry")
    ft = TransferSpec.from_dict(saved_before(TransferSpec()))
    assert ft.growth_copies == "last" and ft.first_supernet == "copies"  # (defaults: nothing to keep)

    def differ(method: str, growth: str | None = None) -> list[str]:
        spec = RunSpec(method=method, growth=growth)
        (tmp_path / "config.json").write_text(json.dumps(saved_before(spec)))
        return run_differences(tmp_path, spec)

    assert differ("original") == [] and differ("progstack") == [] and differ("prog", "stacking") == []
    assert differ("prog") == ["growth_copies: 'spread' there, 'last' now"]
    assert "first_supernet: 'random' there, 'copies' now" in differ("autoprog-one")


@pytest.mark.parametrize("argv, flag", [
    (["--method", "original", "--growth-copies", "spread"], "--growth-copies"),
    (["--method", "progstack", "--growth-copies", "spread"], "--growth-copies"),
    (["--method", "supernet-only", "--optimizer-at-growth", "reset"], "--optimizer-at-growth"),
    (["--method", "prog", "--first-supernet", "random"], "--first-supernet"),
])
def test_growth_rule_flags_a_method_never_reads_are_refused(cli, tmp_path, argv, flag):
    rc, _, err = cli("pretrain", *argv, "--out", tmp_path / "x")
    assert rc == 2 and f"{flag} is read only by" in err and "\n" not in err.strip(), err


def test_autoprog_ones_settings_are_declared_once():
    """The pre-training spec inherits AutoProg-One's settings (flags, help, bounds) instead of repeating them."""
    import dataclasses

    from autoprog.algorithms.autoprog_one import AutoProgOneConfig
    from autoprog.classification.runner import RunSpec

    one = AutoProgOneConfig.__dataclass_fields__
    assert all(RunSpec.__dataclass_fields__[name] is f for name, f in one.items())
    assert {f.name for f in dataclasses.fields(RunSpec)} >= set(one)


def test_a_pretraining_run_takes_10k_fashion_mnist_images_by_default_and_any_other_dataset_whole(tmp_path):
    """--subset unset: the built-in experiment's 10,000 Fashion-MNIST images; digits or a folder of the user's own
    whole; 0 is all anywhere, and so is a Python caller's None, as ever. A saved spec names what it took (null:
    all)."""
    def args(*a):
        parsed = _parse(build_parser(), ["pretrain", "--out", "x", *a])
        return spec_from_args(parsed, parsed.method)

    assert args().train_subset == 10000 and args().to_dict()["subset"] == 10000
    assert args("--dataset", "digits").train_subset is None
    folder = args("--dataset", str(tmp_path))
    assert folder.train_subset is None and folder.to_dict()["subset"] is None
    assert args("--subset", "0").train_subset is None and args("--dataset", str(tmp_path), "--subset", "50").train_subset == 50
    assert RunSpec(subset=None).train_subset is None and RunSpec(subset=0).train_subset is None
    assert RunSpec.from_dict({**RunSpec().to_dict(), "subset": None}).train_subset is None


def test_a_comparison_reuses_a_run_saved_with_the_old_10k_default_on_a_smaller_dataset(tmp_path):
    """Before 2026-12-07 a digits run (or a small folder's) saved subset 10000, the old default, though it took
    every image: a comparison today (all) reuses it; a real subset, below the images taken, still differs."""
    from autoprog.classification.runner import run_differences

    spec = RunSpec(dataset="digits", method="original")
    for saved, taken, differ in ((10000, 1437, False), (1000, 1000, True), (None, 1437, False)):
        run = tmp_path / f"{saved}-{taken}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**spec.to_dict(), "subset": saved}))
        (run / "results.json").write_text(json.dumps({"summary": {"train_images": taken}}))
        assert bool(run_differences(run, spec)) == differ, run_differences(run, spec)


def test_an_image_folder_is_trained_whole_without_a_subset_warning(cli, image_folder, tmp_path):
    import json

    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", tmp_path / "run", "--batch-size", "4",
                     "--epochs", "1", "--method", "original", "--embed-dim", "16", "--depth", "2",
                     "--num-heads", "2", "--patch-size", "8", "--workers", "0", "--no-flops", "--cpu")
    assert rc == 0, err
    assert "--subset" not in err  # (the 10,000 default once warned about a folder of 10 images)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["summary"]["train_images"] == 10
    assert json.loads((tmp_path / "run" / "config.json").read_text())["subset"] is None


def test_a_learning_rate_floor_above_the_peak_is_refused():
    """--min-lr above --lr made the cosine 'decay' raise the learning rate, silently."""
    from autoprog.classification.trainer import TrainConfig
    from autoprog.diffusion.trainer import DiffusionConfig
    from autoprog.errors import ConfigError

    for cfg in (TrainConfig(lr=1e-3, min_lr=1e-2), DiffusionConfig(lr=1e-3, min_lr=1e-2)):
        with pytest.raises(ConfigError, match="--min-lr 0.01 is above --lr 0.001"):
            cfg.validate()
    TrainConfig(lr=1e-3, min_lr=1e-3).validate()


def test_a_spec_made_in_python_takes_paths_and_refuses_wrong_types_by_name():
    """``RunSpec(dataset=Path(...))`` once failed deep in loading (``'PosixPath' object has no attribute 'lower'``)
    and ``TrainConfig(epochs="2")`` in arithmetic; now a path is its string and a wrong type one line at once."""
    from pathlib import Path

    from autoprog.classification.runner import RunSpec, TransferSpec
    from autoprog.classification.trainer import TrainConfig
    from autoprog.diffusion.runner import DreamBoothSpec, FinetuneSpec
    from autoprog.diffusion.trainer import DiffusionConfig

    assert RunSpec(dataset=Path("/data/shapes")).dataset == "/data/shapes"
    assert TransferSpec(base=Path("runs/a/model")).base == "runs/a/model"
    assert DreamBoothSpec(instance_dir=Path("dog")).instance_dir == "dog"
    assert RunSpec(train=TrainConfig(epochs=2)).train.epochs == 2  # an int where a float is declared
    with pytest.raises(ConfigError, match=r"^RunSpec: train\.epochs must be a number, got '2'$"):
        RunSpec(train=TrainConfig(epochs="2"))
    with pytest.raises(ConfigError, match=r"^FinetuneSpec: train\.steps must be an integer, got 8\.0$"):
        FinetuneSpec(train=DiffusionConfig(steps=8.0))
    with pytest.raises(ConfigError, match=r"^RunSpec: train must be a TrainConfig, got a mapping$"):
        RunSpec(train={"epochs": 2})
    with pytest.raises(ConfigError, match=r"^FinetuneSpec: train must be a DiffusionConfig, got a TrainConfig$"):
        FinetuneSpec(train=TrainConfig())
    assert TransferSpec(train=TrainConfig(epochs=3)).train.epochs == 3  # the same settings, other defaults
    with pytest.raises(ConfigError, match=r"^TransferSpec: train\.batch_size must be an integer, got True$"):
        TransferSpec(train=TrainConfig(batch_size=True))


@pytest.mark.parametrize("task", ["classification", "diffusion", "text-to-image", "dreambooth"])
def test_no_flag_states_its_default_twice(task):
    """A help text that says its default itself shows no generated ``(default: …)`` beside it (``--subset`` of
    classification fine-tuning read ``(default: all) (default: 0)``)."""
    import argparse

    def actions(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, p in a.choices.items():
                    yield from actions(p, f"{name} {sub}")
            elif a.help:
                yield name, a

    twice = [(name, a.option_strings[0]) for name, a in actions(build_parser(task), task)
             if a.help.count("default:") > 1]
    assert not twice
