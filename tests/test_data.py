"""Datasets: (fake) Fashion-MNIST, scikit-learn digits, ImageFolder; DataError messages; augmentation."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAKE_TEST, FAKE_TRAIN, make_fake_fashion_mnist, resumes_like_uninterrupted, write_idx_gz

from autoprog.data import DataBundle, TensorImages, load_dataset, load_digits, load_fashion_mnist
from autoprog.errors import DataError

FIX = "apt-get install dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _band_label(images: torch.Tensor) -> torch.Tensor:
    """Recover the label the fake data encodes: the row of the bright band (row 2 + 2.5·c)."""
    rows = (images[:, 0, :, 4:24] >= 200).all(dim=-1)  # (N, 28) rows fully lit
    first = rows.float().argmax(dim=-1)
    return torch.round((first - 2) / 2.5).long()


def _assert_fix_message(err: pytest.ExceptionInfo):
    msg = str(err.value)
    assert FIX in msg and "--data-root" in msg, msg


# ------------------------------------------------------------------------------------ Fashion-MNIST
def test_fake_fashion_mnist_loads(fake_fmnist):
    b = load_dataset("fashion-mnist", str(fake_fmnist))
    assert b.name == "fashion-mnist"
    assert (b.num_classes, b.in_chans, b.image_size) == (10, 1, 28)
    assert len(b.train) == FAKE_TRAIN and len(b.test) == FAKE_TEST
    for ds in (b.train, b.test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 28, 28)
        assert ds.labels.dtype == torch.int64
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    # labels belong to their images
    assert torch.equal(_band_label(b.test.images), b.test.labels)
    assert torch.equal(_band_label(b.train.images), b.train.labels)
    assert b.in_memory


def test_fashion_mnist_name_variants(fake_fmnist):
    for name in ("Fashion_MNIST", "fashionmnist"):
        assert load_dataset(name, str(fake_fmnist)).name == "fashion-mnist"


def test_subset_is_a_fixed_random_sample_with_matching_labels(fake_fmnist):
    a = load_dataset("fashion-mnist", str(fake_fmnist), subset=100)
    b = load_dataset("fashion-mnist", str(fake_fmnist), subset=100)
    c = load_dataset("fashion-mnist", str(fake_fmnist), subset=100, seed=1)
    assert len(a.train) == 100 and len(a.test) == FAKE_TEST, "subset applies to the training set only"
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.labels, c.train.labels)
    assert torch.equal(_band_label(a.train.images), a.train.labels)
    full = load_dataset("fashion-mnist", str(fake_fmnist))
    assert not torch.equal(a.train.images, full.train.images[:100]), "a random sample, not the first images"
    assert len(load_dataset("fashion-mnist", str(fake_fmnist), subset=10 ** 6).train) == FAKE_TRAIN


def test_invalid_subset_raises(fake_fmnist):
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", str(fake_fmnist), subset=0)


def test_a_copy_of_any_size_loads(tmp_path):
    """Not only the official 60000/10000 split sizes: a well-formed smaller copy loads as it is."""
    b = load_fashion_mnist(make_fake_fashion_mnist(tmp_path / "tiny", 50, 20))
    assert len(b.train) == 50 and len(b.test) == 20


def test_empty_split_raises(tmp_path):
    root = make_fake_fashion_mnist(tmp_path / "empty", 50, 20)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / name).unlink()
    write_idx_gz(root / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx_gz(root / "t10k-labels-idx1-ubyte.gz", np.zeros((0,), dtype=np.uint8))
    with pytest.raises(DataError):
        load_fashion_mnist(root)


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", str(tmp_path / "nonexistent"))
    _assert_fix_message(err)


def test_missing_file_names_the_fix(fake_fmnist, tmp_path):
    root = _linked_copy(fake_fmnist, tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    _assert_fix_message(err)
    assert "t10k-labels-idx1-ubyte" in str(err.value)


def test_uncompressed_files_are_read_too(fake_fmnist, tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for f in FILES:
        with gzip.open(fake_fmnist / f) as src:
            (root / f.removesuffix(".gz")).write_bytes(src.read())
    b = load_fashion_mnist(root)
    assert len(b.train) == FAKE_TRAIN


def _linked_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in FILES:
        os.symlink(src / f, dst / f)
    return dst


def _replace(root: Path, name: str, raw: bytes, compress: bool = True):
    (root / name).unlink()
    if compress:
        with gzip.open(root / name, "wb", compresslevel=1) as f:
            f.write(raw)
    else:
        (root / name).write_bytes(raw)


def _raw(root: Path, name: str) -> bytes:
    with gzip.open(root / name) as f:
        return f.read()


@pytest.mark.parametrize("case", ["bad_magic", "wrong_ndim", "short_header", "missing_data", "extra_data",
                                  "label_count"])
def test_malformed_files_raise_data_error(fake_fmnist, tmp_path, case):
    root = _linked_copy(fake_fmnist, tmp_path / case)
    labels = _raw(fake_fmnist, "t10k-labels-idx1-ubyte.gz")
    images = _raw(fake_fmnist, "t10k-images-idx3-ubyte.gz")
    if case == "bad_magic":
        _replace(root, "t10k-labels-idx1-ubyte.gz", b"\x12\x34" + labels[2:])
    elif case == "wrong_ndim":  # an image file where labels belong
        _replace(root, "t10k-labels-idx1-ubyte.gz", images)
    elif case == "short_header":
        _replace(root, "t10k-images-idx3-ubyte.gz", images[:7])
    elif case == "missing_data":  # header says 100 images, fewer bytes follow
        _replace(root, "t10k-images-idx3-ubyte.gz", images[: len(images) // 2])
    elif case == "extra_data":
        _replace(root, "t10k-images-idx3-ubyte.gz", images + b"\x00" * 784)
    elif case == "label_count":  # consistent file, but one label fewer than images
        y = np.frombuffer(labels, dtype=np.uint8, offset=8)[:-1]
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        write_idx_gz(root / "t10k-labels-idx1-ubyte.gz", y)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    _assert_fix_message(err)


def test_bad_magic_message_says_what_is_wrong(fake_fmnist, tmp_path):
    root = _linked_copy(fake_fmnist, tmp_path / "m")
    labels = _raw(fake_fmnist, "train-labels-idx1-ubyte.gz")
    _replace(root, "train-labels-idx1-ubyte.gz", struct.pack(">HBB", 0, 0x0D, 1) + labels[4:])
    with pytest.raises(DataError, match="not an IDX uint8 file"):
        load_fashion_mnist(root)


def test_not_gzip_data_with_gz_name_raises_data_error(fake_fmnist, tmp_path):
    root = _linked_copy(fake_fmnist, tmp_path / "notgz")
    _replace(root, "t10k-labels-idx1-ubyte.gz", b"this is not gzip data at all", compress=False)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    _assert_fix_message(err)


def test_truncated_gzip_file_raises_data_error(fake_fmnist, tmp_path):
    root = _linked_copy(fake_fmnist, tmp_path / "trunc")
    raw = (fake_fmnist / "t10k-labels-idx1-ubyte.gz").read_bytes()
    _replace(root, "t10k-labels-idx1-ubyte.gz", raw[: len(raw) // 2], compress=False)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(root)
    _assert_fix_message(err)


def test_unknown_dataset_raises(tmp_path):
    """A name that is none of the built-in ones is unknown; a path that is not there, or not a folder, says so
    (both tasks)."""
    from autoprog.diffusion.data import load_diffusion_data

    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar-1000")
    (tmp_path / "file.txt").write_text("x")
    for load in (load_dataset, lambda p: load_diffusion_data(p, classes=None)):
        with pytest.raises(DataError, match="nonexist: no such directory"):
            load(str(tmp_path / "nonexist"))
        with pytest.raises(DataError, match="file.txt: not a directory"):
            load(str(tmp_path / "file.txt"))


def test_16_bit_greyscale_images_are_read_by_their_top_byte(tmp_path):
    """PIL converts a 16-bit greyscale PNG to RGB by clipping at 255: a 0-65535 ramp came out nearly all white."""
    from PIL import Image

    from autoprog.data import read_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x = np.asarray(read_image(tmp_path / "deep.png"))
    assert x.shape == (4, 64, 3) and np.array_equal(x[..., 0], (ramp >> 8).astype(np.uint8))
    Image.fromarray(np.full((4, 4), 200, np.int32), mode="I").save(tmp_path / "eight.tif")
    assert np.asarray(read_image(tmp_path / "eight.tif")).max() == 200, "32-bit storage of 8-bit values kept"


# ----------------------------------------------------------------------------------------- digits
def test_digits_loads():
    b = load_digits()
    assert b.name == "digits" and (b.num_classes, b.in_chans, b.image_size) == (10, 1, 8)
    assert len(b.train) == 1437 and len(b.test) == 360
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape[1:] == (1, 8, 8)
    assert int(b.train.images.max()) == 255 and int(b.train.images.min()) == 0
    assert set(b.train.labels.tolist()) == set(range(10)) == set(b.test.labels.tolist())
    # stratified: every class appears in the test split in roughly its share
    counts = torch.bincount(b.test.labels, minlength=10)
    assert int(counts.min()) >= 30
    assert load_dataset("digits", subset=100).train.images.shape == (100, 1, 8, 8)


# ------------------------------------------------------------------------------------ ImageFolder
def test_image_folder_loads_and_batches(image_folder):
    b = load_dataset(str(image_folder))
    assert b.name == "shapes"
    assert (b.num_classes, b.in_chans, b.image_size) == (2, 3, 32)
    assert len(b.train) == 10 and len(b.test) == 4
    assert not b.in_memory
    x, y = next(iter(b.loader("train", 4, shuffle=True)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8, "batches travel as uint8"
    assert set(y.tolist()) <= {0, 1}
    prepared = b.prepare(x, train=True)
    mean, std = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    assert prepared.dtype == torch.float32
    assert torch.allclose(prepared, (x.float() / 255 - mean) / std), "normalised where prepared, not cropped again"
    xt, yt = next(iter(b.loader("test", 4, shuffle=False)))
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [0, 0, 1, 1]


def test_image_folder_by_name_and_size(image_folder):
    b = load_dataset("imagefolder", str(image_folder), image_size=16)
    x, _ = next(iter(b.loader("test", 2, shuffle=False)))
    assert x.shape == (2, 3, 16, 16)
    with pytest.raises(DataError):
        load_dataset("imagefolder", None)


def test_loader_workers_fit_the_shared_memory_their_batches_pass_through(image_folder, monkeypatch, capsys):
    """Workers hand batches over through /dev/shm; a container's default 64 MB fits few batches of 224-px images, and
    a worker that finds it full dies of a bus error mid-run. The loader takes as many workers as fit, saying so."""
    from collections import namedtuple

    import autoprog.data as data_mod

    usage = namedtuple("usage", "total used free")
    b = load_dataset(str(image_folder))  # 32-px RGB: a batch of 100 is 300 kB
    batch = 100 * 3 * 32 * 32
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert b.loader("train", 100, num_workers=4).num_workers == 4 and capsys.readouterr().err == ""
    free = int((2 * 3 + 2) * batch / 0.8) + 1  # three workers' batches, two ahead each, and two on their way: no more
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: usage(free, 0, free))
    assert b.loader("train", 100, num_workers=4).num_workers == 3
    err = capsys.readouterr().err
    assert "/dev/shm has 2.9 MB free" in err and "batches of 0.3 MB" in err and "using 3" in err and "--shm-size" in err
    assert b.loader("test", 100, num_workers=4, size=64).num_workers == 0  # 4 times the pixels: none fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share the space: half each
    free = int((2 * 3 + 2) * batch / 0.8) * 2 + 2
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: usage(free, 0, free))
    assert b.loader("train", 100, num_workers=4).num_workers == 3 and "for each of 2 processes" in capsys.readouterr().err
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    assert b.loader("train", 100, num_workers=4).num_workers == 4  # no such folder: as asked


def test_image_folder_test_split_name(image_folder):
    (image_folder / "val").rename(image_folder / "test")
    assert len(load_dataset(str(image_folder)).test) == 4


def test_an_image_folder_reads_gifs_and_says_which_files_it_skips(image_folder, capsys):
    """A GIF is an image (its first frame); a file of another kind is skipped with one warning naming it and the
    kinds read (before, silently); hidden files (.DS_Store) are skipped without one."""
    from PIL import Image

    from autoprog.errors import forget_warnings

    forget_warnings()
    Image.new("P", (20, 20)).save(image_folder / "train" / "circle" / "x.gif")
    (image_folder / "train" / "circle" / "notes.txt").write_text("not an image")
    (image_folder / "train" / "square" / ".DS_Store").write_bytes(b"\0")
    assert len(load_dataset(str(image_folder)).train) == 11
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "1 file(s) not read" in err and "circle/notes.txt" in err and ".gif" in err


def test_directory_without_train_raises(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="ImageFolder"):
        load_dataset(str(tmp_path))


def test_directory_without_val_raises(image_folder):
    import shutil

    shutil.rmtree(image_folder / "val")
    with pytest.raises(DataError):
        load_dataset(str(image_folder))


def test_image_folder_with_mismatched_classes_raises(image_folder):
    (image_folder / "val" / "square").rename(image_folder / "val" / "triangle")
    with pytest.raises(DataError, match="different class"):
        load_dataset(str(image_folder))


# -------------------------------------------------------------------------------- batches & prepare
def _bundle(n=64):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    ds = TensorImages(images, labels)
    return DataBundle("rand", ds, ds, 10, 1, 28, (0.5,), (0.25,))


def test_prepare_eval_normalises():
    b = _bundle()
    x = b.train.images[:8]
    out = b.prepare(x, train=False)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    assert torch.equal(b.prepare(out, train=False), out), "float input passes through"


def test_prepare_train_augments_but_keeps_shape():
    b = _bundle()
    x = b.train.images[:32]
    plain = b.prepare(x, train=False)
    aug1 = b.prepare(x, train=True, generator=torch.Generator().manual_seed(0))
    aug2 = b.prepare(x, train=True, generator=torch.Generator().manual_seed(0))
    aug3 = b.prepare(x, train=True, generator=torch.Generator().manual_seed(1))
    assert aug1.shape == plain.shape == (32, 1, 28, 28)
    assert torch.equal(aug1, aug2), "augmentation is reproducible from the generator"
    assert not torch.equal(aug1, aug3)
    changed = [not torch.equal(aug1[i], plain[i]) for i in range(32)]
    assert sum(changed) >= 16, "most images get shifted or flipped"
    # augmentation only moves pixels (and pads with black): values stay in the normalised range
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert float(aug1.min()) >= lo - 1e-6 and float(aug1.max()) <= hi + 1e-6


def test_prepare_translation_is_within_pad():
    b = _bundle()
    b.hflip, b.pad = False, 2
    x = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 13, 13] = 255  # one bright pixel in the middle
    aug = b.prepare(x, train=True, generator=torch.Generator().manual_seed(0))
    hi = (1 - 0.5) / 0.25
    for img in aug:
        pos = (img[0] == hi).nonzero()
        assert len(pos) == 1
        r, c = pos[0].tolist()
        assert abs(r - 13) <= 2 and abs(c - 13) <= 2


def test_loader_batches_and_limit():
    b = _bundle(64)
    batches = list(b.loader("train", 10, shuffle=True, seed=0, drop_last=True))
    assert len(batches) == 6 and all(x.shape == (10, 1, 28, 28) and y.shape == (10,) for x, y in batches)
    again = list(b.loader("train", 10, shuffle=True, seed=0, drop_last=True))
    assert all(torch.equal(a[1], c[1]) for a, c in zip(batches, again)), "same seed, same order"
    other = list(b.loader("train", 10, shuffle=True, seed=1, drop_last=True))
    assert not all(torch.equal(a[1], c[1]) for a, c in zip(batches, other))
    limited = list(b.loader("test", 8, shuffle=False, limit=20))
    assert sum(len(y) for _, y in limited) == 20


def test_tensor_images_validates():
    with pytest.raises(DataError):
        TensorImages(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(DataError):
        TensorImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))


def test_the_plain_training_split_is_never_randomly_transformed(image_folder):
    from autoprog.data import load_dataset

    data = load_dataset(str(image_folder), image_size=16, subset=6)
    passes = [torch.cat([x for x, _ in data.loader(split, 3, shuffle=False)]) for split in ("train_plain",) * 2]
    assert torch.equal(*passes), "searches score candidates on the same images every time"
    assert len(data.train_plain) == len(data.train) == 6
    assert [data.train[i][1] for i in range(6)] == [data.train_plain[i][1] for i in range(6)], "the same images"


# ------------------------------------------------------------------------------- loader built once
def test_epoch_sampler_replays_the_shuffling_loader_it_replaces():
    """The order of epoch e is the one ``DataLoader(shuffle=True, generator=seed + e)`` drew, so runs made before
    the loader was built once replay exactly; a skip drops the trained prefix without reading it."""
    from torch.utils.data import DataLoader

    from autoprog.data import EpochSampler

    data = list(range(103))
    sampler = EpochSampler(103, seed=7919 * 3)
    for epoch in (0, 1, 5):
        old = DataLoader(data, batch_size=10, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(7919 * 3 + epoch))
        sampler.begin_epoch(epoch)
        new = DataLoader(data, batch_size=10, drop_last=True, sampler=sampler)
        flat = [int(v) for batch in new for v in batch]
        assert flat == [int(v) for batch in old for v in batch]
        sampler.begin_epoch(epoch, skip=30)
        assert [int(v) for batch in new for v in batch] == flat[30:]
        assert len(new) == 7
    sampler.begin_epoch(1)
    first = list(sampler)
    sampler.begin_epoch(2)
    assert list(sampler) != first, "every epoch has its own order"


def test_image_folder_augmentation_does_not_depend_on_workers_or_resume(image_folder):
    """Each image's random crop and flip follow from the seed, the epoch and the image: the same batches with 0
    or 2 workers, across rebuilt loaders (a resumed run), and another epoch crops differently."""
    b = load_dataset(str(image_folder))

    def epoch_batches(epoch, workers, skip=0):
        sampler = b.epoch_sampler(seed=11)
        sampler.begin_epoch(epoch, skip=skip)
        loader = b.loader("train", 2, drop_last=True, num_workers=workers, sampler=sampler)
        return [x for x, _ in loader]

    main = epoch_batches(1, 0)
    assert all(torch.equal(a, c) for a, c in zip(main, epoch_batches(1, 2), strict=True))
    assert all(torch.equal(a, c) for a, c in zip(main[2:], epoch_batches(1, 0, skip=4), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(main, epoch_batches(2, 0), strict=True))
    import random

    import numpy as np

    state, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    epoch_batches(3, 0)
    assert torch.equal(torch.get_rng_state(), state), "seeding an image leaves the training process's stream alone"
    assert random.getstate() == py and np.random.get_state()[1].tolist() == npy[1].tolist()


def test_imagefolder_randaugment_is_seeded_per_image_too(image_folder):
    """timm's RandAugment picks operations with numpy and magnitudes with Python's random: seeded per image as
    well, so 0 and 2 workers give the same batches with it."""
    b = load_dataset(str(image_folder), randaugment="rand-m9-mstd0.5-inc1")

    def epoch_batches(workers):
        sampler = b.epoch_sampler(seed=3)
        sampler.begin_epoch(1)
        return [x for x, _ in b.loader("train", 2, drop_last=True, num_workers=workers, sampler=sampler)]

    assert all(torch.equal(a, c) for a, c in zip(epoch_batches(0), epoch_batches(2), strict=True))


def test_persistent_workers_serve_every_epoch_of_one_loader(image_folder):
    """The training loader is built once: the next epoch's order reaches the same (persistent) workers."""
    b = load_dataset(str(image_folder))
    sampler = b.epoch_sampler(seed=5)
    loader = b.loader("train", 5, drop_last=True, num_workers=1, sampler=sampler)
    labels = []
    for epoch in range(3):
        sampler.begin_epoch(epoch)
        labels.append([y.tolist() for _, y in loader])
    assert loader._iterator is not None and loader.persistent_workers
    orders = [sum(e, []) for e in labels]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and len({tuple(o) for o in orders}) > 1


