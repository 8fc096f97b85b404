"""Token labeling with MixToken (Jiang et al., "All tokens matter"), the paper's VOLO recipe (Appendix B), as the
official AutoProg code runs it (its ``--token-label --token-label-data DIR``, the TokenLabeling package ``tlt``).

**Score maps.** A teacher's dense predictions, one file per training image: ``<DIR>/<class>/<stem>.pt`` (the image
``train/<class>/<stem>.JPEG``), a ``[2, k, H, W]`` float16 tensor: the top-``k`` logits at each of ``H`` × ``W``
places (``[0]``) and their class indices (``[1]``), as the TokenLabeling repository's ``generate_label.py`` writes
them (its ImageNet maps: ``k`` = 5, 15 × 15, from NFNet-F6). autoprog downloads none: bring your own.

**In the loader workers** (:class:`TokenLabelFolder`) each image and its map go through the same random geometry,
in the official order: a horizontal flip, RandAugment on the whole image (its rotations, shears and translations
also move the map, :class:`LabelRandAugment`), then the random resized crop, whose box travels with the map as four
fractions of the image (top, left, height, width).

**On the device** (:func:`token_label_targets`) the map is made dense over the classes, the crop's box is cut out
of it with ``roi_align`` at one target per coarse token of the stage (its side ``resolution // 16``, the official
``current_r // 16``) and once whole for the class token, each passed through a softmax and label smoothing.

**In the model** MixToken swaps a random box of patch tokens with the batch's reverse after the patch embedding and
swaps the auxiliary head's token outputs back (:meth:`autoprog.adapters.volo.ElasticVOLO.token_labelled`);
:func:`token_label_loss` is the class token's cross-entropy against the teacher's crop label, mixed by the box's
area, plus ``dense_weight`` (0.5) times the tokens' against theirs. (The official ``--ground-truth`` variant and
token labeling with Mixup/CutMix are not built.)

``geometry="official"`` (the default) reproduces two quirks of the official code: its ``roi_align`` box gives the
crop's rows as ``x`` and its columns as ``y`` (so the map is cut transposed), and it rotates and shears the map in
cell units (rotations about a point half a cell off the centre), which follows the image only when the image is
square. ``"corrected"`` cuts the box the right way round and moves the map with each operation's own pixel
geometry. Neither mode knows whether a map covers the whole image or (as the official ImageNet maps, made from
centre crops) a part of it: the box is taken as fractions of the map.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import crop_interpolation
from ..errors import ConfigError, DataError

GEOMETRIES = ("official", "corrected")
MAP_FRAMES = ("whole", "centre-square")  # the part of its image a score map covers
MANIFEST = "token-labels.json"  # what made a folder's maps (``autoprog token-labels``): teacher, top-k, classes
DENSE_WEIGHT = 0.5  # the official --dense-weight: the tokens' loss against the class token's (--cls-weight 1)


# ------------------------------------------------------------------------------------------- files
def score_map_path(label_root: Path, image_path: str | Path) -> Path:
    """Where the score map of ``image_path`` lies: ``label_root/<class>/<name up to its first dot>.pt``."""
    p = Path(image_path)
    return Path(label_root) / p.parent.name / (p.name.split(".")[0] + ".pt")


def missing_score_maps(label_root: Path, image_paths: list) -> list[Path]:
    """The score maps of ``image_paths`` that ``label_root`` lacks (each class folder listed once); two images of
    one map name (``a.png`` and ``a.jpg``: the name up to its first dot) are a one-line :class:`DataError`."""
    import os

    listed: dict[Path, set[str]] = {}
    seen: dict[Path, str] = {}
    out = []
    for image in image_paths:
        path = score_map_path(label_root, image)
        if path in seen:
            raise DataError(f"{seen[path]} and {image} would share the score map {path} (a map is named by the image's "
                            "name up to its first dot): rename one")
        seen[path] = str(image)
        if path.parent not in listed:
            listed[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if path.name not in listed[path.parent]:
            out.append(path)
    return out


def load_score_map(path: Path, num_classes: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The score map at ``path`` as float32 ``[2, k, H, W]``, checked: a missing, unreadable or malformed file (not
    ``[2, k, H, W]``, another shape than ``shape``, non-finite logits, indices that are not classes of the data) is a
    one-line :class:`DataError` naming it."""
    if not path.is_file():
        raise DataError(f"no token-label score map at {path}: --token-labels needs one per training image "
                        "(<dir>/<class>/<image stem>.pt)")
    try:
        m = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        import pickle

        why = "not a tensor file torch reads safely" if isinstance(e, pickle.UnpicklingError) \
            else " ".join(str(e).split())[:120]
        raise DataError(f"cannot read token-label score map {path} ({why})") from None
    if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != 2 or not m.is_floating_point() \
            or min(m.shape) < 1:
        what = f"a {tuple(m.shape)} {m.dtype} tensor" if isinstance(m, torch.Tensor) else type(m).__name__
        raise DataError(f"token-label score map {path} is {what}, not [2, k, H, W] floats (top-k logits and their "
                        "class indices)")
    if shape is not None and tuple(m.shape) != tuple(shape):
        raise DataError(f"token-label score map {path} is {list(m.shape)}, the first one read was {list(shape)}: "
                        "all maps must have one shape")
    m = m.float()
    idx = m[1]
    if not torch.isfinite(m[0]).all():
        raise DataError(f"token-label score map {path} holds non-finite logits")
    if not (torch.equal(idx, idx.round()) and idx.min() >= 0 and idx.max() < num_classes):
        raise DataError(f"token-label score map {path} has class indices outside 0..{num_classes - 1} (the data's "
                        f"{num_classes} classes) or not whole")
    return m


