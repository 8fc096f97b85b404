"""The static fine-tuning baselines, applied to a backbone before training (they apply, never decide).

``full`` (everything), ``bitfit`` (biases), ``difffit`` (biases plus a learnable scale factor on every
attention and MLP branch, Xie et al. 2023), ``lora`` (low-rank adapters on the blocks' linear layers,
through peft), ``adapter`` (bottleneck adapters, parallel or sequential) and ``vpt`` (VPT-Deep prompt tokens);
peft offers neither of the last two for these models, so they are :mod:`autoprog.models.extras`. The progressive methods (``prog``, ``autoprog-one``, ``autoprog-zero``) apply learnable
sub-networks through :class:`autoprog.adapters.unfreezer.Unfreezer` instead.

Every method also trains the condition embeddings (class table, and the SID when there is one):
a transfer task brings classes the base model has never seen. :func:`export_backbone` folds DiffFit's
scale factors and LoRA's adapters back into plain weights, so every method exports the same model, except
Adapter and VPT-Deep, whose modules stay (``extras``, reinstalled when the model loads).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn

from ..adapters.unfreezer import freeze_all, train_conditions
from ..errors import ConfigError
from ..models.dit import DiffusionBackbone


# ----------------------------------------------------------------------------------- static baselines
def prepare_full(model: DiffusionBackbone) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    model.freeze_fixed()


def prepare_bitfit(model: DiffusionBackbone) -> None:
    freeze_all(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    model.freeze_fixed()
    train_conditions(model)


class ScaleFactors(nn.Module):
    """DiffFit's learnable γ per block and branch, initialised to 1, applied by forward hooks."""

    def __init__(self, model: DiffusionBackbone):
        super().__init__()
        self.gamma = nn.ParameterDict({
            f"{i}_{branch}": nn.Parameter(torch.ones((), device=mod_device(model)))
            for i in range(model.depth) for branch in model.branch_modules(i)
        })
        self._handles = []
        for i in range(model.depth):
            for branch, mod in model.branch_modules(i).items():  # bound: a deep copy (the EMA) scales by its own γ
                self._handles.append(mod.register_forward_hook(functools.partial(self._scale, f"{i}_{branch}")))

    def _scale(self, key: str, module: nn.Module, args, out):
        return out * self.gamma[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def mod_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_difffit(model: DiffusionBackbone) -> None:
    if getattr(model, "extras", None) is not None:  # its scale would act on the extras' output, then fold without it
        raise ConfigError("this base carries Adapter or VPT-Deep modules (it was fine-tuned with one); DiffFit's scale "
                          "factors cannot fold into it: fine-tune it with another method")
    prepare_bitfit(model)
    model.difffit = ScaleFactors(model)  # registered as a submodule: saved, optimised, moved with the model
    for mod in model.modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            for p in mod.parameters(recurse=False):
                p.requires_grad_(True)  # DiffFit also tunes LayerNorm affine parameters where a model has them
    model.freeze_fixed()
    train_conditions(model)


def prepare_lora(model: DiffusionBackbone, rank: int = 8, alpha: float | None = None) -> None:
    """LoRA through peft: a UNet's own ``add_adapter`` (diffusers' format), else ``inject_adapter_in_model``
    on the blocks' linear layers (diffusers' DiT has no ``add_adapter``)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"LoRA rank must be positive, got {rank}")
    if hasattr(model, "add_lora"):
        model.add_lora(rank, alpha)
    else:
        targets = [rf"{re.escape(model.block_prefix)}\.\d+\.{re.escape(t)}" for t in model.lora_targets]
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules="|".join(f"(?:{t})" for t in targets),
                         lora_dropout=0.0, bias="none")
        inject_adapter_in_model(cfg, model)
    freeze_all(model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    train_conditions(model)


def prepare_extras(model: DiffusionBackbone, settings: dict) -> None:
    """Adapter or VPT-Deep (:func:`~autoprog.models.extras.install_extras`): only its module (and the condition
    embeddings) learns."""
    from ..models.extras import install_extras

    freeze_all(model)
    install_extras(model, settings).requires_grad_(True)
    train_conditions(model)


def prepare_static(model: DiffusionBackbone, method: str, lora_rank: int = 8, adapter_dim: int = 8,
                   parallel: bool = True, vpt_tokens: int = 10) -> None:
    if method == "full":
        prepare_full(model)
    elif method == "bitfit":
        prepare_bitfit(model)
    elif method == "difffit":
        prepare_difffit(model)
    elif method == "lora":
        prepare_lora(model, lora_rank)
    elif method == "adapter":
        prepare_extras(model, {"kind": "adapter", "dim": adapter_dim, "parallel": parallel})
    elif method == "vpt":
        prepare_extras(model, {"kind": "vpt", "tokens": vpt_tokens})
    else:
        raise ConfigError(f"{method!r} is not a static fine-tuning method")


@torch.no_grad()
def export_backbone(model: DiffusionBackbone) -> DiffusionBackbone:
    """Fold DiffFit scale factors and LoRA adapters into the weights, in place; returns the plain backbone."""
    sf = getattr(model, "difffit", None)
    if isinstance(sf, ScaleFactors):
        sf.remove()
        for key, g in sf.gamma.items():
            i, branch = key.split("_", 1)
            out = _output_linear(model.branch_modules(int(i))[branch])
            out.weight.mul_(g)
            if out.bias is not None:
                out.bias.mul_(g)
        del model.difffit
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
    for mod in model.modules():  # diffusers' add_adapter flags: the merged model has no adapter left
        if getattr(mod, "_hf_peft_config_loaded", False):
            mod._hf_peft_config_loaded = False
            mod.__dict__.pop("peft_config", None)
    return model


def _output_linear(branch: nn.Module) -> nn.Linear:
    """The last linear (or convolution) layer of a branch, or the branch itself: its output is the branch
    output (dropout aside)."""
    linears = [m for m in branch.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not linears:
        raise ConfigError(f"{type(branch).__name__} has no linear layer to fold a scale factor into")
    return linears[-1]
