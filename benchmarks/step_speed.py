"""Per-step speed of each stage of a growth schedule against the full model (synthetic data).

Measures what a CPU cannot show at paper scale: the realised per-step speed-up of Prog's sub-networks
for a timm DeiT at 224 px with mixed precision on a GPU, next to the FLOPs speed-up. Example (GPU):

    python benchmarks/step_speed.py --model timm:deit_small_patch16_224 --batch-size 128 --amp bf16

and a small CPU check:

    python benchmarks/step_speed.py --model vit --img-size 28 --batch-size 128 --steps 5

Prints one line per stage and the schedule's average: speed-up = full-model step time / stage step
time; the schedule's speed-up is the harmonic combination over equal-length stages, which is what a
training run with that schedule would realise.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _report import report

from autoprog.adapters.factory import ModelOverrides, build_model
from autoprog.adapters.vit import ElasticViT
from autoprog.metrics import train_step_flops
from autoprog.optim import build_optimizer
from autoprog.schedules import prog


def step_time(net, x, y, opt, steps, amp, device) -> float:
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:deit_small_patch16_224")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--start-ratio", type=float, default=0.5)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    in_chans, classes = 3, 1000
    if a.model == "vit":
        in_chans, classes = 1, 10
    net = ElasticViT(build_model(a.model, classes, in_chans, ModelOverrides(img_size=a.img_size, patch_size=a.patch_size))).to(device)
    opt = build_optimizer(net, 1e-4, 0.05)
    r = net.full_resolution
    x = torch.randn(a.batch_size, in_chans, r, r, device=device)
    y = torch.randint(0, classes, (a.batch_size,), device=device)
    sched = prog(net.growth_space(4, a.start_ratio))
    rows = []
    for subnet in [net.full_subnet] + [s.subnet for s in sched.stages]:
        net.apply_subnet(subnet)
        t = step_time(net, x, y, opt, a.steps, amp, device)
        flops = train_step_flops(net, x[:1], classes)
        rows.append({"subnet": str(subnet), "step_s": t, "flops": flops})
    full = rows[0]
    stages = rows[1:]
    for row in stages:
        row["speedup"] = full["step_s"] / row["step_s"]
        row["flops_speedup"] = full["flops"] / row["flops"]
        print(f"{row['subnet']:>14}: {1000 * row['step_s']:8.1f} ms/step  speed-up {row['speedup']:5.2f}x  "
              f"FLOPs speed-up {row['flops_speedup']:5.2f}x")
    total = {
        "speedup": full["step_s"] * len(stages) / sum(r["step_s"] for r in stages),
        "flops_speedup": full["flops"] * len(stages) / sum(r["flops"] for r in stages),
    }
    report(a, device, f"prog schedule ({a.model}, {r}px)", full, stages, total)


if __name__ == "__main__":
    main()
