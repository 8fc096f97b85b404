"""Generation quality without downloads: FD and KID on the features of a small classifier, or real FID.

By default the features come from a :class:`FeatureClassifier` trained on the real dataset and cached on
disk; the score is then reported as "FD (classifier features)", never as FID, since it is not comparable
with published FID numbers. With a local Inception checkpoint, :func:`inception_evaluator` gives real FID.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from autoprog.checkpoint import save_tensors
from autoprog.errors import ConfigError, DivergedError
from autoprog.rng import forked_rng

CACHE_FORMAT = "autoprog-feature-net-v1"  # bump when the architecture or training recipe changes
CLASSIFIER_METRIC = "FD (classifier features)"
INCEPTION_METRIC = "FID (Inception)"

Images = tuple[torch.Tensor, torch.Tensor]


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{what}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )


# --------------------------------------------------------------------------------------------------------
# The feature network


class FeatureClassifier(nn.Module):
    """Small CNN: conv blocks (3x3 conv, BatchNorm, ReLU) with 2x2 max-pooling between them, global
    average pool, a ReLU embedding of ``feature_dim`` (the features) and a linear head.

    Inputs are float images normalised to [-1, 1], shape (N, C, H, W) with any H, W >= 8.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feature_dim: int = 128,
        widths: tuple[int, ...] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(self.widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the architecture."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "widths": list(self.widths),
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (N, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset in [-max_shift, max_shift] px (edges replicated)."""
    n, c, h, w = x.shape
    span = 2 * max_shift + 1
    dy = torch.randint(0, span, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, span, (n,), generator=gen).to(x.device)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


@torch.no_grad()
def classifier_top1(
    net: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of ``net`` (in eval mode) on uint8 ``images``."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = net(_to_unit(images[i : i + batch_size].to(device)))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    test: Images | None = None,
    flip: bool = False,
    feature_dim: int = 128,
    device: str | torch.device = "cpu",
) -> tuple[FeatureClassifier, dict]:
    """Train a :class:`FeatureClassifier` on uint8 ``images`` (N, C, H, W) and int64 ``labels``.

    AdamW with a cosine schedule, random ±2 px shifts (and horizontal flips if ``flip``). Deterministic
    for a seed on a given device. Returns the net on the CPU in eval mode and
    ``{"train_images", "epochs", "seed", "image_size", "test_top1", "train_seconds"}``.
    """
    _check_images(images, "feature classifier")
    if images.shape[-1] < 8 or images.shape[-2] < 8:
        raise ConfigError(f"the feature classifier that scores FD needs images of at least 8x8 px, got "
                          f"{images.shape[-2]}x{images.shape[-1]}: give --image-size 8 or more")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    labels = labels.long()
    start = time.perf_counter()
    with forked_rng(device):
        torch.manual_seed(seed)
        net = FeatureClassifier(images.shape[1], num_classes, feature_dim=feature_dim)
    net.to(device).train()
    _train_classifier(net, images, labels, epochs, batch_size, lr, torch.Generator().manual_seed(seed), flip, device)
    top1 = classifier_top1(net, *test) if test is not None else None  # (on the training device)
    net.cpu().eval()
    info = {
        "train_images": len(images),
        "epochs": epochs,
        "seed": seed,
        "image_size": list(images.shape[1:]),
        "test_top1": top1,
        "train_seconds": round(time.perf_counter() - start, 2),
        "device": torch.device(device).type,
    }
    return net, info


def _train_classifier(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
                      lr: float, gen: torch.Generator, flip: bool, device) -> None:
    """AdamW with a cosine schedule over ``epochs``, random ±2 px shifts (and flips), batches drawn by ``gen``."""
    steps_per_epoch = -(-len(images) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
    with tqdm(total=epochs * steps_per_epoch, desc="feature net", disable=None, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), batch_size):
                idx = order[i : i + batch_size]
                x = _random_shift(_to_unit(images[idx].to(device)), 2, gen)
                if flip:
                    mirror = (torch.rand(len(idx), generator=gen) < 0.5).to(x.device)
                    x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


# --------------------------------------------------------------------------------------------------------
# The cache


def default_cache_dir() -> Path:
    """``$AUTOPROG_CACHE`` or ``~/.cache/autoprog``."""
    return Path(os.environ.get("AUTOPROG_CACHE") or Path.home() / ".cache" / "autoprog")


def feature_net_key(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, seed: int
) -> str:
    """sha256 over the cache format, the training settings and the exact bytes of the dataset."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    h.update(
        json.dumps({"num_classes": num_classes, "epochs": epochs, "seed": seed}, sort_keys=True).encode()
    )
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder and ``os.replace`` it, so no half file is ever seen."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cache_dir: str | Path,
    test: Images | None = None,
    epochs: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
) -> tuple[FeatureClassifier, dict]:
    """The feature classifier for this dataset: loaded from ``cache_dir`` or trained and cached there.

    Files: ``feature-net-<key[:16]>.safetensors`` (weights) and ``.json`` (config and info, written last).
    The returned info has ``"cached": True`` when it was loaded.
    """
    key = feature_net_key(images, labels, num_classes, epochs, seed)
    cache_dir = Path(cache_dir).expanduser()
    weights = cache_dir / f"feature-net-{key[:16]}.safetensors"
    meta = weights.with_suffix(".json")
    if meta.is_file() and weights.is_file():
        try:
            record = json.loads(meta.read_text())
            if record.get("key") != key or record.get("format") != CACHE_FORMAT:
                raise ValueError("key or format mismatch")
            net = FeatureClassifier(**record["config"])
            net.load_state_dict(load_file(weights))
            log(f"feature net: loaded from {weights}")
            return net.eval(), {**record["info"], "cached": True}
        except Exception as e:  # a damaged or foreign cache entry: retrain and overwrite it
            log(f"feature net: ignoring unreadable cache {weights} ({type(e).__name__}: {e})")
    log(f"feature net: training on {len(images)} images for {epochs} epochs (cached in {cache_dir})")
    net, info = train_feature_classifier(
        images, labels, num_classes, epochs=epochs, seed=seed, test=test, device=device
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(weights, lambda p: save_tensors(net.state_dict(), p))
    record = {"format": CACHE_FORMAT, "key": key, "config": net.config(), "info": info}
    _atomic_write(meta, lambda p: p.write_text(json.dumps(record, indent=2)))
    return net, {**info, "cached": False}


# --------------------------------------------------------------------------------------------------------
# Feature modules for torchmetrics


class ClassifierFeatures(nn.Module):
    """Feature extractor for torchmetrics: uint8 (N, C, H, W) images -> float32 (N, feature_dim).

    The net always stays in eval mode. Images with another channel count, or another size than
    ``image_size`` (H, W) when given, are rejected with a ValueError.
    """

    def __init__(self, net: FeatureClassifier, image_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.image_size = tuple(image_size) if image_size is not None else None

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Stay in eval mode (BatchNorm statistics are part of the feature definition)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = ", ".join(map(str, (self.net.in_channels, *(self.image_size or ("H", "W")))))
        if x.dtype != torch.uint8:
            raise ValueError(f"feature net expects uint8 images, got {x.dtype}")
        if (
            x.ndim != 4
            or x.shape[1] != self.net.in_channels
            or (self.image_size is not None and tuple(x.shape[-2:]) != self.image_size)
        ):
            raise ValueError(f"feature net expects images of shape (N, {expected}), got {tuple(x.shape)}")
        device = next(self.net.parameters()).device
        return self.net.features(_to_unit(x.to(device))).float()


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (pool3, 2048-d) from a local checkpoint; grey images repeated to RGB."""

    num_features = 2048

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights_path),
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception expects uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(x).float()


class _Precomputed(nn.Module):
    """Pass-through 'feature extractor', so that the metrics can share features computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------------------------------------
# The evaluator


class QualityEvaluator:
    """FD and KID of generated images against a fixed real set, on the features of ``feature``.

    The real features are computed once, here; each :meth:`evaluate` call replaces only the fake ones.
    Each image goes through the feature network once, and both metrics share the result.
    """

    def __init__(
        self,
        feature: nn.Module,
        real_images: torch.Tensor,
        input_img_size: tuple[int, int, int],
        kid_subset_size: int = 100,
        device: str | torch.device = "cpu",
        name: str = CLASSIFIER_METRIC,
        batch_size: int = 500,
        kid_subsets: int = 100,
        seed: int = 0,
    ) -> None:
        self.feature = feature.to(device).eval()
        self.input_img_size = tuple(input_img_size)
        self.kid_subset_size, self.batch_size, self.seed, self.name = kid_subset_size, batch_size, seed, name
        self.device = torch.device(device)
        self._check(real_images, "real images")
        with torch.no_grad():
            probe = torch.zeros((1, *self.input_img_size), dtype=torch.uint8, device=self.device)
            dim = getattr(feature, "num_features", None) or self.feature(probe).shape[-1]
        shared = _Precomputed(int(dim))
        # only the main process evaluates: torchmetrics must not wait for the others at compute()
        self.fid = FrechetInceptionDistance(feature=shared, reset_real_features=False,
                                            sync_on_compute=False).to(self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(
                feature=shared, subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False,
                sync_on_compute=False,
            ).to(self.device)
        self._update(real_images, real=True)
        self.num_real = len(real_images)

    def _check(self, images: torch.Tensor, what: str) -> None:
        _check_images(images, what)
        if tuple(images.shape[1:]) != self.input_img_size:
            shape = ", ".join(map(str, self.input_img_size))
            raise ValueError(f"{what}: expected shape (N, {shape}), got {tuple(images.shape)}")
        if len(images) < 2:
            raise ValueError(f"{what}: need at least 2 images, got {len(images)}")

    @torch.no_grad()
    def _update(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), self.batch_size):
            feats = self.feature(images[i : i + self.batch_size].to(self.device)).float()
            self.fid.update(feats, real=real)
            self.kid.update(feats, real=real)

    def evaluate(self, fake_images: torch.Tensor) -> dict:
        """``{"fd", "kid", "kid_std", "num_fake", "num_real", "metric"}`` for uint8 ``fake_images``."""
        self._check(fake_images, "generated images")
        self.fid.reset()
        self.kid.reset()
        self._update(fake_images, real=False)
        self.kid.subset_size = min(self.kid_subset_size, len(fake_images), self.num_real)
        fd = float(self.fid.compute())
        with forked_rng(self.device):  # KID draws its subsets from the global RNG
            torch.manual_seed(self.seed)
            kid, kid_std = (float(v) for v in self.kid.compute())
        return {
            "fd": fd,
            "kid": kid,
            "kid_std": kid_std,
            "num_fake": len(fake_images),
            "num_real": self.num_real,
            "metric": self.name,
        }


def _has_torch_fidelity() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_evaluator(
    weights_path: str | Path,
    real_images: torch.Tensor,
    kid_subset_size: int = 100,
    device: str | torch.device = "cpu",
    batch_size: int = 100,
) -> QualityEvaluator:
    """Real FID/KID with torch-fidelity's InceptionV3 loaded from ``weights_path``, a local copy of
    ``weights-inception-2015-12-05-6726825d.pth`` (nothing is downloaded)."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--fid-weights: no such file: {path}")
    if not _has_torch_fidelity():
        raise ConfigError("FID needs torch-fidelity: pip install autoprog[fid]")
    try:
        feature = InceptionFeatures(path)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"--fid-weights: cannot load Inception weights from {path}: {first_line}") from e
    return QualityEvaluator(
        feature,
        real_images,
        tuple(real_images.shape[1:]),
        kid_subset_size=kid_subset_size,
        device=device,
        name=INCEPTION_METRIC,
        batch_size=batch_size,
    )


# --------------------------------------------------------------------------------------------------------
# Images


def nonfinite_pixels(bad: int, total: int) -> DivergedError:
    """The error for ``bad`` of ``total`` generated pixel values that are not finite."""
    return DivergedError(f"{bad} of {total} generated pixel values are not finite (a diverged model, or a non-finite "
                         "guidance scale); refusing to score or save them")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255] (clamped, rounded); uint8 input is returned as is."""
    if x.dtype == torch.uint8:
        return x
    if not torch.isfinite(x).all():
        raise nonfinite_pixels(int((~torch.isfinite(x)).sum()), x.numel())
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


GRID_CELL = 96  # pixels a grid cell has at least: small images are enlarged (nearest, so pixels stay pixels)


def labelled_grid(images: torch.Tensor, nrow: int, labels: list[str] | None = None, title: str = "",
                  cell: int = GRID_CELL):
    """uint8 or [-1, 1] float images (N, C, H, W) as one RGB PIL image a person can read: ``nrow`` images per
    row, each enlarged by an integer factor (nearest) to at least ``cell`` pixels, ``labels`` (one per row: a
    class name or prompt) on the left and ``title`` on top."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    x = to_uint8(images).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    scale = max(1, -(-cell // x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x.float(), scale_factor=scale, mode="nearest").to(torch.uint8)
    pad = 4
    grid = make_grid(x, nrow=nrow, padding=pad, pad_value=255).permute(1, 2, 0).numpy()
    font = ImageFont.load_default(size=14)
    rows = -(-len(x) // nrow)
    labels = [str(s) for s in (labels or [])][:rows]
    left = (max((font.getlength(s) for s in labels), default=0) + 2 * pad) if labels else 0
    left = int(min(left, 360))
    top = 24 if title else 0
    width = max(grid.shape[1] + left, int(font.getlength(title)) + 2 * pad if title else 0)
    canvas = Image.new("RGB", (width, grid.shape[0] + top), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    step = x.shape[-2] + pad
    for i, text in enumerate(labels):
        if font.getlength(text) > left - 2 * pad:
            while len(text) > 1 and font.getlength(text + "...") > left - 2 * pad:
                text = text[:-1]
            text += "..."
        draw.text((pad, top + pad + i * step + x.shape[-2] // 2 - 7), text, fill="black", font=font)
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, labels: list[str] | None = None,
              title: str = ""):
    """Save :func:`labelled_grid` of ``images`` as a PNG at ``path`` (folders created); returns the image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = labelled_grid(images, nrow, labels, title)
    image.save(path)
    return image