def test_default_workers_leaves_a_core_for_training(monkeypatch):
    from autoprog import data as data_mod

    for cores, expect in ((1, 0), (2, 1), (16, 8), (4, 3)):
        monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert data_mod.default_workers() == expect
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight processes launched on a 16-core machine share its cores
    monkeypatch.setattr(data_mod.os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert data_mod.default_workers() == 1


def test_a_tensor_already_on_the_device_is_not_copied_again():
    from autoprog.data import to_device

    t = torch.arange(4)
    assert to_device(t, t.device) is t


def test_in_memory_data_moves_to_the_device_once_and_is_never_pinned():
    b = load_dataset("digits")
    images = b.train.images
    assert b.to("cpu").train.images is images, "already there: nothing copied"
    loader = b.loader("train", 8, shuffle=True, pin_memory=True)
    assert not loader.pin_memory or b.device.type == "cpu"


def test_image_folder_test_images_at_another_size(image_folder):
    b = load_dataset(str(image_folder), image_size=16)
    x, _ = next(iter(b.loader("test", 4, size=24)))
    assert tuple(x.shape[-2:]) == (24, 24) and x.dtype == torch.uint8, "cropped at the evaluation size"
    assert tuple(next(iter(b.loader("test", 4)))[0].shape[-2:]) == (16, 16)
    mem = load_digits()
    assert mem.test_at(24) is mem.test, "in-memory images are resized by the model"


def test_imagefolder_training_crops_take_the_official_scale_or_the_one_given(image_folder, tmp_path):
    """RandomResizedCrop's smallest area fraction: 0.08 (timm's, DeiT's and the official code's) unless
    ``--crop-scale`` says otherwise; the run's data is built with it."""
    from autoprog.classification.runner import RunSpec, build_run
    from autoprog.classification.trainer import TrainConfig
    from autoprog.data import load_dataset

    assert load_dataset(str(image_folder)).worker_crop.scale == (0.08, 1.0)
    assert load_dataset(str(image_folder), crop_scale=0.5).worker_crop.scale == (0.5, 1.0)
    spec = RunSpec(dataset=str(image_folder), embed_dim=16, depth=4, num_heads=2, patch_size=4,
                   train=TrainConfig(crop_scale=0.25))
    assert build_run(spec)[0].worker_crop.scale == (0.25, 1.0)


@pytest.mark.parametrize("where", [None, "stage", "full"])
def test_decoded_training_images_are_cropped_at_the_stages_resolution_in_the_workers(where, cli, image_folder,
                                                                                     tmp_path, monkeypatch):
    """``--loader-resolution stage``: the loader workers crop ImageFolder images at the stage's side; ``full`` (the
    default, as the official code's stage loaders crop at 224) crops at the training size and the model resizes on
    the device. The model sees the stage's resolution either way."""
    from autoprog.classification.trainer import Trainer

    batches, inputs = [], []
    real_step = Trainer._train_step

    def recorded(self, batch):
        batches.append(tuple(batch[0].shape[-2:]))
        hook = self.net.register_forward_pre_hook(lambda m, a: inputs.append(self.net.subnet.resolution))
        try:
            return real_step(self, batch)
        finally:
            hook.remove()

    monkeypatch.setattr(Trainer, "_train_step", recorded)
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", tmp_path / "r", "--subset", "0", "--batch-size",
                     "4", "--epochs", "2", "--num-stages", "2", "--method", "prog", "--embed-dim", "16", "--depth", "4",
                     "--num-heads", "2", "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu",
                     *(["--loader-resolution", where] if where else []))
    assert rc == 0, err
    half = len(batches) // 2  # 2 steps an epoch, one epoch a stage
    assert inputs[:half] != inputs[half:] and inputs[half:] == [32] * half
    if where == "stage":
        assert batches == [(r, r) for r in inputs]
    else:
        assert batches == [(32, 32)] * len(batches)


