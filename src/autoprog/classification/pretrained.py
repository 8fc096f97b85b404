"""Pre-trained classifiers on disk: the model folder a pre-training run writes, and loading one (or a timm
checkpoint) to fine-tune on another dataset.

A run's ``OUT/model`` holds ``config.json`` (``format: autoprog-classifier/1``: the model's name, the architecture
options that rebuild it, its classes and ReZero gates) and ``model.safetensors`` (the model's own state dict, so
timm loads a gate-free one directly). :func:`load_pretrained` also reads timm's folder format (``config.json``
with ``architecture``, beside ``model.safetensors`` or ``pytorch_model.bin``) and a single weights file with
``--model timm:NAME``. Nothing is downloaded. The classifier head is always new: the target task's classes are not
the source's. The weights exported are the online model's (the run's ``top1``), not its EMA.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import ElasticModel, elastic
from ..adapters.factory import ModelOverrides, build_model
from ..checkpoint import replace_dir, save_tensors
from ..errors import ConfigError
from ..formats import check_fields, check_finite, read_json_object, read_weights

FORMAT = "autoprog-classifier/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_ARCH_FIELDS = {f.name: (int, float) if f.name == "drop_path" else (int, None) for f in fields(ModelOverrides)}


def save_classifier(net: ElasticModel, path: Path, build_args: dict, extra: dict | None = None) -> Path:
    """Write ``net`` (its whole model, as trained) to the model folder ``path``, atomically; ``build_args``:
    ``{"model": name, **ModelOverrides fields}`` as the run built it."""

    from ..checkpoint import write_json

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arch = {k: v for k, v in build_args.items() if k != "model"}
    meta = {"format": FORMAT, "model": build_args["model"], "architecture": arch,
            "num_classes": _num_classes(net.model), "in_chans": _in_chans(net.model),
            "gated_blocks": net.gated_blocks(), **(extra or {})}
    save_tensors({k: v.detach().contiguous().cpu() for k, v in net.model.state_dict().items()}, tmp / WEIGHTS_FILE)
    write_json(tmp / CONFIG_FILE, meta)
    replace_dir(tmp, path)
    return path


def build_args_of(model: str, overrides: ModelOverrides, net: ElasticModel | None = None) -> dict:
    """What :func:`save_classifier` records to rebuild a model made by ``build_model(model, ..., overrides)``; the
    built-in ViT's sizes are read from ``net`` (its defaults may change, a saved model must not)."""
    args = {"model": model, **asdict(overrides)}
    if model == "vit" and net is not None:
        m = net.model
        args.update(img_size=net.full_resolution, patch_size=net.patch_size, depth=net.full_depth,
                    embed_dim=m.embed_dim, num_heads=m.blocks[0].attn.num_heads, grid=None)
    return args


@dataclass
class Located:
    """What a ``--base`` names: the architecture (``model`` and its :class:`ModelOverrides`), the weights file,
    the config read (if any) and ReZero gates to install before loading."""

    model: str
    overrides: ModelOverrides
    weights: Path
    config: dict
    gated: list[int]

    def build(self, num_classes: int, in_chans: int) -> ElasticModel:
        net = elastic(build_model(self.model, num_classes, in_chans, self.overrides))
        if any(not 0 <= g < net.full_depth for g in self.gated):
            raise ConfigError(f"{self.weights.parent / CONFIG_FILE}: gated_blocks {self.gated} name blocks the model "
                              "does not have")
        net.set_gated_blocks(self.gated)
        return net


