"""Teacher score maps for token labeling (``autoprog token-labels``): a trained classifier's class logits at each
place of its token grid, for every training image of an ImageFolder, in the format :mod:`.token_labels` reads
(the TokenLabeling repository's: ``<out>/<class>/<stem>.pt``, ``[2, k, H, W]``, the top-``k`` logits and their
class indices; float16, float32 when class indices above 2048 must stay exact).

The teacher is any classifier autoprog can load with its head (a run's ``OUT/model``, a timm checkpoint folder):
a ViT/DeiT gives its head on each patch token, a VOLO its auxiliary head on each coarse token. Each image is
resized whole to the teacher's resolution (no crop), so a map covers its whole image, which is what the crops'
boxes of token labeling assume (the official ImageNet maps were made from centre crops instead). Maps already
written are kept: an interrupted generation continues where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD, image_folder, image_folder_dirs, read_image
from ..errors import ConfigError, DataError
from .token_labels import MANIFEST, first_difference, score_map_path

FP16_EXACT = 2048  # float16 holds every whole number up to here


def load_teacher(path: str | Path, model: str = "vit"):
    """The classifier at ``path`` with its own head (``model``: ``timm:NAME`` for a bare weights file), in its
    elastic adapter at full size, in evaluation mode; ``norm``: the (mean, std) it was trained with (a timm
    checkpoint's ``pretrained_cfg``, else ImageNet's, as autoprog's ImageFolder loader)."""
    from ..formats import read_weights
    from .pretrained import locate

    found = locate(path, model, flag="--teacher")
    weights = read_weights(found.weights)
    cfg = found.config
    pretrained_cfg = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    head = weights.get("head.weight")
    num_classes = cfg.get("num_classes") or (int(head.shape[0]) if head is not None and head.ndim == 2 else None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"--teacher {path}: neither its config (num_classes) nor its weights (head.weight) say its "
                          "number of classes; a teacher needs its trained head")
    input_size = pretrained_cfg.get("input_size")
    in_chans = int(cfg.get("in_chans") or (input_size[0] if isinstance(input_size, list) and input_size else 3))
    if in_chans != 3:
        raise ConfigError(f"--teacher {path} takes {in_chans}-channel images; ImageFolder images are read as RGB")
    net = found.build(num_classes, in_chans)
    try:
        missing, unexpected = net.model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # tensors of other shapes
        raise ConfigError(f"--teacher {found.weights} does not fit its own architecture "
                          f"({' '.join(str(e).split())[:160]})") from None
    if missing or unexpected:
        what = ", ".join([*(f"missing {k}" for k in missing[:3]), *(f"unexpected {k}" for k in unexpected[:3])])
        raise ConfigError(f"--teacher {found.weights} does not fit its own architecture ({what})")
    net.num_classes, net.source = num_classes, str(found.weights.resolve())
    names = cfg.get("classes")  # an autoprog model folder's class names (a run made after 2026-12-07)
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"--teacher {path}: its config names {len(names)} classes for its {num_classes} outputs")
    net.class_names = tuple(names) if names is not None else None
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    ok = all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v) for v in (mean, std))
    net.norm = (tuple(mean), tuple(std)) if ok else (IMAGENET_MEAN, IMAGENET_STD)
    return net.eval()


def check_maps_out(dataset: str | Path, out: str | Path) -> tuple[Path, Path]:
    """The ImageFolder's (train, test) splits; a one-line error when ``out`` lies inside one of them."""
    root, out = Path(dataset), Path(out)
    splits = image_folder_dirs(root)
    if out.resolve() == root.resolve():
        raise ConfigError(f"--out {out} is the dataset's own folder: the maps' class folders would lie beside train/ "
                          f"and val/; write them to a folder of their own (e.g. {root / 'token-labels'})")
    for split in splits:
        if out.resolve().is_relative_to(split.resolve()):
            raise ConfigError(f"--out {out} lies inside the dataset's {split.name}/ split; write the maps elsewhere "
                              f"(beside it, e.g. {root / 'token-labels'}, is fine)")
    return splits


