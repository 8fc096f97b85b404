"""Datasets: Fashion-MNIST (from the Debian package), scikit-learn digits, and any ImageFolder directory.

Small datasets are held in memory as uint8 tensors (on the training device, :meth:`DataBundle.to`, unless a
host-side RandAugment needs them: then each RandAugmented batch is copied there without waiting) and augmented a
whole batch at a time there; ImageFolder images are decoded, cropped (timm's random resized crop) and flipped in
loader workers and travel as uint8. Either way a loader yields ``(x, y)`` and :meth:`DataBundle.prepare` turns
``x`` into normalised float images on the device. The model adapter then resizes them to the current
sub-network's resolution.

A training loader is built once (its workers persist) and ordered by an :class:`EpochSampler`: each epoch's
order, and each ImageFolder image's random crop and flip, follow from the seed, the epoch and the image alone,
so they do not depend on the number of workers, and a resumed epoch skips what it trained without reading it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import os
import random
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import ConfigError, DataError, warn

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = "install it with `apt-get install dataset-fashion-mnist` or pass --data-root DIR"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = ("fashion-mnist", "digits", "<ImageFolder directory>")


class TensorImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and int64 labels, fetched a whole batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError("TensorImages needs uint8 images (N, C, H, W) and one label per image")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices):
        # indices on the images' device, copied without waiting: a host index into device images would make the
        # indexing copy it with a blocking copy, which waits for every queued step
        idx = to_device(torch.as_tensor(indices, dtype=torch.long), self.images.device)
        return self.images[idx], self.labels[idx]

    def subset(self, indices: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[indices], self.labels[indices])


def processes_on_this_machine() -> int:
    """The processes a launcher started on this machine (``LOCAL_WORLD_SIZE``; 1 outside a launcher): they share
    its cores and its shared memory."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def default_workers(reserve: int = 1) -> int:
    """Loader workers per process for decoded (ImageFolder) data: this machine's cores shared among the processes
    launched on it, less ``reserve`` for the process's own work (the training loop), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // processes_on_this_machine() - reserve))


SHARED_MEMORY = "/dev/shm"  # where loader workers hand their batches to the training process (Linux)
PREFETCH = 2  # batches each worker prepares ahead (DataLoader's default prefetch_factor)
# a repeated copy's epoch key is this many past the last (keys are seed + epoch). torch's and numpy's generators
# take a seed's low 32 bits only: copy c of epoch e and copy c' of epoch e' seed alike only when e - e' is
# (c' - c) strides modulo 2^32, which no run of fewer than 2^24 epochs and 256 copies reaches
REPEAT_KEY_STRIDE = 1 << 24
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageFolder images' normalisation
CROP_SCALE = 0.08  # an ImageFolder training crop's smallest area fraction: timm's, DeiT's and the official code's
TRAIN_INTERPOLATIONS = ("random", "bilinear", "bicubic")  # an ImageFolder training crop's resampling (timm's names)
EVAL_INTERPOLATIONS = ("bilinear", "bicubic")


def workers_for_shared_memory(workers: int, batch_bytes: int, prefetch: int = PREFETCH,
                              advice: str = ", or lower --batch-size") -> int:
    """``workers``, or as many as this process's part of the shared-memory folder's free space can serve (the
    processes launched on this machine share it alike): each worker hands ``prefetch`` batches of about
    ``batch_bytes`` ahead through it (two more are on their way to the device), and a worker that finds it full
    dies of a bus error mid-run. A container's default is 64 MB; a batch of 128 224-px images is 19 MB. Warns
    (ending with ``advice``) when it takes fewer; unchanged where there is no such folder."""
    if workers <= 0 or batch_bytes <= 0:
        return workers
    try:
        free = shutil.disk_usage(SHARED_MEMORY).free
    except OSError:  # not Linux
        return workers
    per_node = processes_on_this_machine()
    mine = free / per_node
    fit = max(0, int((0.8 * mine / batch_bytes - 2) // prefetch))
    if fit >= workers:
        return workers
    from .errors import warn

    share = f" ({mine / 2**20:.1f} MB for each of {per_node} processes)" if per_node > 1 else ""
    warn(f"{SHARED_MEMORY} has {free / 2**20:.1f} MB free{share}, too little for {workers} loader workers passing "
         f"batches of {batch_bytes / 2**20:.1f} MB ({prefetch} ahead each): using {fit} (give the machine or "
         f"container more shared memory, e.g. docker run --shm-size=8g{advice})")
    return fit


class EpochSampler(Sampler):
    """A training set's order one epoch at a time, from ``seed`` and the epoch alone (:meth:`begin_epoch`).

    The order is the one a shuffling ``DataLoader`` seeded with ``seed + epoch`` drew (it took one 64-bit number
    for its workers' seed first), so runs from before the loader was built once replay exactly. ``keyed``:
    yield ``(epoch key, index)`` pairs, which :class:`SeededSamples` turns into per-image random transforms;
    with a :attr:`magnitude` set, ``(epoch key, index, magnitude)``: the loader workers' RandAugment magnitude
    for the epoch (AdaReg's, by stage or by the sub-network's size); with a :attr:`resolution` set, ``(epoch key, index,
    magnitude or None, resolution)``: the side the workers crop the epoch's images to (the stage's). Both are read
    when the epoch's iteration begins.

    ``repeats`` > 1 is DeiT's repeated augmentation (its ``RASampler``; timm's ``RepeatAugSampler``): the epoch
    keeps its length but draws ``size / repeats`` images of the permutation, each ``repeats`` times in a row, so a
    global batch holds each of its images ``repeats`` times, each copy randomly transformed on its own (a keyed
    copy ``c`` gets the epoch key plus ``c`` × :data:`REPEAT_KEY_STRIDE`).
    """

    def __init__(self, size: int, seed: int, keyed: bool = False, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.size, self.seed, self.keyed, self.repeats = size, seed, keyed, repeats
        self.epoch, self.skip = 0, 0
        self.magnitude: float | None = None
        self.resolution: int | None = None

    def begin_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration is ``epoch``'s order without its first ``skip`` items (already trained)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.size - self.skip)

    def __iter__(self):
        key = self.seed + self.epoch
        g = torch.Generator().manual_seed(key)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        order = torch.randperm(self.size, generator=g)
        if self.repeats == 1:
            order, keys = order[self.skip:].tolist(), itertools.repeat(key)
        else:
            order = order.repeat_interleave(self.repeats)[:self.size][self.skip:].tolist()
            keys = (key + (p % self.repeats) * REPEAT_KEY_STRIDE for p in range(self.skip, self.size))
        if not self.keyed:
            return iter(order)
        m, r = self.magnitude, self.resolution
        settings = (m, r) if r is not None else () if m is None else (m,)  # what each item carries
        return ((k, i, *settings) for k, i in zip(keys, order))


class SeededSamples(Dataset):
    """A dataset whose random transforms are seeded per image: item ``(key, i)`` is image ``i`` transformed with
    torch's, Python's and numpy's random numbers seeded from ``key`` and ``i`` (the caller's random state
    untouched), whichever worker reads it; a plain index reads the image as the dataset would. Item
    ``(key, i, magnitude)`` first sets ``randaugment``'s operations to ``magnitude`` (AdaReg's); item ``(key, i,
    magnitude or None, resolution)`` also sets the random crop's output side (``crop``; an item without one crops
    at the side ``crop`` was made with)."""

    def __init__(self, dataset: Dataset, randaugment=None, crop=None):
        self.dataset, self.randaugment, self.crop = dataset, randaugment, crop
        self.full_size = tuple(crop.size) if crop is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        key, i = item[:2]
        if len(item) >= 3 and item[2] is not None:
            if self.randaugment is None:
                raise ValueError("a RandAugment magnitude for a dataset without an adjustable RandAugment")
            for op in self.randaugment.ops:
                op.magnitude = item[2]
        if self.crop is not None:
            self.crop.size = (item[3], item[3]) if len(item) == 4 else self.full_size
        elif len(item) == 4:
            raise ValueError("a crop resolution for a dataset without a random crop")
        seed = (key * 1_000_003 + i) % (2**63 - 1)
        if torch.utils.data.get_worker_info() is not None:  # a worker's streams serve nothing else
            _seed_all(seed)
            return self.dataset[i]
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            _seed_all(seed)
            return self.dataset[i]
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


def leave_stops_to_the_trainer(worker_id: int | None = None) -> None:
    """A loader worker's ``worker_init_fn``: it ignores SIGTERM and SIGINT. A scheduler's stop (Slurm's
    ``scancel``, ``timeout``) and Ctrl-C reach the whole process group; the trainer, not its workers, decides when to
    stop (it finishes and checkpoints its step first), and torch's worker handler would otherwise die by SIGTERM,
    which kills the trainer with a loader error. The workers still end when the trainer closes its loader or is
    gone (torch's watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _seed_all(seed: int) -> None:
    """torch's, Python's and numpy's streams (timm's crop draws its box and resampling with Python's, torchvision's
    flip with torch's; timm's RandAugment picks operations with numpy's and magnitudes with Python's)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _collate_batched(batch):
    """Batches from ``__getitems__`` are already stacked; collate single items the usual way."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    return torch.utils.data.default_collate(batch)


@dataclass
class DataBundle:
    """A train/test pair plus what a model needs to know about it."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool = True
    hflip: bool = True
    pad: int = 2
    train_plain: Dataset | None = None  # the training images without random transforms (None: ``train`` is)
    worker_randaugment: object = None  # decoded data: a RandAugment in the workers' transform, magnitude per epoch
    test_at_size: Callable[[int], Dataset] | None = None  # decoded data: the test images cropped at another size
    randaugment_interpolation: str = "random"  # decoded data: RandAugment's resampling (the training crop's)
    classes: tuple[str, ...] | None = None  # the class names, in label order (an ImageFolder's folder names)

    def test_at(self, size: int) -> Dataset:
        """The test images for evaluation at ``size`` pixels: decoded images are resized and cropped at that size
        (as at the training size); in-memory ones stay as they are, the model resizes its input."""
        return self.test_at_size(size) if self.test_at_size is not None else self.test

    def _split(self, split: str) -> Dataset:
        if split == "train_plain":
            return self.train_plain if self.train_plain is not None else self.train
        return self.train if split == "train" else self.test

    def epoch_sampler(self, seed: int, repeats: int = 1) -> EpochSampler:
        """The training split's order, epoch by epoch (:class:`EpochSampler`, ``repeats``: repeated augmentation);
        decoded data is keyed so that each image's random transforms are seeded."""
        return EpochSampler(len(self.train), seed, keyed=not self.in_memory, repeats=repeats)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
               num_workers: int = 0, limit: int | None = None, pin_memory: bool = False,
               sampler: EpochSampler | None = None, size: int | None = None) -> DataLoader:
        """``split``: ``train``, ``test``, or ``train_plain`` (the training images, never randomly transformed:
        what searches score candidates on). ``limit``: the first ``limit`` images of one fixed permutation (all of
        them, permuted, when there are fewer), so a smaller limit always gives a prefix of a larger one.
        ``sampler``: the order (a training loader built once, :meth:`epoch_sampler`); ``shuffle``: one order from
        ``seed`` instead. ``pin_memory``: page-locked batches, which a CUDA device copies without waiting
        (``non_blocking``); never for data already on a device. ``num_workers`` serve decoded data only.
        ``size``: the test images for evaluation at that size (:meth:`test_at`)."""
        ds = self.test_at(size) if split == "test" and size else self._split(split)
        if limit is not None:
            ds = _take(ds, min(limit, len(ds)), seed=1234)
        if sampler is not None and getattr(sampler, "keyed", False):
            train = split == "train"
            ds = SeededSamples(ds, self.worker_randaugment if train else None, self.worker_crop if train else None)
        kw = dict(batch_size=batch_size, drop_last=drop_last, sampler=sampler, shuffle=shuffle and sampler is None,
                  generator=torch.Generator().manual_seed(seed),  # the loader's own draws leave torch's stream alone
                  pin_memory=pin_memory and self.device.type == "cpu")
        if self.in_memory:
            return DataLoader(ds, collate_fn=_collate_batched, **kw)
        side = size or self.image_size
        num_workers = workers_for_shared_memory(num_workers, batch_size * self.in_chans * side * side)
        return DataLoader(ds, num_workers=num_workers, persistent_workers=num_workers > 0,
                          worker_init_fn=leave_stops_to_the_trainer if num_workers else None, **kw)

    @property
    def worker_crop(self):
        """Decoded data: the training images' random crop in the loader workers (its output side can follow the
        stage, :class:`EpochSampler`'s ``resolution``); None for in-memory data."""
        ds = self.train
        while isinstance(ds, torch.utils.data.Subset):
            ds = ds.dataset
        steps = getattr(getattr(ds, "transform", None), "transforms", ())
        return next((t for t in steps if isinstance(t, _random_crops())), None)

    @property
    def device(self) -> torch.device:
        """Where the in-memory images are (always the CPU for decoded data)."""
        return self.train.images.device if isinstance(self.train, TensorImages) else torch.device("cpu")

    def to(self, device: torch.device | str) -> DataBundle:
        """Move in-memory images (Fashion-MNIST, digits: a few MB of uint8) to ``device`` once, so that no batch
        is copied there again; decoded data stays with its workers."""
        device = torch.device(device)
        for name in ("train", "test", "train_plain"):
            ds = getattr(self, name)
            if isinstance(ds, TensorImages) and not same_device(ds.images.device, device):
                setattr(self, name, TensorImages(ds.images.to(device), ds.labels.to(device)))
        return self

    def with_worker_randaugment(self, transform) -> DataBundle:
        """This decoded data with RandAugment ``transform`` (timm's, on PIL images) added to the training images'
        transform, in the loader workers, before the conversion to a tensor; its magnitude comes with each sample
        (:class:`EpochSampler`'s ``magnitude``). This bundle is left as it is."""
        import copy

        from torchvision import transforms

        if self.in_memory:
            raise ValueError("in-memory images are RandAugmented by the trainer, not in loader workers")

        def added(ds):  # a copy of each level (a --subset's Subset over the ImageFolder), this bundle's untouched
            ds = copy.copy(ds)
            if isinstance(ds, torch.utils.data.Subset):
                ds.dataset = added(ds.dataset)
            elif hasattr(ds, "with_randaugment"):  # a dataset that RandAugments more than the image (token labels)
                ds = ds.with_randaugment(transform)
            else:
                steps = list(ds.transform.transforms)  # a torchvision Compose: ..., PILToTensor()
                ds.transform = transforms.Compose([*steps[:-1], transform, steps[-1]])
            return ds

        return dataclasses.replace(self, train=added(self.train), worker_randaugment=transform)

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None,
                regularizer=None) -> torch.Tensor:
        """uint8 → normalised float; for training, random translation (±pad px) and horizontal flips.

        ``regularizer`` (an :class:`~autoprog.classification.adareg.AdaptiveRegularization` or the training recipe)
        adds random erasing to any training batch. (RandAugment comes before: in the loader workers for decoded
        data, on the host from the trainer for in-memory data.)
        """
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if train:
                x = _augment(x, self.pad, self.hflip, generator)
            mean, std = _channel_stats(self.mean, self.std, x.device)
            x = (x - mean) / std
        if train and regularizer is not None:
            x = regularizer.erase(x)
        return x


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """The normalisation's mean and std as (1, C, 1, 1) tensors on ``device``, made once (not copied every step)."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` name one device: a device without an index (Accelerate's ``cuda`` on a single GPU)
    is the current one of its type (``cuda:0`` there, a tensor's device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type == "cuda" and torch.cuda.is_available():
            current = torch.cuda.current_device()
            return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
        return True
    return a.index == b.index


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a CUDA device through page-locked memory without waiting for the
    device's queued work (the same numbers as on the CPU); a tensor already there is returned as it is."""
    device = torch.device(device)
    if same_device(t.device, device):
        return t
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