# ------------------------------------------------------------------- the maps' geometry (workers)
def affine_label(label: torch.Tensor, matrix: tuple[float, ...], outside: str = "constant") -> torch.Tensor:
    """The affine ``matrix`` (a, b, c, d, e, f: input row = a·row + b·col + c, input column = d·row + e·col + f, in
    cell indices) applied to a ``[2, k, H, W]`` map the official way: scipy's nearest-neighbour ``affine_transform``,
    logits filled with 0 outside (``outside``: scipy's mode; the official ``constant`` also empties a source
    within half a cell beyond the edge cells, ``grid-constant`` keeps it, as PIL does), indices with the nearest
    edge."""
    from scipy import ndimage

    a, b, c, d, e, f = matrix
    m = [[1, 0, 0, 0], [0, a, b, c], [0, d, e, f]]
    value = ndimage.affine_transform(label[0].numpy(), matrix=m, order=0, mode=outside)
    index = ndimage.affine_transform(label[1].numpy(), matrix=m, order=0, mode="nearest")
    return torch.from_numpy(np.stack([value, index]))


def _shear_x_label(label, factor):  # (rows, columns): PIL's x-shear is a shear of the columns by the rows
    return affine_label(label, (1, 0, 0, factor, 1, 0))


def _shear_y_label(label, factor):
    return affine_label(label, (1, factor, 0, 0, 1, 0))


def _translate_x_rel_label(label, pct):
    return affine_label(label, (1, 0, 0, 0, 1, pct * label.shape[3]))


def _translate_y_rel_label(label, pct):
    return affine_label(label, (1, 0, pct * label.shape[2], 0, 1, 0))


def _rotate_label(label, degrees):
    """PIL's ``rotate(degrees)`` on the map as the official code turns it: in cell units, about (H/2, W/2) in cell
    indices (half a cell off the centre)."""
    h, w = label.shape[2:]
    cr, cc = h / 2.0, w / 2.0
    angle = math.radians(degrees)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    # in (row, column): input = R @ (output - centre) + centre
    return affine_label(label, (cos, sin, cr - cos * cr - sin * cc, -sin, cos, cc + sin * cr - cos * cc))


OFFICIAL_LABEL_OPS = {"Rotate": _rotate_label, "ShearX": _shear_x_label, "ShearY": _shear_y_label,
                      "TranslateXRel": _translate_x_rel_label, "TranslateYRel": _translate_y_rel_label}


def pil_matrix(name: str, args: tuple, size: tuple[int, int]) -> tuple[float, ...]:
    """The affine matrix (a, b, c, d, e, f) that timm's operation ``name`` with level ``args`` gives PIL for an
    image of ``size`` (width, height): input (x, y) = (a x + b y + c, d x + e y + f), pixel centres at +0.5."""
    w, h = size
    if name == "Rotate":  # PIL's Image.rotate: about (w/2, h/2)
        angle = -math.radians(args[0])
        a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        cx, cy = w / 2.0, h / 2.0
        return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy
    if name == "ShearX":
        return 1, args[0], 0, 0, 1, 0
    if name == "ShearY":
        return 1, 0, 0, args[0], 1, 0
    if name == "TranslateXRel":
        return 1, 0, args[0] * w, 0, 1, 0
    return 1, 0, 0, 0, 1, args[0] * h  # TranslateYRel


