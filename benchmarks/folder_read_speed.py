"""Seconds to read a fine-tuning ImageFolder into memory (diffusion data, and its evaluator's feature classifier,
which reads the whole folder again): autoprog's read (loader workers, one per core; the second read served from
the first while it is held) against the one it replaced (every image decoded in the process, twice), in one run
on a generated folder of JPEGs. The two alternate, so a busy machine slows both alike; figures are medians.

    python benchmarks/folder_read_speed.py                     # 2000 256-px JPEGs read at 64 px, 3 repeats
    python benchmarks/folder_read_speed.py --images 4000 --size 512 --read-size 256 --out read.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loader_speed import make_folder  # noqa: E402


def old_read(root: Path, size: int):
    """The read autoprog did before: each image in turn, in the process."""
    from torchvision import transforms

    from autoprog.data import image_folder

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    out = []
    for d in (root / "train", root / "val"):
        ds = image_folder(root, d, tf)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        out += [torch.stack(xs), torch.tensor(ys)]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="training images (and a tenth as many to validate)")
    p.add_argument("--size", type=int, default=256, help="stored JPEG side in pixels")
    p.add_argument("--read-size", type=int, default=64, help="side the images are read at (the model's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="the new read's workers (default: autoprog's)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    a = p.parse_args(argv)
    import autoprog.diffusion.data as ddata
    from autoprog.data import default_workers

    workers = default_workers(reserve=0) if a.workers is None else a.workers
    times: dict[str, list[float]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "jpegs", a.images, a.size, classes=10, val=max(10, a.images // 10))
        for _ in range(a.repeats):
            start = time.perf_counter()
            first = old_read(root, a.read_size)
            second = old_read(root, a.read_size)  # the feature classifier's read
            times["old"].append(time.perf_counter() - start)
            del first, second
            ddata._DECODED.clear()
            gc.collect()
            start = time.perf_counter()
            first = ddata._image_folder(root, a.read_size, workers=workers)
            second = ddata._image_folder(root, a.read_size, workers=workers)
            times["new"].append(time.perf_counter() - start)
            assert second[0] is first[0]
            del first, second
            gc.collect()
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    result = {"args": vars(a), "workers": workers, "old_s": old, "new_s": new,
              "speedup": round(old / new, 3), "times": times}
    print(f"ImageFolder of {a.images} {a.size}-px JPEGs read twice at {a.read_size} px: {new:.2f} s with the defaults "
          f"({workers} workers, the second read served from the first) against {old:.2f} s before (in the process, "
          f"twice): {old / new:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