IDENTITY_ROWS = 256  # images whose pixels a training set's identity digests (evenly spaced)


def tensor_identity(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """What a resumed run checks in-memory training images against (:func:`dataset_identity`): their count and
    shape, and a digest of every label and of ``IDENTITY_ROWS`` evenly spaced images (read once, not per step)."""
    import hashlib

    n = len(images)
    rows = torch.linspace(0, n - 1, min(n, IDENTITY_ROWS)).round().long()
    h = hashlib.sha256(images[rows.to(images.device)].cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().to(torch.int64).numpy().tobytes())
    return {"images": n, "shape": list(images.shape[1:]), "digest": h.hexdigest()[:16]}


def identity_change(saved: dict, now: dict) -> str:
    """How training data of identity ``now`` differ from ``saved``'s, for a message: their counts when those
    differ (`` (10 images then, 11 now)``), else nothing."""
    then, count = saved.get("images"), now.get("images")
    return f" ({then} images then, {count} now)" if then != count else ""


def dataset_identity(ds: Dataset) -> dict:
    """What a resumed run checks its training set against (the data it started with): in-memory images by
    :func:`tensor_identity`; an ImageFolder's by its files' paths below its folder and labels (not their bytes:
    a folder copied elsewhere is the same data); any other dataset by its length."""
    import hashlib

    indices = None
    while isinstance(ds, (torch.utils.data.Subset, SeededSamples)):
        if isinstance(ds, torch.utils.data.Subset):
            indices = list(ds.indices) if indices is None else [ds.indices[i] for i in indices]
        ds = ds.dataset
    if isinstance(ds, TensorImages):
        pick = torch.as_tensor(indices, dtype=torch.long) if indices is not None else None
        return tensor_identity(ds.images if pick is None else ds.images[pick.to(ds.images.device)],
                               ds.labels if pick is None else ds.labels[pick.to(ds.labels.device)])
    samples = getattr(ds, "samples", None)
    if samples is None:
        return {"images": len(ds) if indices is None else len(indices)}
    rows = samples if indices is None else [samples[i] for i in indices]
    h = hashlib.sha256()
    for path, label in rows:
        h.update(f"{os.path.relpath(path, ds.root)}\0{label}\n".encode())
    return {"images": len(rows), "digest": h.hexdigest()[:16]}


def _take(ds: Dataset, n: int, seed: int) -> Dataset:
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(ds, TensorImages):
        return ds.subset(idx)
    return torch.utils.data.Subset(ds, idx.tolist())


def _augment(x: torch.Tensor, pad: int, hflip: bool, generator: torch.Generator | None) -> torch.Tensor:
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# ------------------------------------------------------------------------------------ Fashion-MNIST
def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); it is damaged or truncated: {FASHION_MNIST_FIX}") from e
    if len(raw) < 4 + 4 * expect_dims:
        raise DataError(f"{path} is truncated; reinstall: {FASHION_MNIST_FIX}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim != expect_dims:
        raise DataError(f"{path} is not an IDX uint8 file with {expect_dims} dims; {FASHION_MNIST_FIX}")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} has {data.size} bytes of data, header says {dims}; {FASHION_MNIST_FIX}")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}; {FASHION_MNIST_FIX}")


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def load_fashion_mnist(root: str | os.PathLike | None = None) -> DataBundle:
    root = Path(root or FASHION_MNIST_ROOT)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found at {root}: {FASHION_MNIST_FIX}")
    splits = {}
    for split, (img, lab) in FASHION_FILES.items():
        x = _read_idx(_find(root, img), 3)
        y = _read_idx(_find(root, lab), 1)
        if len(x) != len(y) or x.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST {split} split in {root} is malformed; {FASHION_MNIST_FIX}")
        if len(x) == 0:
            raise DataError(f"Fashion-MNIST {split} split in {root} is empty; {FASHION_MNIST_FIX}")
        splits[split] = TensorImages(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return DataBundle("fashion-mnist", splits["train"], splits["test"], 10, 1, 28, (0.2860,), (0.3530,),
                      classes=FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------- digits
def load_digits() -> DataBundle:
    """scikit-learn's 8×8 handwritten digits (1797 images), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    full = TensorImages(x, y)
    return DataBundle("digits", full.subset(tr), full.subset(te), 10, 1, 8, (0.3,), (0.4,), hflip=False, pad=1,
                      classes=tuple(str(d) for d in range(10)))


# ------------------------------------------------------------------------------------ ImageFolder
@dataclass(frozen=True)
class EvalCrop:
    """How ImageFolder evaluation images are made: resized so that the centre crop of the model's side is
    ``crop_pct`` of the shorter side (to ``floor(side / crop_pct)``), with ``interpolation``, as timm's
    ``transforms_imagenet_eval`` and the official code (the model's ``crop_pct`` and interpolation)."""

    crop_pct: float = 0.9  # timm's ViT/DeiT configuration, which the official code's DeiT models take
    interpolation: str = "bicubic"


LEGACY_CROPS = "legacy"  # ``interpolation`` of runs made before 2026-12-07 (see :func:`load_image_folder`)


def load_image_folder(root: str | os.PathLike, image_size: int = 32, randaugment: str | None = None,
                      crop_scale: float = CROP_SCALE, interpolation: str = "random",
                      eval_crop: EvalCrop = EvalCrop()) -> DataBundle:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), torchvision's ImageFolder layout.
    Training images are randomly resized-cropped (``crop_scale``: the smallest area fraction; ``interpolation``:
    its resampling, ``random`` drawing bilinear or bicubic per image as the official code) and flipped;
    ``randaugment``: timm's RandAugment string, applied to training images in the loader workers. Evaluation
    images (and the unaugmented training images that searches score on) are centre-cropped as ``eval_crop``.
    ``interpolation="legacy"``: what autoprog did before 2026-12-07, for its saved runs (torchvision's bilinear
    crop, RandAugment's resampling drawn, evaluation images resized to 1.14x bilinearly; ``eval_crop`` unread)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    legacy = interpolation == LEGACY_CROPS
    if not legacy and interpolation not in TRAIN_INTERPOLATIONS:
        raise ConfigError(f"--train-interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, got "
                          f"{interpolation!r}")
    check_eval_crop(eval_crop)
    root = Path(root)
    train_dir, test_dir = image_folder_dirs(root)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    ra_interpolation = "random" if legacy else interpolation
    augment = []
    if randaugment:
        augment = [randaugment_transform(randaugment, image_size, mean, ra_interpolation)]
    crop = transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)) if legacy else \
        RandomResizedCropAndInterpolation(image_size, scale=(crop_scale, 1.0), interpolation=interpolation)
    train_tf = transforms.Compose([  # uint8 out: a quarter of float32's bytes; normalised on the device
        crop,
        transforms.RandomHorizontalFlip(),
        *augment,
        transforms.PILToTensor(),
    ])
    eval_crop = None if legacy else eval_crop
    test_tf = _test_transform(image_size, eval_crop)
    train = image_folder(root, train_dir, train_tf, min_classes=2)
    plain = image_folder(root, train_dir, test_tf, min_classes=2)
    test = image_folder(root, test_dir, test_tf)
    if train.classes != test.classes:
        raise DataError(f"{train_dir} and {test_dir} have different class folders")
    return DataBundle(root.name, train, test, len(train.classes), 3, image_size, mean, std, in_memory=False,
                      hflip=False, pad=0, train_plain=plain,  # cropped and flipped in the workers
                      test_at_size=functools.partial(_test_images_at, root, test_dir, eval_crop),
                      randaugment_interpolation=ra_interpolation, classes=tuple(train.classes))


def check_eval_crop(eval_crop: EvalCrop) -> None:
    """Refuse an evaluation crop timm's transform cannot make, in one line."""
    if not 0 < eval_crop.crop_pct <= 2:
        raise ConfigError(f"--eval-crop-pct must be in (0, 2], got {eval_crop.crop_pct}")
    if eval_crop.interpolation not in EVAL_INTERPOLATIONS:
        raise ConfigError(f"--eval-interpolation must be one of {', '.join(EVAL_INTERPOLATIONS)}, got "
                          f"{eval_crop.interpolation!r}")


def _random_crops() -> tuple[type, ...]:
    """The random resized crops an ImageFolder's training transform may hold (timm's, torchvision's)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    return RandomResizedCropAndInterpolation, transforms.RandomResizedCrop


def crop_interpolation(crop):
    """The resampling of one image's random crop: drawn from a crop of several (timm's ``random``) with Python's
    random numbers, as timm's crop draws it after its box."""
    choices = crop.interpolation
    return random.choice(choices) if isinstance(choices, (tuple, list)) else choices