def test_stage_crops_resume_a_checkpoint_at_a_stages_end_within_an_epoch_identical(cli, image_folder, tmp_path):
    """Stages here begin within epochs (at steps 3 and 5 of 8, 4 an epoch), where a checkpoint is taken. Resumed
    from one, the epoch's samples carry the side and magnitude the epoch began with, and the due stage is entered
    at its step, as in the uninterrupted run (entered early, AutoProg-Zero's search drew from a random stream that
    the restored one then replaced): the same weights."""



    args = ["--dataset", image_folder, "--subset", "8", "--batch-size", "2", "--epochs", "2", "--num-stages", "3",
            "--method", "autoprog-zero", "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size", "4",
            "--workers", "0", "--no-flops", "--cpu", "--loader-resolution", "stage", "--time-source", "flops",
            "--proxy-batches", "2", "--proxy-batch-size", "2"]
    # Ctrl-C at stage 1's last step: the checkpoint is stage 2's start, within epoch 1
    _, full = resumes_like_uninterrupted(cli, tmp_path, args, step=2)
    starts = [s["step"] for s in json.loads((full / "results.json").read_text())["stages"]]
    assert starts == [0, 3, 5]


def test_an_epochs_crop_side_is_never_smaller_than_a_step_of_it_trains_at():
    """``--loader-resolution stage``: the running stage's side as it was entered (a supernet phase's largest
    candidate's); with a later stage beginning within the epoch, the largest side decided for it, or the training
    size (None) while it is not decided; the training size is sent as None."""
    from types import SimpleNamespace

    from autoprog.classification.trainer import Trainer
    from autoprog.space import SubNet

    chosen = {1: SubNet(24, 3)}
    t = SimpleNamespace(_stage_resolution=16, net=SimpleNamespace(subnet=SubNet(20, 2)), steps_per_epoch=4,
                        data=SimpleNamespace(image_size=32),
                        controller=SimpleNamespace(stage_starts=lambda: [0, 6, 9], decided=chosen.get))
    side = Trainer._epoch_crop_side
    assert side(t, 0) == 16  # steps 0-3: stage 1 alone, at the side it entered with (not the last candidate's 20)
    assert side(t, 4) == 24  # steps 4-7: stage 2 begins at 6 and is decided
    assert side(t, 8) is None  # steps 8-11: stage 3 begins at 9, not decided yet: the training size
    chosen[2] = SubNet(32, 4)
    assert side(t, 8) is None  # decided at the training size: sent as none
    t._stage_resolution = None  # (a checkpoint from before the stage's side was kept)
    assert side(t, 0) == 20