class _WholeImages(torch.utils.data.Dataset):
    """The training images resized whole to ``size`` × ``size`` (uint8) with their index."""

    def __init__(self, samples: list, size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF

        img = read_image(self.samples[i][0])
        return TF.pil_to_tensor(TF.resize(img, [self.size, self.size], antialias=True)), i


def generate_score_maps(teacher, dataset: str | Path, out: str | Path, top_k: int | None = None, batch_size: int = 64,
                        workers: int = 0, device: str | torch.device = "cpu",
                        progress: Callable[[str], None] = print) -> dict:
    """Write the score map of every training image of the ImageFolder ``dataset`` into ``out`` with ``teacher``
    (:func:`load_teacher`), its ``top_k`` classes per place (default: 5, the official maps', or all when there
    are fewer); returns ``{"written", "kept", "grid", "top_k"}``. ``out`` records what made its maps
    (:data:`MANIFEST`: the teacher's weights file, ``top_k``, the resolution, the class names); maps kept from a run with other
    settings are refused."""
    from .token_labels import missing_score_maps

    root, out = Path(dataset), Path(out)
    train_dir, _ = check_maps_out(root, out)
    folder = image_folder(root, train_dir, min_classes=2)
    if teacher.num_classes != len(folder.classes):
        raise ConfigError(f"the teacher has {teacher.num_classes} classes, {train_dir} {len(folder.classes)}: token "
                          "labels must name the data's classes")
    names = getattr(teacher, "class_names", None)
    first = first_difference(names, folder.classes) if names is not None else None
    if first is not None:  # (as many names as classes: checked above)
        raise ConfigError(f"the teacher's class {first} is {names[first]!r}, {train_dir}'s {folder.classes[first]!r}: "
                          "token labels must name the data's classes, in the data's order")
    top_k = min(5, len(folder.classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(folder.classes):
        raise ConfigError(f"--top-k must be between 1 and the {len(folder.classes)} classes, got {top_k}")
    todo = set(missing_score_maps(out, [p for p, _ in folder.samples]))
    samples = [(p, y) for p, y in folder.samples if score_map_path(out, p) in todo]
    kept = len(folder.samples) - len(samples)
    _check_manifest(out, {"teacher": getattr(teacher, "source", None), "top_k": top_k,
                          "resolution": teacher.full_resolution, "classes": list(folder.classes)}, kept)
    mean = torch.tensor(teacher.norm[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(teacher.norm[1], device=device).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(_WholeImages(samples, teacher.full_resolution), batch_size=batch_size,
                                         num_workers=workers)
    teacher.to(device)
    written, grid = 0, None
    dtype = torch.float16 if len(folder.classes) - 1 <= FP16_EXACT else torch.float32
    with torch.no_grad():
        for x, index in loader:
            x = (x.to(device).float() / 255.0 - mean) / std
            logits = teacher.token_logits(x).float()
            if not torch.isfinite(logits).all():
                raise DataError("the teacher gave non-finite logits: a diverged model cannot label")
            values, classes = logits.topk(top_k, dim=-1)  # [B, H, W, k]
            maps = torch.stack([values, classes.float()], 1).permute(0, 1, 4, 2, 3).to(dtype).cpu()
            if not torch.isfinite(maps).all():
                raise DataError(f"the teacher's logits exceed {dtype}'s range: they cannot be stored as score maps")
            grid = tuple(maps.shape[-2:])
            for m, i in zip(maps, index.tolist()):
                _save(m.clone(), score_map_path(out, samples[i][0]))
            written += len(index)
            progress(f"score maps: {written + kept}/{len(folder.samples)}")
    return {"written": written, "kept": kept, "grid": grid, "top_k": top_k}


def _check_manifest(out: Path, made_by: dict, kept: int) -> None:
    """Write what makes the maps of ``out``; refuse when maps already there were made otherwise."""
    from ..checkpoint import write_json
    from ..formats import read_json_object

    path = out / MANIFEST
    if path.is_file():
        before = read_json_object(path, "token-labels manifest")
        differ = [f"{k}: {before[k]!r} there, {v!r} now" for k, v in made_by.items()  # (a key added since: not
                  if k in before and before[k] != v]                                   # known, not compared)
        if differ and kept:
            raise ConfigError(f"--out {out} holds score maps made otherwise ({'; '.join(differ)}): use another --out "
                              "or empty it")
    elif kept:
        raise ConfigError(f"--out {out} holds {kept} score maps of unknown making (no {MANIFEST}): use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, made_by)


def _save(tensor: torch.Tensor, path: Path) -> None:
    """``tensor`` to ``path`` whole or not at all (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensor, tmp)
    os.replace(tmp, path)
