"""Fine-tune the shipped DiT to new classes in a plain PyTorch loop, unfreezing it progressively (Prog).

    python examples/own_loop_finetune.py [--steps 40] [--data-root DIR] [--schedule prog|autoprog-zero|8x2,28x6]
"""

import argparse

import torch

from autoprog.adapters.unfreezer import Unfreezer
from autoprog.algorithms.autoprog_zero import AutoProgZero
from autoprog.diffusion.data import load_diffusion_data
from autoprog.diffusion.runner import DEFAULT_BASE
from autoprog.diffusion.sampling import diffusion_loss, training_scheduler
from autoprog.loop import ProgressiveLoop, ProxyData
from autoprog.models.dit import load_backbone

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--data-root", help="where Fashion-MNIST's .gz files are (default: the Debian package's)")
p.add_argument("--schedule", default="prog")
args = p.parse_args()
torch.manual_seed(0)

data = load_diffusion_data("fashion-mnist", args.data_root, classes=(5, 6, 7, 8, 9), subset=2048)
model, _ = load_backbone(DEFAULT_BASE, with_sid=False)  # pre-trained on classes 0-4
model.add_stage_identifier(4)  # SID: one learnable token per stage
noise = training_scheduler()
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)


def noised(batch):  # the same noise and timesteps for every candidate: ((x_t, t, y), noise)
    x0, y = batch
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
    return (noise.add_noise(x0, eps, t), t, y), eps


probe = [data.batch(torch.arange(i, i + 8)) for i in range(0, 32, 8)]  # fixed batches for the searches
proxy = ProxyData(probe, loss=lambda m, b: (m(*noised(b)[0]) - noised(b)[1]).pow(2).mean(),
                  forward=lambda m, b: m(*noised(b)[0]))
schedule = AutoProgZero(Unfreezer(model).space()) if args.schedule == "autoprog-zero" else args.schedule
loop = ProgressiveLoop.unfreezing(model, optimizer, args.steps, schedule=schedule, proxy=proxy,
                                  log=lambda s: None)

for step in range(loop.total_steps):
    if loop.before_step():
        print(f"step {step}: {loop.describe(loop.subnet)}")
    idx = torch.randint(0, len(data.train_images), (32,))
    x0, y = data.batch(idx, loop.resolution)
    loss = diffusion_loss(model, x0, y, noise, model.null_class)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loop.after_step(loss)
print(f"schedule: {' -> '.join(f'{s.subnet.resolution}px x{s.subnet.depth}' for s in loop.schedule().stages)}")
print(f"final loss {loss.item():.4f}")
