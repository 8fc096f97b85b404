"""No host-device sync in a steady-state training step (#26). On a GPU every ``Tensor.item``, ``float(t)``,
``bool(t)``, ``int(t)``, ``.cpu()`` or ``.tolist()`` of a device tensor waits for all queued work. On the CPU these
tests count such calls made by autoprog's own code inside the engine's steps (evaluation points, checkpoints and
the searches at a stage's start excluded); the libraries' calls are on host tensors (AdamW's step counts) and are not counted."""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from conftest import tiny_args

SYNCS = ("item", "__float__", "__bool__", "__int__", "cpu", "tolist")
# host tensors whatever the training device, so no sync: candidate indices drawn by a CPU generator, and a
# DreamBooth batch's image indices (CPU permutations) and the loss weights made from them before any copy
HOST_ONLY = ("sample_index", "cycle_index", "batch_indices", "_cycled", "loss_weights")
CHECK_EVERY = 50  # the engine's default --check-every


@pytest.fixture
def count_syncs(monkeypatch):
    """Counts of the sync-making tensor calls made inside the engine's steps (``RunTemplate._train_one`` and the
    progress shown after it), and the number of steps."""
    return _count_in_steps(monkeypatch, torch.Tensor, SYNCS)


# walks of a module tree: milliseconds of Python per call for a Stable Diffusion UNet (about 900 tensors), which a
# launch-bound GPU step waits for
WALKS = ("parameters", "named_parameters", "buffers", "named_buffers", "modules", "named_modules", "state_dict")


@pytest.fixture
def count_walks(monkeypatch):
    """Counts of autoprog's own module-tree walks inside the engine's steps (as :func:`count_syncs`)."""
    return _count_in_steps(monkeypatch, torch.nn.Module, WALKS, skip=("counted_step",))  # (a FLOPs count: once
    # per learnable set and resolution)


def _count_in_steps(monkeypatch, owner, names, skip=HOST_ONLY) -> collections.Counter:
    """Counts of calls of ``owner``'s ``names`` made by autoprog's code (not in functions named in ``skip``) inside
    the engine's steps."""
    from autoprog.engine import RunTemplate

    counts = collections.Counter()
    inside = [False]
    for name in names:
        real = getattr(owner, name)

        def counted(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1)
            if (inside[0] and caller.f_globals.get("__name__", "").startswith("autoprog")
                    and caller.f_code.co_name not in skip):
                counts[f"{_name} in {caller.f_code.co_name}"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(owner, name, counted)
    for name in ("_train_one", "_show_progress"):
        real = getattr(RunTemplate, name)

        def inside_step(self, *a, _real=real, _name=name, **k):
            inside[0] = True
            try:
                return _real(self, *a, **k)
            finally:
                inside[0] = False

        monkeypatch.setattr(RunTemplate, name, inside_step)
    import autoprog.engine as engine

    real_enter = engine.enter_due_stage

    def enter(trainer, step_subnet=True):  # a stage's start (its search) is not a steady-state step: not counted
        before = collections.Counter(counts)
        entered = real_enter(trainer, step_subnet)
        if entered:
            counts.clear()
            counts.update(before)
        return entered

    monkeypatch.setattr(engine, "enter_due_stage", enter)
    return counts


@pytest.mark.parametrize("method", ["full", "prog"])
def test_finetuning_steps_walk_no_module_tree(method, cli, fake_fmnist, tmp_path, count_walks):
    """The learnable set's name and size, the gradients to clip and the EMA's tensors come from lists made once;
    prog also unfreezes stages (entries excluded) and keeps an EMA whose frozen weights' updates are deferred."""
    rc, _, err = cli("finetune", "--method", method, "--steps", "40", "--batch-size", "8", "--eval-points", "1",
                     "--fd-samples", "8", "--curve-samples", "8", "--sample-steps", "2", "--feature-epochs", "1",
                     "--checkpoint-every", "0", "--ema-decay", "0.99", "--cache-dir", tmp_path / "cache",
                     "--data-root", fake_fmnist, "--out", tmp_path / "ft", "--cpu")
    assert rc == 0, err
    assert sum(count_walks.values()) <= 3, dict(count_walks)  # the first step's lists


def test_pretraining_steps_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs):
    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "run",
                     *tiny_args(fake_fmnist, epochs="13"))  # 104 steps of one stage
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 104 // CHECK_EVERY + 3, dict(count_syncs)


