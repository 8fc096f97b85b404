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

from ..data import image_folder, image_folder_dirs, read_image
from ..errors import ConfigError, DataError
from .token_labels import score_map_path

FP16_EXACT = 2048  # float16 holds every whole number up to here


def load_teacher(path: str | Path, model: str = "vit"):
    """The classifier at ``path`` with its own head (``model``: ``timm:NAME`` for a bare weights file), in its
    elastic adapter at full size, in evaluation mode."""
    from ..formats import read_weights
    from .pretrained import locate

    found = locate(path, model, flag="--teacher")
    num_classes = found.config.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"--teacher {path}: its config names no number of classes (num_classes); a teacher needs "
                          "its trained head")
    in_chans = int(found.config.get("in_chans") or 3)
    if in_chans != 3:
        raise ConfigError(f"--teacher {path} takes {in_chans}-channel images; ImageFolder images are read as RGB")
    net = found.build(num_classes, in_chans)
    weights = read_weights(found.weights)
    missing, unexpected = net.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        what = ", ".join([*(f"missing {k}" for k in missing[:3]), *(f"unexpected {k}" for k in unexpected[:3])])
        raise ConfigError(f"--teacher {found.weights} does not fit its own architecture ({what})")
    net.num_classes = num_classes
    return net.eval()


def check_maps_out(dataset: str | Path, out: str | Path) -> tuple[Path, Path]:
    """The ImageFolder's (train, test) splits; a one-line error when ``out`` lies inside one of them."""
    root, out = Path(dataset), Path(out)
    splits = image_folder_dirs(root)
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
    are fewer); returns ``{"written", "kept", "grid", "top_k"}``."""
    from .token_labels import missing_score_maps

    root, out = Path(dataset), Path(out)
    train_dir, _ = check_maps_out(root, out)
    folder = image_folder(root, train_dir, min_classes=2)
    if teacher.num_classes != len(folder.classes):
        raise ConfigError(f"the teacher has {teacher.num_classes} classes, {train_dir} {len(folder.classes)}: token "
                          "labels must name the data's classes")
    top_k = min(5, len(folder.classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(folder.classes):
        raise ConfigError(f"--top-k must be between 1 and the {len(folder.classes)} classes, got {top_k}")
    todo = set(map(str, missing_score_maps(out, [p for p, _ in folder.samples])))
    samples = [(p, y) for p, y in folder.samples if str(score_map_path(out, p)) in todo]
    kept = len(folder.samples) - len(samples)
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)  # load_image_folder's statistics
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
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
            grid = tuple(maps.shape[-2:])
            for m, i in zip(maps, index.tolist()):
                _save(m.clone(), score_map_path(out, samples[i][0]))
            written += len(index)
            progress(f"score maps: {written + kept}/{len(folder.samples)}")
    return {"written": written, "kept": kept, "grid": grid, "top_k": top_k}


def _save(tensor: torch.Tensor, path: Path) -> None:
    """``tensor`` to ``path`` whole or not at all (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensor, tmp)
    os.replace(tmp, path)
