"""The paper's DeiT training recipe through timm (#26, item 10): RandAugment, Mixup/CutMix, random erasing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ctrl_c_at_step, resumes_like_uninterrupted, tiny_args
from safetensors.torch import load_file

from autoprog.classification.recipe import DEIT_RECIPE, TrainingRecipe, check_recipe
from autoprog.classification.trainer import TrainConfig
from autoprog.errors import ConfigError

RECIPE_ARGS = ("--randaugment", DEIT_RECIPE["randaugment"], "--mixup", "0.8", "--cutmix", "1.0",
               "--random-erasing", "0.25")


def test_mixed_batches_train_on_soft_targets_with_the_smoothing_folded_in():
    torch.manual_seed(0)
    recipe = TrainingRecipe(TrainConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 10, True, 28, (0.5,))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    mixed, target = recipe.mix(x.clone(), y)
    assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))
    assert target.min() > 0, "label smoothing gives every class some weight"
    assert not torch.equal(mixed, x)
    logits = torch.randn(8, 10)
    assert torch.isfinite(recipe.loss(logits, target))
    plain = TrainingRecipe(TrainConfig(label_smoothing=0.1), 10, True, 28, (0.5,))
    assert not plain.active and plain.mix(x, y)[1] is y
    assert torch.equal(plain.loss(logits, y), torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))


def test_in_memory_randaugment_and_erasing_change_images_on_their_device():
    import random

    random.seed(0)
    recipe = TrainingRecipe(TrainConfig(randaugment="rand-m9-mstd0.5-inc1", random_erasing=1.0), 10, True, 28,
                            (0.3,))
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    out = recipe.randaugment(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape and not torch.equal(out, x)
    erased = recipe.erase(torch.zeros(6, 1, 28, 28))
    assert (erased != 0).any(), "every image got a random-noise patch (probability 1)"
    decoded = TrainingRecipe(TrainConfig(randaugment="rand-m9"), 10, False, 28, (0.3,))
    assert torch.equal(decoded.randaugment(x), x), "decoded data gets it in the loader workers instead"


def test_imagefolder_randaugment_runs_in_the_workers(image_folder):
    from autoprog.data import load_dataset

    plain, augmented = (load_dataset(str(image_folder), randaugment=ra) for ra in (None, "rand-m9-mstd0.5-inc1"))
    names = [type(t).__name__ for t in augmented.train.transform.transforms]
    assert "RandAugment" in names and "RandAugment" not in [
        type(t).__name__ for t in plain.train.transform.transforms]


def test_what_cannot_run_is_refused_before_training():
    with pytest.raises(ConfigError, match="even --batch-size"):
        check_recipe(TrainConfig(mixup=0.8, batch_size=33), adareg=False)
    with pytest.raises(ConfigError, match="--adareg sets RandAugment"):
        check_recipe(TrainConfig(randaugment="rand-m9"), adareg=True)
    with pytest.raises(ConfigError, match="not a timm RandAugment string"):
        TrainConfig(randaugment="rand-mX").validate()
    check_recipe(TrainConfig(mixup=0.8, batch_size=32), adareg=True)  # mixing and AdaReg do combine


def test_the_cli_refuses_a_bad_recipe_in_one_line(cli, fake_fmnist, tmp_path):
    rc, _, err = cli("pretrain", *tiny_args(fake_fmnist), "--randaugment", "magic", "--out", tmp_path / "x")
    assert rc == 2 and "not a timm RandAugment string" in err and len(err.strip().splitlines()) == 1


def test_the_whole_recipe_trains_and_resumes_mid_epoch_bit_identical(cli, fake_fmnist, tmp_path):
    """RandAugment (host), Mixup/CutMix (numpy's random numbers) and random erasing (Python's): a run stopped
    mid-epoch and resumed ends with the uninterrupted run's weights."""

    args = (*tiny_args(fake_fmnist, epochs="2"), "--method", "prog", *RECIPE_ARGS)
    full, run = tmp_path / "full", tmp_path / "run"
    assert cli("pretrain", *args, "--out", full)[0] == 0
    with ctrl_c_at_step(10):
        assert cli("pretrain", *args, "--out", run)[0] == 130
    rc, _, err = cli("pretrain", "--resume", run)
    assert rc == 0, err
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, full))
    assert [e["train_loss"] for e in got["epochs"]] == [e["train_loss"] for e in want["epochs"]]
    a, b = (load_file(r / "checkpoint" / "model.safetensors") for r in (run, full))
    assert all(torch.equal(a[k], b[k]) for k in b)
    cfg = json.loads((full / "config.json").read_text())["train"]
    assert (cfg["mixup"], cfg["cutmix"], cfg["random_erasing"]) == (0.8, 1.0, 0.25)