def test_finetuning_steps_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs):
    rc, _, err = cli("finetune", "--method", "full", "--steps", "100", "--batch-size", "8", "--eval-points", "1",
                     "--fd-samples", "8", "--curve-samples", "8", "--sample-steps", "2", "--feature-epochs", "1",
                     "--checkpoint-every", "0", "--cache-dir", tmp_path / "cache", "--data-root", fake_fmnist,
                     "--out", tmp_path / "ft", "--cpu")
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 100 // CHECK_EVERY + 3, dict(count_syncs)


# the tiny text-to-image base, a module fixture of the text-to-image tests
from test_text_to_image import text_base  # noqa: E402,F401


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "autoprog-zero"])  # the text path frozen (cached), and an SID learning
def test_text_to_image_steps_do_not_sync(method, cli, text_base, fake_fmnist, cache_dir, tmp_path,  # noqa: F811
                                         count_syncs):
    rc, _, err = cli("finetune", "--task", "text-to-image", "--base", text_base, "--method", method, "--steps", "100",
                     "--batch-size", "4", "--image-size", "8", "--eval-points", "1", "--fd-samples", "4",
                     "--curve-samples", "4", "--sample-steps", "2", "--feature-epochs", "1", "--checkpoint-every",
                     "0", "--cache-dir", cache_dir, "--data-root", fake_fmnist, "--out", tmp_path / "t2i", "--cpu",
                     *(["--proxy-batches", "2", "--proxy-batch-size", "2"] if method == "autoprog-zero" else []))
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 100 // CHECK_EVERY + 3, dict(count_syncs)


@pytest.mark.slow
def test_transfer_steps_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs):
    from autoprog.cli import main

    assert main(["pretrain", "--method", "original", "--out", str(tmp_path / "pre"),
                 *tiny_args(fake_fmnist, epochs="1")]) == 0
    count_syncs.clear()
    rc, _, err = cli("finetune", "--task", "classification", "--method", "prog", "--base", tmp_path / "pre",
                     "--dataset", "digits", "--batch-size", "16", "--epochs", "1", "--num-stages", "2",
                     "--no-flops", "--cpu", "--out", tmp_path / "ft")  # 1797 * 0.9 / 16: about 100 steps
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 100 // CHECK_EVERY + 3 + 2, dict(count_syncs)  # + a stage change


def test_autoprog_one_finetuning_supernet_steps_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs, monkeypatch):
    """The fine-tuning baseline's supernet phase keeps each step's loss on the device until its search ends."""
    from autoprog.algorithms.autoprog_one import AutoProgOneFinetune

    real_finish = AutoProgOneFinetune._finish_search

    def finish(self, trainer):  # the search's end reads the losses once: a stage's decision, not a step
        before = collections.Counter(count_syncs)
        real_finish(self, trainer)
        count_syncs.clear()
        count_syncs.update(before)

    monkeypatch.setattr(AutoProgOneFinetune, "_finish_search", finish)
    rc, _, err = cli("finetune", "--method", "autoprog-one", "--steps", "100", "--batch-size", "8", "--eval-points",
                     "1", "--fd-samples", "8", "--curve-samples", "8", "--sample-steps", "2", "--feature-epochs", "1",
                     "--checkpoint-every", "0", "--search-fraction", "0.9", "--num-stages", "2", "--time-source",
                     "flops", "--cache-dir", tmp_path / "cache", "--data-root", fake_fmnist, "--out", tmp_path / "ft",
                     "--cpu")
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 100 // CHECK_EVERY + 3, dict(count_syncs)


def test_pretraining_steps_with_randaugment_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs):
    """In-memory images with --randaugment stay on the host until RandAugment (PIL) has run: nothing comes back."""
    rc, _, err = cli("pretrain", "--method", "original", "--out", tmp_path / "run", "--randaugment",
                     "rand-m9-mstd0.5-inc1", *tiny_args(fake_fmnist, epochs="13"))
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 104 // CHECK_EVERY + 3, dict(count_syncs)


