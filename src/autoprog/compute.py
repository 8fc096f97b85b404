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


COMPILE_BACKEND = "inductor"  # torch.compile's backend for --compile (tests use a lighter one)


def compile_blocks(blocks, sizes: int) -> None:
    """``torch.compile`` each block in place (parameter names and checkpoints unchanged), with static shapes and a
    compile cache large enough for ``sizes`` input sizes per block (the growth space's resolutions), each met in
    training, evaluation and the searches' smaller batches (a shape past the cache runs uncompiled)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 8 * sizes)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 8 * sizes * len(blocks))
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND, dynamic=False)