def _test_transform(size: int, eval_crop: EvalCrop | None):
    """Evaluation images at ``size``, as uint8 (timm's ``transforms_imagenet_eval``, ``eval_crop``; None: resized
    to 1.14x bilinearly, as autoprog did before 2026-12-07)."""
    from timm.data.transforms_factory import transforms_imagenet_eval
    from torchvision import transforms

    if eval_crop is None:
        return transforms.Compose([transforms.Resize(int(size * 1.14)), transforms.CenterCrop(size),
                                   transforms.PILToTensor()])
    return transforms_imagenet_eval(size, crop_pct=eval_crop.crop_pct, interpolation=eval_crop.interpolation,
                                    use_prefetcher=True)


def _test_images_at(root: Path, test_dir: Path, eval_crop: EvalCrop | None, size: int) -> Dataset:
    return image_folder(root, test_dir, _test_transform(size, eval_crop))


def randaugment_transform(config: str, image_size: int, mean: tuple[float, ...], interpolation: str = "random"):
    """timm's RandAugment for PIL images from its config string (``rand-m9-mstd0.5-inc1``); a bad string is a
    one-line error. Its rotations, shears and translations resample with ``interpolation`` (``random``: bilinear or bicubic
    per operation, timm's default), as timm's ``create_transform`` passes the training interpolation on.
    (:func:`rand_augment`: posterize to 0 bits gives a black image.)"""
    import re

    section = r"(m|mstd|mmax|p)\d+(\.\d+)?|n\d+|w\d+|inc[01]"
    if not re.fullmatch(rf"rand(-({section}))*", config):
        raise ConfigError(f"--randaugment {config!r} is not a timm RandAugment string such as rand-m9-mstd0.5-inc1 "
                          "(sections: mN magnitude, nN operations, mstdX, mmaxX, incN, wN, pX)")
    fill = tuple(min(255, round(255 * m)) for m in mean)
    try:
        return rand_augment(config, {"translate_const": max(1, int(image_size * 0.45)), "img_mean": fill},
                            interpolation)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"--randaugment {config!r} is not a timm RandAugment string such as "
                          f"rand-m9-mstd0.5-inc1 ({e or 'unknown section'})") from None