def test_stage_crops_asked_for_in_memory_data_are_said_to_change_nothing(cli, fake_fmnist, tmp_path):
    """``--loader-resolution stage`` says once that in-memory data has no crops; the default says nothing."""
    from conftest import tiny_args

    from autoprog.classification.trainer import _warn_once

    _warn_once.cache_clear()  # (once per process: another test may have said it)
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "d", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0 and "--loader-resolution" not in err, err
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "r", "--loader-resolution", "stage",
                     *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    assert "--loader-resolution stage crops ImageFolder images in the loader workers" in err and "held in memory" in err


def test_imagefolder_training_crops_resample_as_the_official_code(image_folder):
    """``--train-interpolation random`` (the official default): each image's crop is resampled bilinearly or
    bicubically, drawn per image after its box, so each seeded sample equals the one or the other fixed choice's,
    and both occur; the box itself does not depend on the choice."""
    from autoprog.data import SeededSamples

    ds = {mode: SeededSamples(load_dataset(str(image_folder), image_size=40, interpolation=mode).train)
          for mode in ("random", "bilinear", "bicubic")}
    picked = []
    for i in range(24):
        x = {mode: d[(7 + i, i % 10)][0] for mode, d in ds.items()}
        assert not torch.equal(x["bilinear"], x["bicubic"]), "a textured image enlarged resamples differently"
        same = [m for m in ("bilinear", "bicubic") if torch.equal(x["random"], x[m])]
        assert len(same) == 1, "the random crop is one of the fixed ones, box for box"
        picked += same
    assert {"bilinear", "bicubic"} <= set(picked)