def test_a_worker_randaugment_goes_before_the_tensor_conversion_of_a_copy(image_folder):
    from autoprog.data import EpochSampler, load_dataset, randaugment_transform

    ra = randaugment_transform("rand-m9-n2-mstd0.5", 32, (0.5, 0.5, 0.5))
    for subset in (None, 4):  # a --subset smaller than the folder wraps it in a Subset
        data = load_dataset(str(image_folder), subset=subset)
        folder = data.train if subset is None else data.train.dataset
        before = list(folder.transform.transforms)
        added = data.with_worker_randaugment(ra)
        assert folder.transform.transforms == before and data.worker_randaugment is None  # the bundle kept
        new = added.train if subset is None else added.train.dataset
        names = [type(t).__name__ for t in new.transform.transforms]
        assert names[-2:] == ["RandAugment", "PILToTensor"] and added.worker_randaugment is ra
        assert len(added.train) == (10 if subset is None else 4)
    sampler = EpochSampler(4, seed=0, keyed=True)
    assert all(len(item) == 2 for item in sampler)
    sampler.magnitude = 4.5
    assert [item[2] for item in sampler] == [4.5] * 4
    with pytest.raises(ValueError, match="in-memory"):
        load_dataset("digits").with_worker_randaugment(ra)


@pytest.mark.parametrize("config, name, level", [("rand-m9-mstd0.5-inc1", "PosterizeIncreasing", 10.0),
                                                 ("rand-m9-n2-mstd0.5", "Posterize", 2.0)])
def test_posterize_to_no_bits_gives_a_black_image_not_an_error(config, name, level):
    """The levels where timm asks Pillow to keep 0 bits (which Pillow 10+ refuses): a black image, as before."""
    from PIL import Image

    from autoprog.data import rand_augment

    transform = rand_augment(config, {"translate_const": 10, "img_mean": (128, 128, 128)})
    op = next(o for o in transform.ops if o.name == name)
    op.prob, op.magnitude, op.magnitude_std = 1.0, level, 0.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5.0  # other levels keep some bits, as timm does
    assert np.asarray(op(img)).max() > 0


def test_repeated_augmentation_draws_each_image_n_times_in_a_row_each_copy_keyed_apart():
    """DeiT's RASampler: the epoch keeps its length and draws the first size/N images of the permutation, each N
    times in a row; a keyed copy c gets the epoch key plus c strides (its own augmentations); a resumed epoch
    skips into the same list; one repeat is the plain order."""
    from autoprog.data import REPEAT_KEY_STRIDE, EpochSampler

    plain = EpochSampler(10, seed=3)
    plain.begin_epoch(2)
    perm = list(plain)
    rep = EpochSampler(10, seed=3, repeats=3)
    rep.begin_epoch(2)
    assert list(rep) == [i for i in perm[:4] for _ in range(3)][:10] and len(rep) == 10
    keyed = EpochSampler(10, seed=3, keyed=True, repeats=3)
    keyed.begin_epoch(2)
    items = list(keyed)
    key = 3 + 2
    assert items[:3] == [(key + c * REPEAT_KEY_STRIDE, perm[0]) for c in range(3)]
    keyed.begin_epoch(2, skip=4)
    assert list(keyed) == items[4:] and len(keyed) == 6
    keyed.resolution = 16
    keyed.begin_epoch(2)
    assert [(k, i) for k, i, _m, _r in keyed] == items
    one = EpochSampler(10, seed=3, keyed=True)
    one.begin_epoch(2)
    assert list(one) == [(key, i) for i in perm]
    with pytest.raises(ValueError, match="at least 1"):
        EpochSampler(10, seed=3, repeats=0)
    # torch and numpy seed from a seed's low 32 bits: no copy of an image shares them with another copy or epoch
    seeds = {((5 + e + c * REPEAT_KEY_STRIDE) * 1_000_003 + 7) % (2**63 - 1) % 2**32 for e in range(2000)
             for c in range(64)}
    assert len(seeds) == 2000 * 64


def test_repeated_copies_of_a_decoded_image_are_augmented_apart(image_folder):
    from autoprog.data import EpochSampler, load_dataset

    bundle = load_dataset(str(image_folder), image_size=16)
    sampler = EpochSampler(len(bundle.train), seed=0, keyed=True, repeats=3)
    x, y = next(iter(bundle.loader("train", 3, sampler=sampler)))
    assert y.tolist() == [y[0].item()] * 3, "one image, three times"
    assert not torch.equal(x[0], x[1]) or not torch.equal(x[1], x[2]), "each copy cropped and flipped on its own"


def test_the_deit_preset_sets_the_papers_whole_recipe():
    from autoprog.cli.config import load_preset

    options = load_preset("deit-s-paper")["options"]
    assert {k: options.get(k) for k in DEIT_RECIPE} == DEIT_RECIPE


def test_repeated_augmentation_trains_and_resumes_mid_epoch_identical(cli, image_folder, tmp_path):
    """ImageFolder data (each copy keyed apart in the workers' transforms), stopped mid-epoch and resumed: the
    uninterrupted run's weights."""
    args = ["--dataset", image_folder, "--subset", "8", "--batch-size", "2", "--epochs", "2", "--num-stages", "2",
            "--method", "prog", "--aug-repeats", "3", "--embed-dim", "16", "--depth", "4", "--num-heads", "2",
            "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu"]
    _, full = resumes_like_uninterrupted(cli, tmp_path, args, step=2)
    assert json.loads((full / "config.json").read_text())["train"]["aug_repeats"] == 3
