"""Images per second that the ImageFolder training loader delivers, prepared on the device, with autoprog's
defaults (workers, uint8 batches, one loader for the run) against the loader it replaced (0 workers, float32
batches normalised as they are decoded, a new loader every epoch), in one run on a generated ImageFolder of JPEGs.
Both crop at the training size (``--size``), as the trainer does by default; ``--stage-resolution`` crops the new
loader's images at an earlier stage's side, as the trainer does with ``--loader-resolution stage``. Twice: with no
model (the data path's ceiling), and with a training step of a small ViT on every batch (``--model``), where
workers decode while the model trains.

    python benchmarks/loader_speed.py                      # 224-px JPEGs, 512 images, 3 epochs, batch 64
    python benchmarks/loader_speed.py --images 256 --size 128 --epochs 2 --out loader.json

``--device cuda`` prepares the batches on a GPU (pinned, non-blocking copies for the new loader). The two
loaders alternate epoch by epoch, so a busy machine slows both alike; the figure is the median epoch's rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader


def make_folder(root: Path, images: int, size: int, classes: int = 4, val: int | None = None) -> Path:
    """``images`` random-texture JPEGs of ``size``×``size`` in train/ and ``val`` (default: one per class) in val/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes if val is None else val)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth, JPEG-like content
            Image.fromarray(low).resize((size, size), Image.BILINEAR).save(d / f"{i}.jpg", quality=90)
    return root


def old_loader(root: Path, size: int, batch: int, epoch: int) -> DataLoader:
    """The loader autoprog used before: float32 normalised in the worker, 0 workers, built every epoch."""
    from torchvision import datasets, transforms

    from autoprog.data import CROP_SCALE  # (the crops the new loader makes: the same work)

    tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(CROP_SCALE, 1.0)), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(str(root / "train"), transform=lambda im: tf(im.convert("RGB")))
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(epoch))


def make_step(model_name: str, size: int, device):
    """One training step of a small timm ViT on a batch (patches of ``size``/7 pixels: a 7×7 token grid)."""
    import timm

    net = timm.create_model(model_name, img_size=size, patch_size=size // 7, num_classes=4).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(net(x), y.to(device, non_blocking=True))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed_epoch(batches, prepare, device, step=None) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for x, y in batches:
        x = prepare(x.to(device, non_blocking=True))
        if step is not None:
            step(x, y)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224, help="image side in pixels (stored and trained)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="the new loader's workers (default: autoprog's)")
    p.add_argument("--stage-resolution", type=int, default=None,
                   help="the new loader crops at this side, as at a stage of that resolution (needs --model none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model trained on each batch in the second "
                                                                    "measurement ('none': only the first)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    a = p.parse_args(argv)
    from autoprog.data import default_workers, load_image_folder

    device = torch.device(a.device)
    workers = default_workers() if a.workers is None else a.workers
    steps = {"data only": None}
    if a.model != "none":
        steps[f"with {a.model} training"] = make_step(a.model, a.size, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(a),
              "workers": workers, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "jpegs", a.images, a.size)
        bundle = load_image_folder(root, a.size)
        sampler = bundle.epoch_sampler(seed=0)
        if a.stage_resolution:
            if a.model != "none":
                raise SystemExit("--stage-resolution needs --model none (the model's step is at --size)")
            sampler.resolution = a.stage_resolution
        new = bundle.loader("train", a.batch_size, drop_last=True, num_workers=workers,
                            pin_memory=device.type == "cuda", sampler=sampler)
        for what, step in steps.items():
            rates = {"old": [], "new": []}
            for epoch in range(a.epochs + 1):  # the first epoch of each warms up (worker start-up counts once)
                t, n = timed_epoch(old_loader(root, a.size, a.batch_size, epoch), lambda x: x, device, step)
                if epoch:
                    rates["old"].append(n / t)
                sampler.begin_epoch(epoch)
                t, n = timed_epoch(new, lambda x: bundle.prepare(x, train=False), device, step)
                if epoch:
                    rates["new"].append(n / t)
            old, new_rate = statistics.median(rates["old"]), statistics.median(rates["new"])
            result["rows"].append({"what": what, "old_images_per_s": round(old, 1),
                                   "new_images_per_s": round(new_rate, 1), "ratio": round(new_rate / old, 3),
                                   "per_epoch": rates})
            print(f"ImageFolder {a.size}-px JPEGs on {result['device']}, {what}: {new_rate:.0f} images/s with the "
                  f"defaults ({workers} workers, uint8) against {old:.0f} before (0 workers, float32): "
                  f"{new_rate / old:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