def map_frame(size: tuple[int, int], frame: str = "whole") -> tuple[float, float, float, float]:
    """The pixels ``(x0, y0, width, height)`` of an image of ``size`` (width, height) that its score map covers:
    all of it, or (``centre-square``) its central square, as the TokenLabeling repository's ImageNet maps (made
    from centre crops of the whole shorter side, ``generate_label.py --crop-pct 1.0``)."""
    w, h = size
    if frame == "whole":
        return 0.0, 0.0, float(w), float(h)
    side = min(w, h)
    return (w - side) / 2.0, (h - side) / 2.0, float(side), float(side)


def corrected_label_op(label: torch.Tensor, name: str, args: tuple, size: tuple[int, int],
                       frame: str = "whole") -> torch.Tensor:
    """The image operation's own geometry on the map (``geometry="corrected"``): PIL's pixel matrix
    (:func:`pil_matrix`) carried to cell indices, whatever the cells' aspect: a cell's centre (r, c) is the pixel
    (x0 + (c + 0.5) · w/W, y0 + (r + 0.5) · h/H) of the part of the image the map covers (:func:`map_frame`)."""
    a, b, c, d, e, f = pil_matrix(name, args, size)
    x0, y0, fw, fh = map_frame(size, frame)
    sh, sw = fh / label.shape[2], fw / label.shape[3]  # pixels per cell down and across
    row = (e, d * sw / sh, (d * (x0 + 0.5 * sw) + e * (y0 + 0.5 * sh) + f - y0) / sh - 0.5)
    col = (b * sh / sw, a, (a * (x0 + 0.5 * sw) + b * (y0 + 0.5 * sh) + c - x0) / sw - 0.5)
    return affine_label(label, (*row, *col), outside="grid-constant")


UNSUPPORTED_OPS = ("TranslateX", "TranslateY")  # absolute translations: the official code has no map op for them


class LabelRandAugment:
    """timm's RandAugment on an image and its score map: the operations, their choice and magnitudes are timm's
    (``ops``: timm ``AugmentOp``s, whose ``magnitude`` AdaReg sets per epoch); the geometric ones (rotate, shear,
    relative translate) also move the map: in cell units as the official code (:data:`OFFICIAL_LABEL_OPS`), or
    (``corrected``) with the image's own pixel geometry (:func:`corrected_label_op`)."""

    def __init__(self, randaugment, geometry: str = "official", frame: str = "whole"):
        bad = [op.name for op in randaugment.ops if op.name in UNSUPPORTED_OPS]
        if bad:
            raise ConfigError(f"RandAugment operation(s) {', '.join(bad)} move the image by absolute pixels, which "
                              "the score maps cannot follow; use the rand-* policies (relative translations)")
        self.ops, self.num_layers = randaugment.ops, randaugment.num_layers
        self.choice_weights = randaugment.choice_weights
        self.geometry, self.frame = geometry, frame

    def __call__(self, img, label):
        ops = np.random.choice(self.ops, self.num_layers, replace=self.choice_weights is None, p=self.choice_weights)
        for op in ops:
            img, label = self._apply(op, img, label)
        return img, label

    def _apply(self, op, img, label):
        """timm's ``AugmentOp.__call__`` (the same random draws), the level's arguments also given to the map's op."""
        if op.prob < 1.0 and random.random() > op.prob:
            return img, label
        magnitude = op.magnitude
        if op.magnitude_std > 0:
            magnitude = random.uniform(0, magnitude) if op.magnitude_std == float("inf") \
                else random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or 10))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        size = img.size
        img = op.aug_fn(img, *args, **op.kwargs)
        if op.name in OFFICIAL_LABEL_OPS:
            label = OFFICIAL_LABEL_OPS[op.name](label, *args) if self.geometry == "official" \
                else corrected_label_op(label, op.name, args, size, self.frame)
        return img, label