def locate(base: str | Path, model: str = "vit", flag: str = "--base") -> Located:
    """Read what ``base`` is (see :func:`load_pretrained`) without loading its weights; errors name it ``flag``."""
    path = Path(base)
    if not path.exists():
        raise ConfigError(f"{flag} {path} does not exist")
    if path.is_file():
        if not model.startswith("timm:"):
            raise ConfigError(f"{flag} {path} is a weights file: name its architecture with --model timm:NAME "
                              "(e.g. timm:deit_small_patch16_224)")
        return Located(model, ModelOverrides(), path, {}, [])
    if model != "vit":
        raise ConfigError(f"--model {model}: the folder {flag} {path} names its own architecture; drop --model")
    if (path / "model" / CONFIG_FILE).is_file():  # a run folder: its exported model
        path = path / "model"
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        hint = (" (a run writes OUT/model when it finishes; this one has not finished)"
                if (path / "checkpoint").is_dir() else "")
        raise ConfigError(f"{flag} {path} has no {CONFIG_FILE}: give an autoprog model folder (a run's OUT/model), "
                          f"a timm checkpoint folder, or a weights file with --model timm:NAME{hint}")
    cfg = read_json_object(cfg_file, "model config")
    where = str(cfg_file)
    if cfg.get("format") == FORMAT:
        check_fields(cfg, {"format": str, "model": str, "architecture": dict, "num_classes": int, "in_chans": int,
                           "gated_blocks": [int], "classes": [str]}, where, required=("model", "architecture"))
        check_fields(cfg["architecture"], _ARCH_FIELDS, f"{where}: architecture", closed=True)
        if not (path / WEIGHTS_FILE).is_file():
            raise ConfigError(f"{path} has no {WEIGHTS_FILE}")
        return Located(cfg["model"], ModelOverrides(**cfg["architecture"]), path / WEIGHTS_FILE, cfg,
                       list(cfg.get("gated_blocks") or []))
    if isinstance(cfg.get("architecture"), str):  # timm's folder format (push_to_hub / save_for_hf)
        args = cfg.get("model_args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}: model_args must be an object")
        unknown = sorted(set(args) - {"img_size", "patch_size", "depth", "embed_dim", "num_heads"})
        if unknown:
            raise ConfigError(f"{where}: model_args {', '.join(unknown)} cannot be rebuilt by autoprog")
        found = next((f for f in TIMM_WEIGHTS if (path / f).is_file()), None)
        if found is None:
            raise ConfigError(f"{path} has no weights ({' or '.join(TIMM_WEIGHTS)})")
        return Located("timm:" + cfg["architecture"], ModelOverrides(**args), path / found, cfg, [])
    raise ConfigError(f"{where} is neither an autoprog classifier's (format {FORMAT}) nor a timm checkpoint's "
                      "(an 'architecture' name)")


def pretrained_resolution(base: str | Path | Located, model: str = "vit") -> int:
    """The input resolution of the classifier at ``base`` (or already located; built without weights)."""
    found = base if isinstance(base, Located) else locate(base, model)
    if found.overrides.img_size is not None:
        return found.overrides.img_size
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a timm model at its own size
        return found.build(2, 3).full_resolution


def load_pretrained(base: str | Path | Located, num_classes: int, in_chans: int, model: str = "vit"
                    ) -> tuple[ElasticModel, dict]:
    """The classifier at ``base`` with a new, randomly initialised head of ``num_classes`` and inputs of
    ``in_chans`` channels (a different count adapts the first convolution as timm does), in its elastic adapter.
    ``base``: an autoprog model folder or run folder, a timm checkpoint folder, or a weights file (then ``model``
    names the timm architecture), or what :func:`locate` read of one. Returns the model and what is known of it:
    its config and ``build_args`` (see :func:`save_classifier`)."""
    found = base if isinstance(base, Located) else locate(base, model)
    net = found.build(num_classes, in_chans)
    load_matching(net.model, read_weights(found.weights), str(found.weights))
    return net, {**found.config, "base": str(found.weights.parent if found.config else found.weights),
                 "build_args": build_args_of(found.model, found.overrides)}


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of ``model``'s classifier heads (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return names + (("aux_head",) if hasattr(model, "aux_head") else ())


def load_matching(model: nn.Module, weights: dict, where: str) -> None:
    """Load ``weights`` into ``model`` except its classifier heads (left as initialised). A first convolution made
    for another number of input channels is adapted (timm's ``adapt_input_conv``); any other missing, extra or
    differently shaped tensor is a one-line :class:`ConfigError` naming it."""
    own = model.state_dict()
    heads = head_names(model)

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    loaded, unexpected = {}, []
    for key, value in weights.items():
        if is_head(key):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        want = own[key]
        if value.shape != want.shape:
            if value.ndim == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
                value = adapt_channels(value, want.shape[1])
            else:
                raise ConfigError(f"{where}: {key} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(want.shape)} (another architecture or size)")
        loaded[key] = value.to(want.dtype)
    missing = [k for k in own if k not in loaded and not is_head(k)]
    if unexpected or missing:
        what = "; ".join(s for s in (f"{len(missing)} of the model's tensors missing ({', '.join(missing[:3])})"
                                     if missing else "",
                                     f"{len(unexpected)} unknown ({', '.join(unexpected[:3])})" if unexpected else "")
                         if s)
        raise ConfigError(f"{where} does not fit the model: {what}")
    check_finite(loaded.values(), where)
    model.load_state_dict(loaded, strict=False)


def adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first convolution's ``weight`` for ``in_chans`` input channels: timm's ``adapt_input_conv`` (from RGB),
    and from one channel its filter repeated and divided by ``in_chans`` (a grey image copied into every channel
    gives the same response)."""
    from timm.models import adapt_input_conv

    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    out = adapt_input_conv(in_chans, weight)
    if out.shape[1] != in_chans:
        raise ConfigError(f"cannot adapt a convolution of {weight.shape[1]} input channels to {in_chans}")
    return out


def _num_classes(model: nn.Module) -> int:
    return int(model.num_classes)


def _in_chans(model: nn.Module) -> int:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(conv.in_channels)