def test_imagefolder_evaluation_crops_follow_the_models_crop_fraction(image_folder, tmp_path):
    """Evaluation images are resized to floor(side / crop_pct) and centre-cropped with the model's resampling
    (timm's eval transform, as the official code): a crop of 1.0 keeps an image's border, 0.5 only its centre;
    the run takes the model's fraction (VOLO-D1 0.96, the built-in ViT 0.9) unless ``--eval-crop-pct`` says."""
    from PIL import Image

    from autoprog.classification.runner import eval_crop
    from autoprog.classification.trainer import TrainConfig
    from autoprog.data import EvalCrop

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "framed" / split / cls
            d.mkdir(parents=True)
            arr = np.zeros((32, 32, 3), np.uint8)
            arr[:4], arr[-4:], arr[:, :4], arr[:, -4:] = 255, 255, 255, 255  # a white frame
            Image.fromarray(arr).save(d / "0.png")
    root = str(tmp_path / "framed")
    whole = load_dataset(root, image_size=32, eval_crop=EvalCrop(1.0, "bilinear")).test[0][0]
    centre = load_dataset(root, image_size=32, eval_crop=EvalCrop(0.5, "bicubic")).test[0][0]
    assert whole[:, 0].float().mean() > 200 and centre[:, 0].float().mean() < 10
    plain = load_dataset(root, image_size=32, eval_crop=EvalCrop(0.5, "bicubic")).train_plain[0][0]
    assert torch.equal(plain, centre), "searches score the training images cropped as the test images"
    at = load_dataset(root, image_size=16, eval_crop=EvalCrop(0.5, "bicubic")).test_at(32)[0][0]
    assert torch.equal(at, centre), "another evaluation size keeps the crop"
    assert eval_crop(TrainConfig(), "timm:volo_d1_224") == EvalCrop(0.96, "bicubic")
    assert eval_crop(TrainConfig(), "vit") == EvalCrop(0.9, "bicubic")
    assert eval_crop(TrainConfig(eval_crop_pct=0.8, eval_interpolation="bilinear"), "vit") == EvalCrop(0.8, "bilinear")
    assert eval_crop(TrainConfig(), "timm:deit3_small_patch16_224", {"crop_pct": 1.0}).crop_pct == 1.0, \
        "a checkpoint's own configuration first"


