"""Grow a ViT progressively inside a plain PyTorch loop (AutoProg-Zero picks each stage's sub-network).

    python examples/own_loop_pretrain.py [--steps 400] [--schedule prog|progstack|autoprog-zero|16x3,24x6]
"""

import argparse

import torch
import torch.nn.functional as F

from autoprog.adapters.vit import ElasticViT
from autoprog.algorithms.autoprog_zero import AutoProgZero
from autoprog.data import load_digits
from autoprog.loop import ProgressiveLoop, ProxyData
from autoprog.models.vit import VisionTransformer

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=400)
p.add_argument("--schedule", default="autoprog-zero")
args = p.parse_args()
torch.manual_seed(0)

data = load_digits()  # scikit-learn's 8x8 digits: real data every machine with autoprog has
train = data.loader("train", 64, shuffle=True, drop_last=True)
model = ElasticViT(VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4,
                                     num_heads=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

probe = [(data.prepare(x, train=False), y) for x, y in data.loader("train", 16, shuffle=False, limit=64)]
proxy = ProxyData(probe, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
space = model.growth_space(num_stages=4, start_ratio=0.5)
schedule = AutoProgZero(space) if args.schedule == "autoprog-zero" else args.schedule
loop = ProgressiveLoop.growing(model, optimizer, args.steps, schedule=schedule, proxy=proxy,
                              steps_per_epoch=len(train), log=lambda s: None)

step = 0
while step < loop.total_steps:
    for x, y in train:
        if step == loop.total_steps:
            break
        if loop.before_step():
            print(f"step {step}: training {loop.subnet}")
        loss = F.cross_entropy(model(loop.resize(data.prepare(x, train=True))), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop.after_step(loss)
        step += 1

model.eval()
with torch.no_grad():
    hits = sum(int((model(data.prepare(x, train=False)).argmax(-1) == y).sum()) for x, y in data.loader("test", 256, False))
print(f"schedule: {' -> '.join(str(s.subnet) for s in loop.schedule().stages)}")
print(f"top-1 {100 * hits / len(data.test):.1f}% after {step} steps")