class TokenLabelTransform:
    """A training image and its score map through the official order: horizontal flip (p = 0.5), RandAugment
    (optional, :class:`LabelRandAugment`), the random resized crop (timm's, its resampling drawn per image when
    ``random``; its box returned as fractions ``(top, left, height, width)`` of the part of the image the map
    covers, ``frame``: :func:`map_frame`), uint8 tensor. ``transforms`` lists the crop so that the trainer can set
    its output side (``--loader-resolution stage``)."""

    def __init__(self, crop, randaugment: LabelRandAugment | None = None, geometry: str = "official",
                 frame: str = "whole"):
        self.crop, self.randaugment, self.geometry, self.frame = crop, randaugment, geometry, frame
        self.transforms = [crop]

    def __call__(self, img, label):
        from torchvision.transforms import functional as TF

        if torch.rand(1) < 0.5:
            img, label = TF.hflip(img), label.flip(3)
        if self.randaugment is not None:
            img, label = self.randaugment(img, label)
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        x0, y0, W, H = map_frame(img.size, self.frame)
        coords = torch.tensor([(i - y0) / H, (j - x0) / W, h / H, w / W])
        img = TF.resized_crop(img, i, j, h, w, list(self.crop.size), crop_interpolation(self.crop), antialias=True)
        return TF.pil_to_tensor(img), label, coords


class TokenLabelFolder(Dataset):
    """An ImageFolder's training images with their score maps: item ``i`` is ``(uint8 image, (class, map, box))``,
    the map ``[2, k, H, W]`` float32 (class indices above 2048 stay exact) and the crop's box as :class:`TokenLabelTransform` gives them."""

    def __init__(self, folder, label_root: str | Path, transform: TokenLabelTransform, num_classes: int):
        self.folder, self.label_root, self.transform = folder, Path(label_root), transform
        self.num_classes = num_classes
        if not self.label_root.is_dir():
            raise DataError(f"--token-labels {self.label_root} is not a directory of score maps")
        missing = missing_score_maps(self.label_root, [p for p, _ in folder.samples])
        if missing:
            raise DataError(f"--token-labels {self.label_root} lacks the score maps of {len(missing)} of "
                            f"{len(folder.samples)} training images, such as {missing[0]}")
        first = load_score_map(score_map_path(self.label_root, folder.samples[0][0]), num_classes)
        self.map_shape = tuple(first.shape)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i):
        path, y = self.folder.samples[i]
        img = self.folder.loader(path)
        label = load_score_map(score_map_path(self.label_root, path), self.num_classes, self.map_shape)
        x, label, coords = self.transform(img, label)
        return x, (y, label, coords)

    def with_randaugment(self, randaugment) -> TokenLabelFolder:
        """A copy whose transform RandAugments image and map with timm's ``randaugment`` (AdaReg's)."""
        import copy

        out = copy.copy(self)
        geometry, frame = self.transform.geometry, self.transform.frame
        out.transform = TokenLabelTransform(self.transform.crop, LabelRandAugment(randaugment, geometry, frame),
                                            geometry, frame)
        return out