def test_runs_saved_before_the_official_crops_keep_their_own(image_folder):
    """A run saved before ``--train-interpolation`` keeps what it ran (``legacy``): torchvision's bilinear crop,
    RandAugment's resampling drawn, evaluation images resized to 1.14x bilinearly (300 px: 342 by timm's rule at
    1/1.14, 341 as then)."""
    from PIL import Image
    from torchvision import transforms

    from autoprog.classification.runner import RunSpec
    from autoprog.data import _test_transform

    old = RunSpec().to_dict()
    for key in ("train_interpolation", "eval_crop_pct", "eval_interpolation"):
        del old["train"][key]
    assert RunSpec.from_dict(old).train.train_interpolation == "legacy"
    from autoprog.classification.runner import eval_crop
    from autoprog.classification.trainer import TrainConfig
    from autoprog.errors import ConfigError

    with pytest.raises(ConfigError, match="legacy evaluates as"):  # an evaluation crop it would not read
        eval_crop(TrainConfig(train_interpolation="legacy", eval_crop_pct=0.9), "vit")
    b = load_dataset(str(image_folder), image_size=16, interpolation="legacy", randaugment="rand-m9-mstd0.5-inc1")
    assert type(b.worker_crop) is transforms.RandomResizedCrop and b.worker_crop.interpolation.value == "bilinear"
    assert b.randaugment_interpolation == "random"
    img = Image.fromarray((np.random.default_rng(0).random((400, 420, 3)) * 255).astype(np.uint8))
    then = transforms.Compose([transforms.Resize(341), transforms.CenterCrop(300), transforms.PILToTensor()])
    assert torch.equal(_test_transform(300, None)(img), then(img))


