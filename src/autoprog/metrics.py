"""Measurements: FLOPs per training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def train_step_flops(model: nn.Module, sample: torch.Tensor, num_classes: int) -> int:
    """FLOPs of one forward + backward pass on ``sample`` (count it on one image and scale by batch size).

    Gradients produced by the count are discarded, so it does not disturb training.
    """
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(sample)
        loss = F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device) % num_classes)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return int(counter.get_total_flops())


def count_flops(step) -> int:
    """FLOPs of ``step()`` (e.g. a forward + backward pass), counted by ``FlopCounterMode``; ``.grad`` is reset after."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())
