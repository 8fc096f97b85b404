"""Experiment trackers (--log-with): what a run sends them, and the one-line refusals (#26, item 9)."""

from __future__ import annotations

import pytest
from accelerate.tracking import GeneralTracker

from autoprog.errors import ConfigError
from autoprog.tracking import check_trackers, flat_config, parse_log_with, stage_values


class Recorder(GeneralTracker):
    """An Accelerate tracker that keeps what it is sent."""

    name = "recorder"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.config, self.logs, self.finished = None, [], 0

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def finish(self):
        self.finished += 1


def test_a_run_sends_training_evaluation_and_stage_figures(fake_fmnist, tmp_path, fresh_accelerate):
    from accelerate import Accelerator

    import autoprog.classification.runner as runner
    from autoprog.classification.runner import RunSpec
    from autoprog.classification.trainer import TrainConfig

    rec = Recorder()
    acc = Accelerator(cpu=True, log_with=[rec])
    spec = RunSpec(method="prog", data_root=str(fake_fmnist), subset=256, patch_size=4, depth=4, embed_dim=16,
                   num_heads=2, train=TrainConfig(epochs=7, batch_size=32, eval_samples=64, count_flops=False))
    runner.pretrain(spec, tmp_path / "run", acc)
    assert rec.config["config/batch_size"] == 32 and rec.config["config/epochs"] == 7
    assert all(isinstance(v, bool | int | float | str) for v in rec.config.values())
    train = [(step, v) for step, v in rec.logs if "train/loss" in v]
    assert [step for step, _ in train] == [50], "every 50 steps (56 steps in all)"
    assert train[0][1]["train/images_per_s"] > 0 and train[0][1]["train/stage"] == 4
    evals = [(step, v) for step, v in rec.logs if "eval/top1" in v]
    assert [step for step, _ in evals] == [8 * k for k in range(1, 8)]
    stages = [v for _, v in rec.logs if "stage/subnet_resolution" in v]
    assert [v["stage/subnet_resolution"] for v in stages] == [16, 20, 24, 28]
    assert rec.finished == 1, "the run's trackers are closed when it ends"


def test_stage_values_carry_a_search_table_as_text():
    info = {"stage": 2, "chosen": {"resolution": 20, "depth": 3}, "alpha": 0.5,
            "candidates": [{"resolution": 16, "depth": 3, "score": 1.2}, {"resolution": 20, "depth": 3, "score": 1.1}]}
    values = stage_values(info)
    assert values["stage/chosen_resolution"] == 20 and values["stage/alpha"] == 0.5
    assert values["search/candidates"].splitlines()[0] == "| resolution | depth | score |"
    assert len(values["search/candidates"].splitlines()) == 4


def test_flat_config_keeps_only_scalars():
    flat = flat_config({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": float("nan"), "f": "x"})
    assert flat == {"a/b": 1, "a/c": "None", "a/d": "[1, 2]", "e": "nan", "f": "x"}


def test_unknown_or_missing_trackers_are_one_line_errors(monkeypatch):
    assert parse_log_with(None) == []
    with pytest.raises(ConfigError, match="names no tracker"):
        parse_log_with(" , ")
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        parse_log_with("tensorboard")


def test_the_cli_refuses_a_tracker_that_is_not_installed(cli, fake_fmnist, tmp_path, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    rc, _, err = cli("pretrain", "--data-root", fake_fmnist, "--log-with", "wandb", "--out", tmp_path / "x", "--cpu")
    assert rc == 2 and "pip install wandb" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


class ImageRecorder(Recorder):
    name = "image-recorder"

    def __init__(self):
        super().__init__()
        self.images = []

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: v.shape for k, v in values.items()}))


def test_sample_grids_go_to_trackers_that_take_images(fresh_accelerate):
    import torch
    from accelerate import Accelerator

    from autoprog.diffusion.quality import labelled_grid
    from autoprog.tracking import log_images

    rec, plain = ImageRecorder(), Recorder()
    acc = Accelerator(cpu=True, log_with=[rec, plain])
    acc.init_trackers("t")
    grid = labelled_grid(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), 2, ["a", "b"], "title")
    log_images(acc, {"samples": grid}, step=12)
    assert rec.images == [(12, {"samples": (grid.size[1], grid.size[0], 3)})] and plain.logs == []
