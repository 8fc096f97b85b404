"""Images for diffusion training: uint8 tensors in memory, a class selection, scaled to [-1, 1] on use.

The default transfer task is Fashion-MNIST: the base model learns classes 0-4 and fine-tuning adapts
it to the unseen classes 5-9 (class ids are kept, so the base model's embedding rows 5-9 are new).
An ImageFolder directory (``train/<class>/``, ``val/`` or ``test/``) is read once into memory,
resized and centre-cropped to ``image_size``.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..data import (
    builtin_dataset,
    image_folder,
    image_folder_dirs,
    load_digits,
    load_fashion_mnist,
    to_device,
    unknown_dataset,
)
from ..errors import ConfigError, DataError

FASHION_MNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle boot")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_CAPTION = "a photo of a {}"  # the paper's "a <class name>", in Stable Diffusion's usual phrasing
BASE_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)


# the posterior's seed is the step's (or the searches' noise seed) with these bits flipped: a stream of its own, so
# that on the CPU (where both generators are the host's) the posterior's draws are never the noise's
POSTERIOR_SALT = 0x5EED_1A7E


@dataclass
class DiffusionData:
    """Train/test uint8 images ``(N, C, H, W)`` with labels, and what a model needs to know about them."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int  # size of the label space (ids may be a subset of it)
    classes: tuple[int, ...]  # the class ids present
    hflip: bool = True
    latents: torch.Tensor | None = None  # the training images in a VAE's latent space, when training there
    codec: object | None = None  # the :class:`~autoprog.diffusion.latent.LatentCodec` that made them
    # latent space without cached latents (--latent-encoding per-step, the official train_apz.py's): each batch's
    # pixels flipped, resized to the stage's resolution times the VAE's factor and encoded, the posterior sampled
    encode_each_batch: bool = False
    class_names: tuple[str, ...] | None = None  # one per class id of the label space
    captions: tuple[str, ...] | None = None  # one prompt per class id, when a text-to-image model trains
    caption_ids: torch.Tensor | None = None  # those prompts' token ids (num_classes, L)
    num_instance: int | None = None  # DreamBooth: the first this many training images are the subject's
    prior_weight: float | None = None  # DreamBooth: the class images' loss weight (prior preservation)
    eval_prompts: tuple[str, ...] = ()  # DreamBooth: more prompts to generate the subject from at evaluations
    _identity: dict | None = field(default=None, init=False, repr=False, compare=False)

    def identity(self) -> dict:
        """The training images' :func:`~autoprog.data.tensor_identity` (what a resumed run checks), made once:
        before :meth:`drop_pixels`, so every process of a latent-space run has it."""
        if self._identity is None:
            from ..data import tensor_identity

            self._identity = tensor_identity(self.train_images, self.train_labels)
        return self._identity

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def model_chans(self) -> int:
        """Channels the denoiser sees: the image's, or the latent's in latent space."""
        if self.encode_each_batch:
            return self.codec.latent_channels
        return self.latents.shape[1] if self.latents is not None else self.in_chans

    @property
    def model_size(self) -> int:
        if self.encode_each_batch:
            return self.codec.latent_size(self.image_size)
        return self.latents.shape[-1] if self.latents is not None else self.image_size

    def to_greyscale(self, luma: bool = False) -> bool:
        """Keep one channel of RGB pixels whose three channels are equal in every image (greyscale files, which
        an ImageFolder reads as RGB), for a 1-channel model: no value changes. ``luma``: colour pixels too, by
        PIL's ``convert("L")`` (which leaves equal channels' value as it is). Returns whether it did."""
        sets = (self.train_images, self.test_images)
        if self.latents is not None or self.encode_each_batch or self.in_chans != 3:
            return False
        if all(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]) for x in sets):
            self.train_images, self.test_images = (x[:, :1].contiguous() for x in sets)
            return True
        if not luma:
            return False
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)  # PIL's, in 1/65536
        self.train_images, self.test_images = (
            ((x.int() * weights).sum(1, keepdim=True) + 32768).div(65536, rounding_mode="floor").to(torch.uint8)
            for x in sets)
        return True

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The denoiser's clean inputs ``x_0`` for training images ``idx``: pixels in [-1, 1], or latents."""
        if self.encode_each_batch:
            raise ValueError("--latent-encoding per-step keeps no latents: use clean() at a resolution")
        return self.latents[idx] if self.latents is not None else to_float(self.train_images[idx])

    def clean(self, idx: torch.Tensor, resolution: int, seed: int = 0) -> torch.Tensor:
        """The clean inputs ``x_0`` of training images ``idx`` at ``resolution``, unflipped (the searches' fixed
        batches): resized pixels or latents, or (:attr:`encode_each_batch`) the pixels encoded as :meth:`batch`
        encodes them, the posterior drawn from ``seed`` (see :meth:`_encoded`)."""
        if not self.encode_each_batch:
            return resize(self.inputs(idx), resolution)
        return self._encoded(to_float(self.train_images[idx]), resolution, seed)

    def drop_pixels(self) -> None:
        """Let go of the images' pixels once a latent-space run holds their latents and this process scores
        nothing (every process but the main one): each set becomes a meta tensor of its shape, so counts and sizes
        still read, while any read of a pixel fails instead of being silently wrong."""
        if self.latents is None:
            raise ValueError("pixel-space training reads the pixels: only a latent-space run can drop them")
        self.identity()
        self.train_images = torch.empty_like(self.train_images, device="meta")
        self.test_images = torch.empty_like(self.test_images, device="meta")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Generated ``x_0`` back to pixels in [-1, 1] (the identity in pixel space)."""
        return self.codec.decode(x, out_channels=self.in_chans) if self.codec is not None else x

    def batch(self, idx: torch.Tensor, resolution: int | None = None, generator: torch.Generator | None = None,
              device: torch.device | str | None = None):
        """Training batch ``idx`` (see :meth:`inputs`) at ``resolution`` (antialiased), randomly flipped, with
        its conditions (see :meth:`conditions`), on ``device`` (default: where the data is).

        Built where it trains: only the stored rows (uint8 pixels, or the latents), the flip mask and the
        conditions cross to ``device``, without waiting for its queued work; scaling to [-1, 1], flipping and
        resizing run there. On the CPU, the same numbers as building it on the host (a GPU's division and resize may
        round a last bit apart)."""
        flip = torch.rand(len(idx), generator=generator) < 0.5 if self.hflip else None
        x = self.latents[idx] if self.latents is not None else self.train_images[idx]
        y = self.conditions(self.train_labels[idx])
        if device is not None:
            x, y = to_device(x, device), to_device(y, device)
        if self.latents is None:
            x = to_float(x)
        if flip is not None:
            flip = to_device(flip, x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.encode_each_batch:  # flipped pixels at the stage's resolution, encoded (the official order)
            seed = generator.initial_seed() if generator is not None else 0  # (the step's: host-side, no wait)
            return self._encoded(x, resolution, seed).to(x.device), y
        return resize(x, resolution), y

    def _encoded(self, x: torch.Tensor, resolution: int, seed: int) -> torch.Tensor:
        """Pixels ``x`` resized to ``resolution`` latent pixels and encoded on the VAE's device, the posterior drawn
        by a generator there seeded from ``seed`` with :data:`POSTERIOR_SALT`, so the same seed draws the same."""
        dev = self.codec.device
        if getattr(self, "_posterior_gen", None) is None:
            self._posterior_gen = torch.Generator(dev)
        x = resize(to_device(x, dev), resolution * self.codec.downsample)
        return self.codec.encode_batch(x, generator=self._posterior_gen.manual_seed(seed ^ POSTERIOR_SALT))

    @property
    def paired(self) -> bool:
        """DreamBooth with prior preservation: every batch is half subject images, half class images."""
        return self.num_instance is not None and self.prior_weight is not None \
            and len(self.train_images) > self.num_instance

    def batch_indices(self, step: int, global_batch: int, seed: int, num_processes: int = 1) -> torch.Tensor:
        """The global batch ``step``: consecutive slices of a fresh permutation per epoch; DreamBooth's few
        subject images are cycled through (a batch may be larger than the set), and with prior preservation
        the batch alternates subject and class images (diffusers' DreamBooth pairs them the same way), so that
        each of ``num_processes`` taking every ``num_processes``-th index gets both kinds."""
        n = len(self.train_images)
        if self.num_instance is None:
            per_epoch = max(1, n // global_batch)
            epoch, pos = divmod(step, per_epoch)
            key = (n, seed, epoch)
            if getattr(self, "_epoch_order", (None,))[0] != key:  # drawn once per epoch, not at every step
                self._epoch_order = (key, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)))
            return self._epoch_order[1][pos * global_batch:(pos + 1) * global_batch].clone()
        if not self.paired:
            return _cycled(torch.arange(self.num_instance), step, global_batch, seed)
        is_inst = (torch.arange(global_batch) // num_processes) % 2 == 0
        half = int(is_inst.sum())
        out = torch.empty(global_batch, dtype=torch.long)
        out[is_inst] = _cycled(torch.arange(self.num_instance), step, half, seed)
        out[~is_inst] = _cycled(torch.arange(self.num_instance, n), step, global_batch - half, seed + 1)
        return out

    def loss_weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Per-image weights whose mean over a batch makes diffusers' DreamBooth loss: the subject images' mean
        loss plus ``prior_weight`` times the class images' (``None``: a plain mean)."""
        if not self.paired:
            return None
        prior = idx >= self.num_instance
        k = int(prior.sum())
        w = torch.where(prior, self.prior_weight * len(idx) / max(1, k), len(idx) / max(1, len(idx) - k))
        return w.float()

    def conditions(self, labels: torch.Tensor) -> torch.Tensor:
        """What the denoiser is conditioned on for class ids ``labels``: the ids themselves, or with captions
        (:meth:`caption`) their prompts' token ids ``(B, L)``."""
        return labels if self.caption_ids is None else self.caption_ids[labels]

    def label(self, c: int) -> str:
        """How a picture names class id ``c`` (:func:`class_label`)."""
        return class_label(c, self.captions, self.class_names)

    def caption(self, tokenize, template: str = DEFAULT_CAPTION) -> None:
        """Give every class the prompt ``template`` filled with its name, tokenized by ``tokenize`` (a text model's)."""
        check_template(template, "--caption")
        names = self.class_names or tuple(f"class {i}" for i in range(self.num_classes))
        self.captions = tuple(fill_template(template, n) for n in names)
        self.caption_ids = tokenize(list(self.captions))


def class_label(c: int, captions=None, class_names=None) -> str:
    """How a picture names class id ``c``: its prompt, else its name, else ``class c``."""
    for names in (captions, class_names):
        if names and 0 <= c < len(names):
            return names[c]
    return f"class {c}"


def check_template(template: str, flag: str, required: bool = True) -> int:
    """The number of ``{}`` slots (0 or 1) of a prompt template: text with one ``{}`` where the class name goes
    (none allowed when not ``required``); literal braces are written ``{{`` and ``}}``. Anything else is a
    one-line error naming ``flag``."""
    from string import Formatter

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{flag} {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    if any(name or spec or conv for name, spec, conv in fields):
        raise ConfigError(f"{flag} {template!r}: only an empty {{}} (the class name) may stand in braces")
    if len(fields) > 1:
        raise ConfigError(f"{flag} {template!r} has {len(fields)} {{}} slots; give one, where the class name goes")
    if required and not fields:
        raise ConfigError(f"{flag} {template!r} needs a {{}} where the class name goes")
    return len(fields)


def fill_template(template: str, name: str) -> str:
    """``template`` (checked by :func:`check_template`) with ``name`` in its ``{}``."""
    return template.format(name)


def _cycled(pool: torch.Tensor, step: int, size: int, seed: int) -> torch.Tensor:
    """Items ``step*size .. step*size+size`` of an endless stream of fresh permutations of ``pool``."""
    n = len(pool)
    start = step * size
    out = []
    while len(out) < size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[pos:pos + size - len(out)].tolist())
    return pool[torch.tensor(out, dtype=torch.long)]


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or resolution == x.shape[-1]:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


def _select(images, labels, classes):
    keep = torch.isin(labels, torch.tensor(classes))
    return images[keep], labels[keep]


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """``"5-9"`` or ``"5,6,7"`` → class ids; ``None``/``"all"`` → all."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError as e:
        raise DataError(f"--classes {text!r}: use ids like 5-9 or 0,2,4") from e
    if not out:
        raise DataError(f"--classes {text!r} selects no class")
    return tuple(sorted(set(out)))


# The last decoded ImageFolder per (folder, size), held weakly: a second read in the process (the feature
# classifier's, after the training data's) reuses the tensors while the first reader still holds them.
_DECODED: dict[tuple, tuple] = {}
DECODE_BATCH = 64  # images a worker decodes and hands over at a time


def _image_folder(root: Path, image_size: int, workers: int | None = None, accelerator=None):
    """``(train images, train labels, test images, test labels, class names)`` of the ImageFolder at ``root``,
    resized and centre-cropped to ``image_size``, decoded by ``workers`` loader processes (default: one per core
    this process may use, :func:`~autoprog.data.default_workers`; the order is the folder's either way). With an
    ``accelerator`` of several processes (call it on every one), each decodes an even share of each split and every
    process gets all of them; an unreadable image in any share stops every process. Read again in the same process
    while the earlier tensors are alive, unchanged files (same names, sizes and modification times) are not
    decoded twice."""
    from torchvision import transforms

    from ..data import default_workers, workers_for_shared_memory

    train_dir, test_dir = image_folder_dirs(root)
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()])
    shared = accelerator is not None and accelerator.num_processes > 1
    error = held = None
    try:
        splits = [image_folder(root, d, tf) for d in (train_dir, test_dir)]
        if splits[0].classes != splits[1].classes:
            raise DataError(f"{train_dir} and {test_dir} have different class folders")
        key = (str(root.resolve()), image_size, _manifest(splits))  # (a file may vanish while it is listed)
        held = [ref() for ref in _DECODED.get(key, ())]
    except Exception as e:
        if not shared:
            raise
        error = e
    hit = bool(held) and all(t is not None for t in held)
    if shared:  # every process lists the folder, then decodes, or none does: all reach the same collectives
        from ..engine import broadcast, count_flags

        main_key = broadcast(accelerator, None if error is not None else key[2])
        differs = error is None and main_key is not None and key[2] != main_key
        failed, misses, apart = count_flags(accelerator, error is not None, not hit, differs)
        if failed:
            raise error if error is not None else DataError(
                f"another process could not list {root} (its message says why)")
        if apart:  # each would decode and gather a different share of a different list
            raise DataError(f"the processes see different files in {root} (changed while it was read, or not the "
                            "same folder on every machine)")
        hit = misses == 0
    if hit:
        xtr, ytr, xte, yte = held
    else:
        if workers is None:  # the process itself only waits, so every core decodes
            workers = default_workers(reserve=0)
        workers = workers_for_shared_memory(workers, DECODE_BATCH * 3 * image_size * image_size, advice="")
        workers = workers if workers > 1 else 0  # one worker is no faster than the process itself
        xtr, xte = (_decode_shares(ds, workers, image_size, accelerator, root) if shared
                    else _decode(ds, workers, image_size) for ds in splits)
        ytr, yte = (torch.tensor(ds.targets, dtype=torch.long) for ds in splits)
        _DECODED.clear()
        _DECODED[key] = tuple(weakref.ref(t) for t in (xtr, ytr, xte, yte))
    return xtr, ytr, xte, yte, tuple(c.replace("_", " ") for c in splits[0].classes)


def _manifest(splits) -> str:
    """sha256 over every file's path, size and modification time."""
    h = hashlib.sha256()
    for ds in splits:
        for path, label in ds.samples:
            st = os.stat(path)
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(ds, workers: int, image_size: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Images ``rows`` (default: all) of ``ds`` in order, stacked: uint8 ``(N, 3, image_size, image_size)``."""
    lo, hi = rows if rows is not None else (0, len(ds))
    if hi <= lo:
        return torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    part = ds if (lo, hi) == (0, len(ds)) else Subset(ds, range(lo, hi))
    return torch.cat(list(DataLoader(part, batch_size=DECODE_BATCH, num_workers=workers, collate_fn=_stack)))


def _decode_shares(ds, workers: int, image_size: int, acc, root: Path) -> torch.Tensor:
    """Every image of ``ds`` on every process, each process decoding an even share (:func:`_decode`)."""
    from ..engine import count_flags, gather_rows, shard_rows

    bounds = [shard_rows(len(ds), 1, r, acc.num_processes) for r in range(acc.num_processes)]
    error = None
    try:
        mine = _decode(ds, workers, image_size, bounds[acc.process_index])
    except Exception as e:  # told to the others before it is raised, so none waits in the gather below
        error, mine = e, None
    if count_flags(acc, error is not None)[0]:
        raise error if error is not None else DataError(
            f"another process could not read its share of {root} (its message says why)")
    return gather_rows(acc, mine, [hi - lo for lo, hi in bounds], everywhere=True)


def _stack(items):
    return torch.stack([x for x, _ in items])


def class_names(dataset: str) -> tuple[str, ...]:
    """A dataset's class names by id, without reading its images: Fashion-MNIST's, the digits', or an ImageFolder's
    class folders, sorted as torchvision numbers them."""
    builtin = builtin_dataset(dataset)
    if builtin is not None:
        return FASHION_MNIST_NAMES if builtin != "digits" else DIGIT_NAMES
    if not Path(dataset).is_dir():
        raise unknown_dataset(dataset)
    train, _ = image_folder_dirs(Path(dataset))
    return tuple(sorted(d.name for d in os.scandir(train) if d.is_dir()))


def load_diffusion_data(dataset: str = "fashion-mnist", data_root: str | None = None,
                        classes: tuple[int, ...] | None = TRANSFER_CLASSES, image_size: int | None = None,
                        subset: int | None = None, seed: int = 0, accelerator=None) -> DiffusionData:
    """Load ``dataset`` (``fashion-mnist``, ``digits`` or an ImageFolder path) keeping ``classes`` only; an
    ImageFolder is decoded in shares by the ``accelerator``'s processes, if given (call it on every one)."""
    builtin = builtin_dataset(dataset)
    hflip = True
    if builtin is not None:
        b = load_fashion_mnist(data_root) if builtin != "digits" else load_digits()
        hflip = builtin != "digits"
        tr, te = b.train, b.test
        xtr, ytr, xte, yte, n = tr.images, tr.labels, te.images, te.labels, b.num_classes
        name = b.name
        names = FASHION_MNIST_NAMES if builtin != "digits" else DIGIT_NAMES
    elif Path(dataset).is_dir():
        xtr, ytr, xte, yte, names = _image_folder(Path(dataset), image_size or 32, accelerator=accelerator)
        n = len(names)
        name = Path(dataset).name
    else:
        raise unknown_dataset(dataset)
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise DataError(f"{name} has classes 0-{n - 1}; --classes asks for {bad}")
        xtr, ytr = _select(xtr, ytr, classes)
        xte, yte = _select(xte, yte, classes)
    if image_size is not None and image_size != xtr.shape[-1]:
        xtr = _resize_uint8(xtr, image_size)
        xte = _resize_uint8(xte, image_size)
    if subset is not None:
        if subset < 1:
            raise DataError(f"--subset must be positive, got {subset}")
        idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:subset]
        xtr, ytr = xtr[idx], ytr[idx]
    present = tuple(sorted(int(c) for c in np.unique(ytr.numpy())))
    return DiffusionData(name, xtr.contiguous(), ytr.long(), xte.contiguous(), yte.long(), n, present, hflip,
                         class_names=tuple(names))


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    y = resize(to_float(x), size)
    return y.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
