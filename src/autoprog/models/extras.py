"""Modules a fine-tuning method adds to a diffusion backbone and trains alone (Table 6's Adapter and VPT-Deep).

Neither folds into the base weights, so a model fine-tuned with one keeps it: it is the backbone's ``extras``
submodule, its settings go into the saved model's config (``extras``) and :func:`install_extras` puts it back
before the weights load. Both work on every *transformer block* of a backbone (:func:`token_blocks`: the built-in
DiT's blocks, and diffusers' ``BasicTransformerBlock`` in its DiT and in a Stable Diffusion UNet's attention
layers), through forward hooks that are bound methods of the module itself, so a deep copy (the EMA model, an
export) uses its own copy's parameters.

* :class:`BottleneckAdapters` (Adapter; Houlsby et al. 2019, and the parallel form of AdaptFormer, Chen et al.
  2022): a bottleneck MLP (down, GELU, up) on each block's attention and MLP branch, the up-projection
  zero-initialised so training starts from the base model. ``sequential``: it reads the branch's output and adds
  to it; ``parallel``: it reads the branch's input and adds to its output.
* :class:`DeepPrompts` (VPT-Deep; Jia et al. 2022): ``tokens`` learnable prompt tokens prepended to every block's
  input and dropped from its output, a new set per block, initialised uniformly as VPT does.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..formats import check_fields


def token_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks of ``model`` that take tokens ``(B, N, D)``, by module path (``.`` as ``_``: the
    keys of the extras' own parameters, so they follow the block, not its position in the module order)."""
    from diffusers.models.attention import BasicTransformerBlock

    found = {name.replace(".", "_"): m for name, m in model.named_modules()
             if isinstance(m, BasicTransformerBlock) or getattr(type(m), "takes_tokens", False)}
    if not found:
        raise ConfigError(f"{type(model).__name__} has no transformer blocks for adapters or prompt tokens")
    return found


def _branches(block: nn.Module) -> dict[str, nn.Module]:
    """A transformer block's attention (self-attention) and MLP branches."""
    if hasattr(block, "attn1"):  # diffusers' BasicTransformerBlock
        return {"attn": block.attn1, "mlp": block.ff}
    return {"attn": block.attn, "mlp": block.mlp}


def _width(block: nn.Module) -> int:
    return int(block.attn1.query_dim) if hasattr(block, "attn1") else int(block.attn.qkv.in_features)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Hooked(nn.Module):
    """Keeps the hook handles of an extras module (so that :meth:`remove` takes them off)."""

    def __init__(self):
        super().__init__()
        self._handles = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class BottleneckAdapters(_Hooked):
    """Adapter: see the module docstring."""

    kind = "adapter"

    def __init__(self, model: nn.Module, dim: int = 8, parallel: bool = True):
        super().__init__()
        if dim < 1:
            raise ConfigError(f"--adapter-dim must be positive, got {dim}")
        self.dim, self.parallel = int(dim), bool(parallel)
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        targets = {f"{path}__{name}": (branch, _width(block)) for path, block in token_blocks(model).items()
                   for name, branch in _branches(block).items()}
        for key, (_, width) in targets.items():
            self.down[key] = nn.Linear(width, self.dim)
            self.up[key] = nn.Linear(self.dim, width)
            nn.init.zeros_(self.up[key].weight)
            nn.init.zeros_(self.up[key].bias)
        p = next(model.parameters())
        self.to(device=p.device, dtype=p.dtype)
        for key, (branch, _) in targets.items():
            self._handles.append(branch.register_forward_hook(functools.partial(self._add, key), with_kwargs=True))

    def _add(self, key: str, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        src = _hidden_states(args, kwargs) if self.parallel else out
        return out + self.up[key](F.gelu(self.down[key](src)))

    def settings(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "parallel": self.parallel}


class DeepPrompts(_Hooked):
    """VPT-Deep: see the module docstring."""

    kind = "vpt"

    def __init__(self, model: nn.Module, tokens: int = 10):
        super().__init__()
        if tokens < 1:
            raise ConfigError(f"--vpt-tokens must be positive, got {tokens}")
        self.tokens = int(tokens)
        blocks = token_blocks(model)
        patch = int(getattr(model, "patch_size", 1) or 1)  # a token's pixels: VPT's fan-in is channels × patch²
        chans = int(model.config.get("in_chans", 3)) if isinstance(getattr(model, "config", None), dict) else 3
        p = next(model.parameters())
        self.prompts = nn.ParameterDict()
        for key, block in blocks.items():
            width = _width(block)
            bound = math.sqrt(6.0 / (chans * patch * patch + width))  # VPT's uniform initialisation
            self.prompts[key] = nn.Parameter(torch.empty(1, self.tokens, width, device=p.device, dtype=p.dtype)
                                             .uniform_(-bound, bound))
        for key, block in blocks.items():
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._prepend, key),
                                                                 with_kwargs=True))
            self._handles.append(block.register_forward_hook(functools.partial(self._strip, key), with_kwargs=True))

    def _prepend(self, key: str, module: nn.Module, args: tuple, kwargs: dict):
        x = _hidden_states(args, kwargs)
        x = torch.cat([self.prompts[key].to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def _strip(self, key: str, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        return out[:, self.tokens:]

    def settings(self) -> dict:
        return {"kind": self.kind, "tokens": self.tokens}


EXTRAS_FIELDS = {"kind": str, "dim": int, "parallel": bool, "tokens": int}  # a saved model's ``extras``


def install_extras(model: nn.Module, settings: dict, where: str = "extras") -> nn.Module:
    """Add the extras module ``settings`` describe (:meth:`BottleneckAdapters.settings` /
    :meth:`DeepPrompts.settings`) to ``model`` as ``model.extras``; returns it."""
    check_fields(settings, EXTRAS_FIELDS, where, required=("kind",), closed=True)
    if getattr(model, "extras", None) is not None:
        raise ConfigError(f"the model already carries {model.extras.kind} modules (it was fine-tuned with them); "
                          "fine-tune it with full, bitfit, lora or a progressive method, or start from its base")
    kind = settings["kind"]
    if kind == BottleneckAdapters.kind:
        module = BottleneckAdapters(model, settings.get("dim", 8), settings.get("parallel", True))
    elif kind == DeepPrompts.kind:
        module = DeepPrompts(model, settings.get("tokens", 10))
    else:
        raise ConfigError(f"{where}: unknown kind {kind!r} (adapter or vpt)")
    model.extras = module  # a submodule: saved, optimised and moved with the model
    return module