@pytest.mark.parametrize("randaugment, adareg", [(None, False), ("rand-m9-mstd0.5-inc1", False), (None, True)])
def test_in_memory_images_randaugmented_on_the_host_reach_the_device_after_it(randaugment, adareg, fake_fmnist,
                                                                               tmp_path, monkeypatch):
    """The loader leaves such batches on the host (the trainer copies them after RandAugment, without waiting);
    other in-memory batches are put on the device by the loader (the images were moved there once)."""
    from accelerate import Accelerator

    import autoprog.classification.trainer as trainer_module
    from autoprog.classification.adareg import AdaptiveRegularization
    from autoprog.classification.runner import RunSpec, build_run
    from autoprog.classification.trainer import TrainConfig, Trainer

    spec = RunSpec(method="prog", data_root=str(fake_fmnist), subset=64, embed_dim=16, depth=4, num_heads=2,
                   patch_size=4, train=TrainConfig(batch_size=8, epochs=1, randaugment=randaugment, count_flops=False))
    data, net, schedule, growth = build_run(spec)
    reg = AdaptiveRegularization(net.growth_space(4, 0.5)) if adareg else None
    t = Trainer(net, schedule, growth, data, spec.train, tmp_path, Accelerator(cpu=True), adareg=reg)
    on_host = randaugment is not None or adareg
    assert (t.host_randaugment is not None) == on_host
    assert (t.train_loader.device is None) == on_host
    copied = []
    monkeypatch.setattr(trainer_module, "to_device", lambda x, device: copied.append(x.dtype) or x.to(device))
    t._gen = torch.Generator()
    assert torch.isfinite(t._train_step(next(iter(t.train_loader))))
    assert copied == ([torch.uint8, torch.int64] if on_host else [])  # the RandAugmented images and labels


@pytest.mark.slow
def test_dreambooth_steps_with_prior_preservation_do_not_sync(cli, text_base, fake_fmnist, cache_dir,  # noqa: F811
                                                             tmp_path, count_syncs):
    """Paired subject/class batches weight their losses from host-side batch indices: nothing read back."""
    rc, _, err = cli("finetune", "--task", "dreambooth", "--base", text_base, "--method", "full", "--steps", "100",
                     "--batch-size", "4", "--eval-points", "1", "--fd-samples", "4",
                     "--curve-samples", "4", "--sample-steps", "2", "--feature-epochs", "1", "--checkpoint-every", "0",
                     "--with-prior-preservation", "--num-class-images", "4", "--class-dir", tmp_path / "class",
                     "--cache-dir", cache_dir, "--data-root", fake_fmnist, "--out", tmp_path / "db", "--cpu")
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 100 // CHECK_EVERY + 3, dict(count_syncs)


def test_autoprog_one_pretraining_supernet_steps_do_not_sync(cli, fake_fmnist, tmp_path, count_syncs, monkeypatch):
    """Pre-training's supernet phase times each candidate's own steps by marks between them (CUDA events on a GPU),
    read when its search ends: no tensor read and no wait for the device in its steps (the scoring points and the
    search's end, a stage's decisions, excluded)."""
    import json

    from autoprog.algorithms.autoprog_one import AutoProgOne
    from autoprog.engine import RunTemplate

    decisions = [0]
    for name in ("_score", "_search"):
        real = getattr(AutoProgOne, name)

        def excluded(self, trainer, _real=real):
            before = collections.Counter(count_syncs)
            decisions[0] += 1
            try:
                return _real(self, trainer)
            finally:
                decisions[0] -= 1
                count_syncs.clear()
                count_syncs.update(before)

        monkeypatch.setattr(AutoProgOne, name, excluded)
    waits, real_sync = [], RunTemplate.sync

    def sync(self):
        frames = [f.f_code.co_name for f in _stack()]
        if "after_step" in frames and not decisions[0]:
            waits.append(self.step)
        real_sync(self)

    monkeypatch.setattr(RunTemplate, "sync", sync)
    rc, _, err = cli("pretrain", "--method", "autoprog-one", "--out", tmp_path / "run",
                     *tiny_args(fake_fmnist, epochs="13"))
    assert rc == 0, err
    searches = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]["search"]
    assert any(s["step_time_from"] == "supernet steps" for s in searches), searches
    assert waits == [], "a supernet step waited for the device"
    assert sum(count_syncs.values()) <= 104 // CHECK_EVERY + 3, dict(count_syncs)


def _stack():
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