def rand_augment(config: str, hparams: dict, interpolation: str = "random"):
    """timm's ``rand_augment_transform(config, hparams)``, its posterize operations keeping 0 bits as a black image;
    ``interpolation``: its geometric operations' resampling (``random``: drawn per operation, timm's default; a
    fixed one goes in as timm's ``interpolation`` hparam, as ``create_transform`` passes it).

    timm maps the highest magnitudes (``inc1``: a level of 10, which ``mstd`` noise reaches) and, without
    ``inc1``, levels below 2.5 to posterize with 0 bits kept; Pillow up to 9 returned a black image for that,
    Pillow 10 and later raise "bits must be between or equal to 1 and 8", which would stop a run (the paper's
    ``rand-m9-mstd0.5-inc1`` hits it in about one image in 650). Here they give the black image again."""
    from timm.data.auto_augment import rand_augment_transform

    if interpolation != "random":
        from timm.data.transforms import str_to_pil_interp

        hparams = {**hparams, "interpolation": str_to_pil_interp(interpolation)}
    transform = rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def _posterize(img, bits_to_keep, **kwargs):
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit cleared: what Pillow < 10 gave
    return posterize(img, bits_to_keep, **kwargs)


def randaugment_images(x: torch.Tensor, transform) -> torch.Tensor:
    """A PIL ``transform`` (RandAugment) applied to each image of a uint8 batch (N, C, H, W), on the host; the
    batch comes back on its device."""
    from PIL import Image

    dev = x.device
    host = x if dev.type == "cpu" else x.cpu()  # (a device batch waits for the device here)
    out = torch.empty_like(host)
    for i in range(len(host)):
        a = host[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
        out[i] = torch.from_numpy(np.asarray(transform(img)).copy()).reshape(a.shape).permute(2, 0, 1)
    return out if dev.type == "cpu" else out.to(dev)


def read_image(path: str | os.PathLike, mode: str = "RGB", upright: bool = False):
    """The image file ``path`` as a PIL image in ``mode`` (``upright``: turned by its EXIF orientation, as
    diffusers' DreamBooth reads photos; torchvision's ImageFolder does not), for every loader of autoprog; an
    unreadable, empty or truncated file is a one-line :class:`DataError` naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) if upright else im
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) greyscale: to 8 bits by its top
                # byte, which PIL's convert would instead clip at 255 (nearly every pixel white)
                deep = np.asarray(im).astype(np.int64)
                top = 65535 if im.mode.startswith("I;16") else int(deep.max(initial=0))
                shift = 0 if top < 256 else 8 if top < 65536 else 24  # ("I": 8-bit values stay as they are)
                im = Image.fromarray((deep >> shift).clip(0, 255).astype(np.uint8))
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: bad or huge files
        raise DataError(f"cannot read image {path} ({' '.join(str(e).split())[:120]}); replace it with a readable "
                        "image (removing it changes the data set: start the run again)") from None


# the files an ImageFolder's images are read from: torchvision's kinds and GIF (its first frame), by PIL
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def image_folder_dirs(root: Path) -> tuple[Path, Path]:
    """``(root/train, root/val or root/test)`` of an ImageFolder dataset; a one-line :class:`DataError` without them."""
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root} is not an ImageFolder dataset: it needs train/<class>/ and val/<class>/ (or test/)")
    return root / "train", test_dir


def image_folder(root: Path, split: Path, transform: Callable | None = None, min_classes: int = 1):
    """torchvision's ``ImageFolder`` of ``split`` (``root/train`` or ``root/val``) read by :func:`read_image`:
    one-line :class:`DataError`s for a split without images, a class folder without images, or fewer than
    ``min_classes`` classes."""
    from torchvision import datasets

    skipped = []

    def readable(path: str) -> bool:
        ok = path.lower().endswith(IMAGE_SUFFIXES)
        if not ok and not os.path.basename(path).startswith("."):
            skipped.append(path)
        return ok

    try:
        ds = datasets.ImageFolder(str(split), transform=transform, loader=read_image, is_valid_file=readable)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read ImageFolder dataset at {split}: {' '.join(str(e).split())[:200]}") from None
    if skipped:
        warn(f"{split}: {len(skipped)} file(s) not read, of a kind that is not an image read here (e.g. "
             f"{os.path.relpath(skipped[0], split)}; the kinds read: {' '.join(IMAGE_SUFFIXES)})", once=True)
    if len(ds) == 0:
        raise DataError(f"{split} holds no images")
    if len(ds.classes) < min_classes:
        raise DataError(f"{split} has {len(ds.classes)} class folder(s) ({', '.join(ds.classes)}); a classifier "
                        f"needs at least {min_classes} (with one, top-1 is 100 % whatever it learns)")
    return ds


# ------------------------------------------------------------------------------------------ entry
def builtin_dataset(name: str) -> str | None:
    """The built-in dataset ``--dataset name`` names (``fashion-mnist`` or ``digits``, however spelt: names,
    never paths), or None (a folder)."""
    key = name.lower().replace("_", "-")
    return "fashion-mnist" if key in ("fashion-mnist", "fashionmnist") else "digits" if key == "digits" else None


def unknown_dataset(name: str) -> DataError:
    """The error for a ``--dataset`` that names neither a built-in dataset nor a folder: a path (it looks like
    one, or something is there) that is no folder, or an unknown name."""
    if any(c in name for c in "/\\.") or Path(name).exists():
        return DataError(f"--dataset {name}: {'not a directory' if Path(name).exists() else 'no such directory'}")
    return DataError(f"unknown dataset {name!r}: use fashion-mnist, digits, or a path to an ImageFolder directory")


def is_image_folder(name: str) -> bool:
    """Whether ``--dataset name`` is read as an ImageFolder (decoded by loader workers), not held in memory."""
    return builtin_dataset(name) is None


def load_dataset(name: str, data_root: str | None = None, subset: int | None = None, image_size: int | None = None,
                 seed: int = 0, randaugment: str | None = None, crop_scale: float = CROP_SCALE,
                 interpolation: str = "random", eval_crop: EvalCrop = EvalCrop()) -> DataBundle:
    """Load a dataset by name (``fashion-mnist``, ``digits``) or as an ImageFolder directory path
    (``randaugment``, ``crop_scale``, ``interpolation``, ``eval_crop``: see :func:`load_image_folder`)."""
    key, builtin = name.lower().replace("_", "-"), builtin_dataset(name)
    if builtin == "fashion-mnist":
        bundle = load_fashion_mnist(data_root)
    elif builtin == "digits":
        bundle = load_digits()
    elif key == "imagefolder" or Path(name).is_dir():
        path = data_root if key == "imagefolder" else name
        if not path:
            raise DataError("--dataset imagefolder needs --data-root DIR")
        bundle = load_image_folder(path, image_size or 32, randaugment, crop_scale, interpolation, eval_crop)
    else:
        raise unknown_dataset(name)
    if subset is not None:
        if subset < 1:
            raise DataError(f"--subset must be positive, got {subset}")
        if subset < len(bundle.train):
            if bundle.train_plain is not None:  # the same images
                bundle.train_plain = _take(bundle.train_plain, subset, seed)
            bundle.train = _take(bundle.train, subset, seed)
    return bundle