def with_token_labels(bundle, label_root: str | Path, randaugment: str | None = None,
                      geometry: str = "official", frame: str = "whole"):
    """``bundle`` (an ImageFolder's) whose training images come with their score maps (:class:`TokenLabelFolder`,
    ``randaugment``: timm's config string, applied to image and map; ``frame``: the part of each image its map
    covers, :func:`map_frame`); the first map is read and checked now."""
    import dataclasses

    from torch.utils.data import Subset

    from ..data import randaugment_transform

    if geometry not in GEOMETRIES:
        raise ConfigError(f"--token-label-geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    if frame not in MAP_FRAMES:
        raise ConfigError(f"--token-label-map-frame must be one of {', '.join(MAP_FRAMES)}, got {frame!r}")
    if frame != "whole" and geometry != "corrected":
        raise ConfigError("--token-label-map-frame centre-square needs --token-label-geometry corrected (the "
                          "official code cuts every box from the map as if it covered the whole image)")
    if frame != "whole" and (Path(label_root) / MANIFEST).is_file():
        raise ConfigError(f"--token-labels {label_root} was written by autoprog token-labels, whose maps cover the "
                          "whole image: drop --token-label-map-frame centre-square")
    if bundle.in_memory or bundle.worker_crop is None:
        raise ConfigError(f"--token-labels needs an ImageFolder dataset (its score maps are per image file); "
                          f"{bundle.name} is held in memory")
    check_map_classes(Path(label_root), bundle.classes)
    ra = None
    if randaugment:
        ra = LabelRandAugment(randaugment_transform(randaugment, bundle.image_size, bundle.mean,
                                                    bundle.randaugment_interpolation), geometry, frame)
    transform = TokenLabelTransform(bundle.worker_crop, ra, geometry, frame)

    def wrapped(ds):
        if isinstance(ds, Subset):
            return Subset(wrapped(ds.dataset), ds.indices)
        return TokenLabelFolder(ds, label_root, transform, bundle.num_classes)

    return dataclasses.replace(bundle, train=wrapped(bundle.train))


def first_difference(names, classes) -> int | None:
    """The first place where two lists of class names differ (the shorter one's length when one extends the
    other); None when they are the same."""
    names, classes = tuple(names), tuple(classes)
    if names == classes:
        return None
    return next((i for i, (a, b) in enumerate(zip(names, classes)) if a != b), min(len(names), len(classes)))


def check_map_classes(label_root: Path, classes: tuple[str, ...] | None) -> None:
    """Refuse score maps whose manifest (:data:`MANIFEST`, ``autoprog token-labels``') names other classes than
    the data's, or the same in another order (maps without a manifest, such as the official ones, are not checked)."""
    from ..formats import check_fields, read_json_object

    manifest = label_root / MANIFEST
    if classes is None or not manifest.is_file():
        return
    made = read_json_object(manifest, "token-labels manifest")
    check_fields(made, {"classes": [str]}, str(manifest))
    names = made.get("classes")
    differ = first_difference(names, classes) if names is not None else None
    if differ is not None:
        there = names[differ] if differ < len(names) else "none"
        here = classes[differ] if differ < len(classes) else "none"
        raise DataError(f"--token-labels {label_root} labels {len(names)} classes whose number {differ} is {there!r}, "
                        f"the data's is {here!r}: its maps name other classes")


def prepare_model_for_token_labels(net) -> None:
    """Refuse a model that token labeling cannot train: it needs VOLO's class token and auxiliary head."""
    if not hasattr(net, "token_labelled"):
        raise ConfigError(f"--token-labels trains VOLO's auxiliary head on the score maps; {net.family} has none: "
                          "use --model timm:volo_d1_224 (or another timm:volo_*)")
    net.check_token_labels()


def prepare_token_labels(cfg, bundle, net):
    """The data of a run with ``cfg.token_labels`` (a :class:`TrainConfig`): checked against ``net`` and given its
    score maps (:func:`with_token_labels`); ``bundle`` as it is without."""
    if cfg.token_labels is None:
        return bundle
    prepare_model_for_token_labels(net)
    return with_token_labels(bundle, cfg.token_labels, cfg.randaugment, cfg.token_label_geometry,
                             cfg.token_label_map_frame)


def _token_folder(bundle) -> TokenLabelFolder | None:
    """``bundle``'s :class:`TokenLabelFolder` under any ``--subset``'s Subsets (None: no score maps)."""
    from torch.utils.data import Subset

    ds = bundle.train
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds if isinstance(ds, TokenLabelFolder) else None


def is_token_labelled(bundle) -> bool:
    """Whether ``bundle``'s training items carry score maps (:func:`with_token_labels`)."""
    return _token_folder(bundle) is not None


def probe_token_labels(bundle, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random score maps of ``bundle``'s shape and crop boxes, on ``device``: what a step timer feeds
    :func:`token_label_targets` so that a timed step costs what a token-labelled training step does."""
    _, k, h, w = _token_folder(bundle).map_shape
    maps = torch.stack([torch.randn(batch_size, k, h, w, device=device),
                        torch.randint(0, bundle.num_classes, (batch_size, k, h, w), device=device).float()], 1)
    boxes = torch.tensor([0.1, 0.2, 0.6, 0.5], device=device).expand(batch_size, 4)
    return maps, boxes


# ------------------------------------------------------------------------------- targets (device)
def token_label_targets(maps: torch.Tensor, coords: torch.Tensor, num_classes: int, label_size: int,
                        smoothing: float = 0.1, geometry: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of a batch of score maps ``[B, 2, k, H, W]`` and crop boxes ``[B, 4]``, on their device: the
    class token's ``[B, C]`` (the whole box) and the tokens' ``[B, label_size², C]`` (the box cut into
    ``label_size`` × ``label_size`` cells), each the softmax of the ``roi_align``-ed logits (zero for classes
    outside the top ``k``), smoothed as the official code does (``p · (1 − s + s/C) + s/C``)."""
    from torchvision.ops import roi_align

    b, _, _, h, w = maps.shape
    dense = torch.zeros(b, num_classes, h, w, device=maps.device, dtype=torch.float32)
    dense.scatter_(1, maps[:, 1].long(), maps[:, 0].float())
    top, left, height, width = coords.float().unbind(1)
    index = torch.arange(b, device=maps.device, dtype=torch.float32).view(b, 1)
    if geometry == "official":  # rows given as x, columns as y, both scaled by the map's width
        box = torch.stack([top, left, top + height, left + width], 1) * w
        inside = box
    else:
        box = torch.stack([left * w, top * h, (left + width) * w, (top + height) * h], 1)
        # the class token's target from the part of the box the map covers (a centre-square map's box may reach
        # beyond it, :func:`tokens_inside`; a whole-image map's never does)
        x0, y0, x1, y1 = box.unbind(1)  # clamped by Python numbers: no tensor built from host data, no sync
        inside = torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], 1)
    tokens = roi_align(dense, torch.cat([index, box - 0.5], 1), output_size=(label_size, label_size))  # [B, C, S, S]
    whole = roi_align(dense, torch.cat([index, inside - 0.5], 1), output_size=(1, 1)).flatten(1)  # [B, C]
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    cls = F.softmax(whole, dim=1) * on + off
    tok = F.softmax(tokens.flatten(2), dim=1) * on + off  # softmax over the classes of each cell
    return cls, tok.transpose(1, 2)