def test_randaugment_resamples_as_the_training_crop():
    """timm's rule: an explicit training interpolation reaches RandAugment's geometric operations; ``random``
    leaves them drawing bilinear or bicubic per operation."""
    from PIL import Image

    from autoprog.data import randaugment_transform

    fixed = randaugment_transform("rand-m9-mstd0.5-inc1", 32, (0.5, 0.5, 0.5), "bicubic")
    drawn = randaugment_transform("rand-m9-mstd0.5-inc1", 32, (0.5, 0.5, 0.5))
    assert {op.kwargs["resample"] for op in fixed.ops} == {Image.BICUBIC}
    assert all(isinstance(op.kwargs["resample"], tuple) and len(op.kwargs["resample"]) == 2 for op in drawn.ops)
    from autoprog.classification.adareg import AdaptiveRegularization
    from autoprog.space import GrowthSpace

    adareg = AdaptiveRegularization(GrowthSpace(32, 4, 4, num_stages=2, start_ratio=0.5))
    assert {op.kwargs["resample"] for op in adareg.pil_randaugment(3, "bicubic").ops} == {Image.BICUBIC}
    assert all(isinstance(op.kwargs["resample"], tuple) for op in adareg.pil_randaugment(3).ops)


def test_a_resume_refuses_training_data_that_changed(cli, image_folder, tmp_path):
    """A checkpoint records its training set's identity (the folder's files below it and their labels): resumed
    after an image was added, or after a class folder was added (the classifier's output then another size), the
    run stops with one line instead of training on other data or failing to load; a copy of the folder elsewhere
    is the same data; a dataset of tensors is digested by count, shape, labels and evenly spaced images."""
    import shutil

    from PIL import Image

    from autoprog.data import TensorImages, dataset_identity

    args = ["--dataset", image_folder, "--batch-size", "2", "--epochs", "2", "--method", "original", "--embed-dim",
            "16", "--depth", "2", "--num-heads", "2", "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu"]
    assert cli("pretrain", "--out", tmp_path / "r", "--stop-after-epochs", "1", *args)[0] == 0
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    shutil.rmtree(image_folder)
    moved.rename(image_folder)  # the same files, copied: new modification times
    Image.new("RGB", (24, 24)).save(image_folder / "train" / "circle" / "new.png")
    rc, _, err = cli("pretrain", "--resume", tmp_path / "r", "--cpu")
    assert rc == 2 and "the training data differ from those this run started with (10 images then, 11 now)" in err
    (image_folder / "train" / "circle" / "new.png").unlink()
    rc, _, err = cli("pretrain", "--resume", tmp_path / "r", "--cpu")
    assert rc == 0, err
    x, y = torch.zeros(4, 1, 3, 3, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    same = dataset_identity(TensorImages(x, y))
    assert dataset_identity(TensorImages(x.clone(), y.clone())) == same
    assert dataset_identity(TensorImages(x, y.flip(0))) != same
    x[3, 0, 1, 1] = 1  # the last image is among those digested
    assert dataset_identity(TensorImages(x, y)) != same
