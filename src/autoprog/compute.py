"""How a model's blocks run: recomputed in the backward pass (gradient checkpointing) and compiled
(``torch.compile``), for every task's models."""

from __future__ import annotations

import torch
from torch import nn


def checkpointed(block: nn.Module, *args):
    """``block(*args)`` whose activations are recomputed in the backward pass (the random state is replayed, so
    drop path draws the same), when autograd records; a plain call otherwise."""
    if not torch.is_grad_enabled():
        return block(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(block, *args, use_reentrant=False)


class CheckpointedBlocks:
    """What a model that runs its blocks one by one needs for ``--gradient-checkpointing``: the switch, and
    :meth:`run_block` for its forward's block loop (mixed into the elastic ViTs and the diffusion backbones)."""

    gradient_checkpointing = False

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.gradient_checkpointing = bool(on)

    def run_block(self, block: nn.Module, *args):
        """``block(*args)``, its activations recomputed in the backward pass under :attr:`gradient_checkpointing`
        (in training)."""
        return checkpointed(block, *args) if self.gradient_checkpointing and self.training else block(*args)


COMPILE_BACKEND = "inductor"  # torch.compile's backend for --compile (tests use a lighter one)


def compile_blocks(blocks, sizes: int) -> None:
    """``torch.compile`` each block in place (parameter names and checkpoints unchanged), with static shapes and a
    compile cache large enough for ``sizes`` input sizes per block (the growth space's resolutions), each met in
    training, evaluation and the searches' smaller batches (a shape past the cache runs uncompiled)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 12 * sizes)  # (the proxies run without autocast: more kinds)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 12 * sizes * len(blocks))
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND, dynamic=False)