def with_ground_truth(cls_target: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """The official ``--ground-truth`` class-token target (``TokenLabelGTCrossEntropy``): the teacher's crop label
    ``cls_target`` ``[B, C]`` mixed with the smoothed one-hot true ``labels``, the teacher's weighted 0.5 where its
    top class is the true one and 0.9 where it is not (the official ``0.9 − 0.4 · agree``), on the device."""
    c = cls_target.shape[1]
    off = smoothing / c
    truth = F.one_hot(labels.long(), c).float() * (1.0 - smoothing) + off
    agree = (cls_target.argmax(1) == labels).float().unsqueeze(1)
    ratio = 0.9 - 0.4 * agree
    return cls_target * ratio + truth * (1 - ratio)


def tokens_inside(coords: torch.Tensor, label_size: int) -> torch.Tensor:
    """``[B, label_size²]`` (row-major, as the tokens' targets): 1 where a token's centre lies on the map, 0 where
    the crop's box reaches beyond it (a centre-square map, ``--token-label-map-frame centre-square``), so that the
    tokens' loss skips what the map does not label instead of training them towards a uniform guess."""
    top, left, height, width = coords.float().unbind(1)
    at = (torch.arange(label_size, device=coords.device, dtype=torch.float32) + 0.5) / label_size
    rows = top[:, None] + at[None] * height[:, None]  # [B, S]
    cols = left[:, None] + at[None] * width[:, None]
    row_in = (rows >= 0) & (rows <= 1)
    col_in = (cols >= 0) & (cols <= 1)
    return (row_in[:, :, None] & col_in[:, None, :]).flatten(1).float()


# ----------------------------------------------------------------------------------- model and loss
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def token_label_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor, box: tuple[int, int, int, int],
                     cls_target: torch.Tensor, token_target: torch.Tensor, dense_weight: float = DENSE_WEIGHT,
                     cls_weight: float = 1.0, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The official ``TokenLabelCrossEntropy``: the class token against the teacher's crop label, mixed with the
    batch's reverse by the share of tokens MixToken swapped, plus ``dense_weight`` × each token against its own
    (the model undid the swap of the token outputs); ``token_weights`` ``[B, N]`` (:func:`tokens_inside`): the
    tokens' loss is their weighted mean (all ones: the official mean)."""
    n = token_logits.shape[1]
    swapped = (box[2] - box[0]) * (box[3] - box[1])
    lam = 1.0 - swapped / n
    if lam < 1:
        cls_target = lam * cls_target + (1 - lam) * cls_target.flip(0)
    c = token_logits.shape[-1]
    if token_weights is None:
        dense = soft_cross_entropy(token_logits.reshape(-1, c), token_target.reshape(-1, c))
    else:
        per_token = torch.sum(-token_target * F.log_softmax(token_logits.float(), dim=-1), dim=-1)  # [B, N]
        dense = (per_token * token_weights).sum() / token_weights.sum().clamp_min(1.0)
    return cls_weight * soft_cross_entropy(cls_logits, cls_target) + dense_weight * dense