@pytest.mark.parametrize("geometry", ["official", "corrected"])
def test_token_labelled_volo_steps_do_not_sync(cli, tmp_path, count_syncs, geometry, monkeypatch):
    """Token labeling's targets (roi_align of the score maps) and MixToken's box (numpy's draws) stay off the host,
    with either box geometry (the corrected one once built a tensor from host numbers at every step)."""
    import types

    from test_token_labels import write_token_folder

    import autoprog.classification.token_labels as token_labels

    class Torch(types.ModuleType):  # the module's torch, counting tensors made from host data on a device
        def __getattr__(self, name):
            return getattr(torch, name)

        def tensor(self, *a, **k):  # on a GPU a blocking copy: a sync
            if k.get("device") is not None:
                count_syncs[f"torch.tensor(device=) in {sys._getframe(1).f_code.co_name}"] += 1
            return torch.tensor(*a, **k)

    monkeypatch.setattr(token_labels, "torch", Torch("torch"))
    data = write_token_folder(tmp_path / "data", tmp_path / "maps", per_class=4)
    rc, _, err = cli("pretrain", "--method", "original", "--model", "timm:volo_d1_224", "--img-size", "32",
                     "--token-label-geometry", geometry,
                     "--dataset", data, "--token-labels", tmp_path / "maps", "--subset", "0", "--batch-size", "2",
                     "--epochs", "17", "--eval-samples", "2", "--no-flops", "--workers", "0", "--cpu",
                     "--out", tmp_path / "run")  # 6 steps an epoch: 102 steps
    assert rc == 0, err
    assert sum(count_syncs.values()) <= 102 // CHECK_EVERY + 3, dict(count_syncs)


def test_an_evaluation_and_a_candidates_score_read_the_device_once_each(cli, fake_fmnist, tmp_path, monkeypatch):
    """Top-1 (online and momentum network) and a candidate's plain cross-entropy are summed on the device and read
    once per network, not after every batch (each read waits for the device's queued work)."""
    reads = collections.Counter()
    for name in ("__int__", "__float__", "item"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            reads[sys._getframe(1).f_code.co_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    rc, _, err = cli("pretrain", "--method", "autoprog-one", "--out", tmp_path / "run",
                     *tiny_args(fake_fmnist, epochs="2"), "--search-samples", "192", "--search-min-updates", "0",
                     "--eval-samples", "192")  # 3 batches of 64 at each
    assert rc == 0, err
    res = __import__("json").loads((tmp_path / "run" / "results.json").read_text())
    evaluations, points = len(res["epochs"]), sum(len(s.get("scored_at", ())) for s in res["summary"]["search"])
    assert evaluations >= 2 and points >= 1
    assert reads["evaluate"] <= 2 * evaluations + 2, reads  # (the last evaluation: once more on the whole test set)
    assert reads["plain_cross_entropy"] <= sum(len(s["candidates"]) * len(s.get("scored_at", ()))
                                               for s in res["summary"]["search"]), reads


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "autoprog-zero"])  # the text path frozen, and an SID learning
def test_text_to_image_steps_walk_no_module_tree(method, cli, text_base, fake_fmnist, cache_dir, tmp_path,  # noqa: F811
                                                 count_walks):
    rc, _, err = cli("finetune", "--task", "text-to-image", "--base", text_base, "--method", method, "--steps", "40",
                     "--batch-size", "4", "--image-size", "8", "--eval-points", "1", "--fd-samples", "4",
                     "--curve-samples", "4", "--sample-steps", "2", "--feature-epochs", "1", "--checkpoint-every",
                     "0", "--ema-decay", "0.99", "--cache-dir", cache_dir, "--data-root", fake_fmnist,
                     "--out", tmp_path / "t2i", "--cpu",
                     *(["--proxy-batches", "2", "--proxy-batch-size", "2"] if method == "autoprog-zero" else []))
    assert rc == 0, err
    assert sum(count_walks.values()) <= 4, dict(count_walks)  # the first step's lists (and the text path's)


def test_pretraining_steps_walk_no_module_tree(cli, fake_fmnist, tmp_path, count_walks):
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "run", *tiny_args(fake_fmnist, epochs="4"))
    assert rc == 0, err
    assert sum(count_walks.values()) <= 3, dict(count_walks)
