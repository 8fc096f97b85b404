"""Build a growable model by name: ``vit`` (built-in) or ``timm:<model>`` of a family an adapter covers (ViT/DeiT,
VOLO); :func:`build_elastic` also wraps it in that family's adapter."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..models.vit import VisionTransformer
from .base import FAMILIES, ElasticModel, elastic, family_of


@dataclass
class ModelOverrides:
    """Architecture options; ``None`` keeps the model's own value."""

    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    grid: int | None = None  # the built-in ViT's least grid without a patch size (None: BUILTIN_GRID)


BUILTIN_DEFAULTS = dict(img_size=28, patch_size=None, depth=6, embed_dim=64, num_heads=4)
BUILTIN_GRID = 7  # without --patch-size the built-in ViT cuts the image into at least a 7×7 grid (4 px at 28 px)


def builtin_patch_size(img_size: int, grid: int = BUILTIN_GRID) -> int:
    """The largest patch size that divides ``img_size`` and leaves at least a ``grid`` × ``grid`` grid."""
    return max(p for p in range(1, max(1, img_size // grid) + 1) if img_size % p == 0)


def build_model(name: str, num_classes: int, in_chans: int, overrides: ModelOverrides | None = None) -> nn.Module:
    """Create an untrained model. Nothing is downloaded: timm models are built with ``pretrained=False``."""
    o = overrides or ModelOverrides()
    if name == "vit":
        cfg = dict(BUILTIN_DEFAULTS)
        for k in cfg:
            if getattr(o, k) is not None:
                cfg[k] = getattr(o, k)
        if cfg["patch_size"] is None:
            cfg["patch_size"] = builtin_patch_size(cfg["img_size"], o.grid or BUILTIN_GRID)
        if cfg["embed_dim"] % cfg["num_heads"]:
            raise ConfigError(f"--embed-dim {cfg['embed_dim']} is not divisible by --num-heads {cfg['num_heads']}")
        if cfg["img_size"] % cfg["patch_size"]:
            raise ConfigError(f"--img-size {cfg['img_size']} is not divisible by --patch-size {cfg['patch_size']}")
        return VisionTransformer(
            num_classes=num_classes, in_chans=in_chans, drop_path_rate=o.drop_path, **cfg
        )
    if name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), num_classes, in_chans, o)
    raise ConfigError(f"unknown model {name!r}: use 'vit' (built-in) or 'timm:<name>', e.g. timm:deit_tiny_patch16_224")


def model_eval_crop(name: str, pretrained_cfg: dict | None = None) -> tuple[float, str]:
    """The evaluation crop (``crop_pct``, interpolation) of model ``name``, as the official code reads it from the
    model: a checkpoint's own ``pretrained_cfg`` when given, else timm's pretrained configuration for ``timm:NAME``
    (DeiT-S 0.9, VOLO-D1 0.96, bicubic), timm's ViT configuration (0.9, bicubic) for the built-in ViT."""
    crop_pct, interpolation = 0.9, "bicubic"
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else None
    if cfg is None and name.startswith("timm:"):
        import timm

        try:
            found = timm.models.get_pretrained_cfg(name.removeprefix("timm:"))
        except (RuntimeError, ValueError, KeyError):
            found = None
        cfg = found.to_dict() if found is not None else None
    if cfg is not None:
        pct, interp = cfg.get("crop_pct"), cfg.get("interpolation")
        crop_pct = float(pct) if isinstance(pct, (int, float)) and 0 < pct <= 2 else crop_pct
        interpolation = interp if interp in ("bilinear", "bicubic") else interpolation
    return crop_pct, interpolation


def build_elastic(name: str, num_classes: int, in_chans: int, overrides: ModelOverrides | None = None) -> ElasticModel:
    """:func:`build_model`, wrapped in its family's elastic adapter."""
    return elastic(build_model(name, num_classes, in_chans, overrides))


def _build_timm(name: str, num_classes: int, in_chans: int, o: ModelOverrides) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("deit*")
                                          + timm.list_models("volo*") + timm.list_models("eva*"), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}")
    import torch

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no weights, no random numbers used up
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    family = family_of(probe)
    if family is None:
        raise ConfigError(f"timm model {name!r} is a {type(probe).__name__}, which autoprog cannot grow; supported "
                          f"families: {', '.join(c.family for c in FAMILIES)}")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **family.timm_kwargs(o))
    if o.drop_path:
        kwargs["drop_path_rate"] = o.drop_path
    if hasattr(probe, "patch_embed") and hasattr(probe.patch_embed, "patch_size") and \
            ("img_size" in kwargs or "patch_size" in kwargs):
        img = kwargs.get("img_size", probe.patch_embed.img_size[0])
        patch = kwargs.get("patch_size", probe.patch_embed.patch_size[0])
        if img % patch:
            raise ConfigError(f"--img-size {img} is not divisible by the patch size {patch}")
    if "img_size" in kwargs and family.__name__ == "ElasticVOLO" and kwargs["img_size"] % 16:
        raise ConfigError(f"--img-size {kwargs['img_size']}: VOLO needs a multiple of 16")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"cannot build timm model {name!r} with {kwargs}: {e}") from e
