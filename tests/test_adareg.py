"""Adaptive regularization: strengths scale with the sub-network, and reach the batches and the blocks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ctrl_c_at_step, tiny_args, tiny_vit
from timm.layers import DropPath

from autoprog.classification.adareg import AdaptiveRegularization, AdaRegRanges
from autoprog.space import GrowthSpace, SubNet

SPACE = GrowthSpace(28, 4, 6, 4, 0.5)


def test_strengths_run_from_min_at_the_smallest_subnet_to_max_at_the_full_model():
    reg = AdaptiveRegularization(SPACE)
    small, full = SPACE.subnet(0.5), SPACE.full
    assert reg.fraction(small) == 0.0 and reg.fraction(full) == 1.0
    lo, hi = reg.values(small), reg.values(full)
    r = AdaRegRanges()
    assert (lo.randaug_magnitude, lo.erase_prob, lo.drop_path) == (r.randaug_magnitude[0], r.erase_prob[0], r.drop_path[0])
    assert (hi.randaug_magnitude, hi.erase_prob, hi.drop_path) == (r.randaug_magnitude[1], r.erase_prob[1], r.drop_path[1])
    mid = SubNet(20, 4)
    f = reg.fraction(mid)
    assert 0.0 < f < 1.0
    # linear in size: (patches × depth − smallest) / (full − smallest)
    size = lambda s: (s.resolution // 4) ** 2 * s.depth  # noqa: E731
    assert f == pytest.approx((size(mid) - size(small)) / (size(full) - size(small)))
    assert reg.values(mid).erase_prob == pytest.approx(0.25 * f)


def test_set_subnet_sets_linear_drop_path_over_the_active_blocks_and_the_augment_strengths():
    net = tiny_vit(depth=6)
    reg = AdaptiveRegularization(SPACE, AdaRegRanges(drop_path=(0.0, 0.3)))
    reg.set_subnet(net, SPACE.full)
    rates = [getattr(net.blocks[i].drop_path1, "drop_prob", 0.0) for i in range(6)]
    assert rates == pytest.approx([0.0, 0.06, 0.12, 0.18, 0.24, 0.3])
    assert all(isinstance(net.blocks[i].drop_path2, DropPath) for i in range(1, 6))
    assert reg.erasing.probability == pytest.approx(0.25)
    reg.randaugment(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))  # builds the grayscale RandAugment
    assert all(op.magnitude == pytest.approx(9.0) for op in reg._randaug[1].ops)
    reg.set_subnet(net, SPACE.subnet(0.5))
    assert reg.erasing.probability == 0.0
    assert all(op.magnitude == pytest.approx(4.5) for op in reg._randaug[1].ops)
    assert net.blocks[2].drop_path1.drop_prob == 0.0


def test_randaugment_and_erasing_change_images_but_not_shapes():
    torch.manual_seed(0)
    import random

    random.seed(0)
    reg = AdaptiveRegularization(SPACE)
    reg.set_subnet(tiny_vit(depth=6), SPACE.full)
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    y = reg.randaugment(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert not torch.equal(x, y)
    rgb = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert reg.randaugment(rgb).shape == rgb.shape
    reg.erasing.probability = 1.0
    z = torch.zeros(8, 1, 28, 28)
    assert not torch.equal(reg.erase(z.clone()), z)


def test_pretrain_with_adareg_runs_and_records_it(cli, fake_fmnist, tmp_path):
    out = tmp_path / "adareg"
    rc, _, err = cli("pretrain", "--method", "prog", "--adareg", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["done"] and res["summary"]["adareg"] is True


def test_on_decoded_images_adareg_randaugments_in_the_loader_at_each_stages_magnitude(cli, image_folder, tmp_path,
                                                                                        monkeypatch):
    """ImageFolder data: RandAugment runs where the images are decoded (the loader), each epoch at the magnitude
    of its stage's sub-network, sent with the samples; the trainer does no RandAugment of its own."""
    from autoprog.classification.adareg import AdaptiveRegularization
    from autoprog.data import SeededSamples

    seen, magnitudes, sides = [], [], []
    real_get = SeededSamples.__getitem__

    def recorded(self, item):
        if isinstance(item, tuple):
            seen.append(item[2] if len(item) >= 3 else None)
            out = real_get(self, item)
            magnitudes.append({op.magnitude for op in self.randaugment.ops})
            sides.append((item[3] if len(item) == 4 else None, tuple(out[0].shape[-2:])))
            return out
        return real_get(self, item)

    def host_randaugment(self, x):
        raise AssertionError("decoded images were RandAugmented again by the trainer")

    monkeypatch.setattr(SeededSamples, "__getitem__", recorded)
    monkeypatch.setattr(AdaptiveRegularization, "randaugment", host_randaugment)
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", out, "--subset", "0", "--batch-size", "4",
                     "--epochs", "2", "--num-stages", "2", "--method", "prog", "--adareg", "--embed-dim", "16",
                     "--depth", "4", "--num-heads", "2", "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu",
                     "--loader-resolution", "stage")
    assert rc == 0, err
    per_epoch = len(seen) // 2  # 10 training images, each read once an epoch
    first, last = set(seen[:per_epoch]), set(seen[per_epoch:])
    assert len(first) == 1 and len(last) == 1 and min(first) < max(last) == 9.0  # the full model: Table 14's max
    assert all(m == {s} for m, s in zip(magnitudes, seen))  # the workers' operations at the magnitude sent
    # and each image cropped at its stage's resolution, sent with it (--loader-resolution stage)
    first_sides, last_sides = set(sides[:per_epoch]), set(sides[per_epoch:])
    assert len(first_sides) == 1 and last_sides == {(None, (32, 32))}  # the training size: sent as none
    (side, shape), = first_sides
    assert side < 32 and shape == (side, side)


def test_adareg_on_a_subset_of_decoded_images_resumes_from_an_epochs_last_step_identical(cli, image_folder, tmp_path):
    """A --subset smaller than the folder (a Subset over it) takes the workers' RandAugment too; Ctrl-C at an
    epoch's last step (checkpointed before that epoch's evaluation) resumes into the same epoch records, its
    evaluation with its own stage's sub-network, and the same weights as an uninterrupted run."""

    from safetensors.torch import load_file


    args = ["--dataset", image_folder, "--subset", "8", "--batch-size", "4", "--epochs", "3", "--num-stages", "3",
            "--method", "prog", "--adareg", "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size",
            "4", "--workers", "0", "--no-flops", "--cpu"]
    rc, _, err = cli("pretrain", "--out", tmp_path / "full", *args)
    assert rc == 0, err
    with ctrl_c_at_step(1):  # the last of epoch 1's two steps
        rc, _, err = cli("pretrain", "--out", tmp_path / "run", *args)
        assert rc == 130 and "interrupted at step 2" in err, err
    rc, _, err = cli("pretrain", "--resume", tmp_path / "run", "--cpu")
    assert rc == 0, err
    got, want = (json.loads((tmp_path / r / "results.json").read_text())["epochs"] for r in ("run", "full"))
    fields = ("stage", "resolution", "depth", "train_loss")
    assert [[e[k] for k in fields] for e in got] == [[e[k] for k in fields] for e in want]
    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("run", "full"))
    assert all(torch.equal(a[k], b[k]) for k in b)
