"""Per-step speed (and GPU memory) of each stage of an unfreezing schedule against full fine-tuning.

What a CPU cannot show at paper scale: how much faster a training step of a DiT really gets when only
some blocks are learnable and the input is smaller, with mixed precision on a GPU. Each stage is timed as
the fine-tuning trainer runs it: all blocks forward, the frozen ones without gradients, AdamW over the
learnable parameters only. Synthetic latents, so nothing is downloaded. Example (GPU; DiT-XL/2 on
256-px images = 32x32x4 latents, as the paper fine-tunes):

    python benchmarks/finetune_step_speed.py --preset DiT-XL/2 --batch-size 32 --amp bf16

a found schedule instead of the uniform linear one: ``--schedule 8x7,16x14,24x21,32x28``; a small CPU check:

    python benchmarks/finetune_step_speed.py --preset tiny --batch-size 64 --steps 3

Prints one line per stage and the schedule's average over equal-length stages (harmonic combination of
the stage step times, which is what a run with that schedule realises), next to the FLOPs speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import report

from autoprog.adapters.unfreezer import Unfreezer
from autoprog.diffusion.sampling import diffusion_loss, training_scheduler
from autoprog.metrics import count_flops
from autoprog.models.dit import DiT
from autoprog.schedules import Schedule, prog

# name: (latent size, patch, channels, hidden, depth, heads); the paper's DiT sizes on 256-px images
PRESETS = {
    "DiT-S/2": (32, 2, 4, 384, 12, 6),
    "DiT-B/2": (32, 2, 4, 768, 12, 12),
    "DiT-L/2": (32, 2, 4, 1024, 24, 16),
    "DiT-XL/2": (32, 2, 4, 1152, 28, 16),
    "tiny": (28, 4, 1, 128, 6, 4),  # the shipped base model's size
}


def time_stage(model, unfreezer, subnet, batch, steps, amp, device, scheduler) -> dict:
    unfreezer.apply(subnet)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    r = subnet.resolution
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, model.in_chans, r, r, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = diffusion_loss(model, x0, y, scheduler, model.null_class, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    def count():
        with torch.random.fork_rng(devices=[]):
            diffusion_loss(model, x0[:1], y[:1], scheduler, model.null_class).backward()
        for p in model.parameters():
            p.grad = None

    return {"subnet": str(subnet), "step_s": sorted(times)[len(times) // 2], "flops": count_flops(count) * batch,
            "learnable_params": sum(p.numel() for p in params), "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="DiT-XL/2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--start-ratio", type=float, default=0.25, help="first stage's ratio (default: 0.25, Sec. 5.1.2)")
    p.add_argument("--schedule", help="time this schedule (inline RESxLEARNABLE_BLOCKS,... or a schedule.json) "
                                      "instead of the uniform linear one")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    size, patch, chans, hidden, depth, heads = PRESETS[a.preset]
    torch.manual_seed(0)
    model = DiT(size, patch, chans, 1000 if chans == 4 else 10, hidden, depth, heads).to(device)
    unfreezer = Unfreezer(model)
    space = unfreezer.space(a.num_stages, a.start_ratio)
    sched = Schedule.from_arg(a.schedule, "prog") if a.schedule else prog(space)
    sched.validate_for(space)
    scheduler = training_scheduler()
    full = time_stage(model, unfreezer, space.full, a.batch_size, a.steps, amp, device, scheduler)
    stages = [time_stage(model, unfreezer, s.subnet, a.batch_size, a.steps, amp, device, scheduler)
              for s in sched.stages]
    fracs = [s.fraction for s in sched.stages]
    for row in stages:
        row["speedup"] = full["step_s"] / row["step_s"]
        row["flops_speedup"] = full["flops"] / row["flops"]
        mem = f"  peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        print(f"{row['subnet']:>14}: {1000 * row['step_s']:8.1f} ms/step  speed-up {row['speedup']:5.2f}x  "
              f"FLOPs speed-up {row['flops_speedup']:5.2f}x  learnable {row['learnable_params'] / 1e6:.1f}M{mem}")
    total = {"speedup": full["step_s"] / sum(f * r["step_s"] for f, r in zip(fracs, stages)),
             "flops_speedup": full["flops"] / sum(f * r["flops"] for f, r in zip(fracs, stages))}
    mem = f"; full fine-tuning peaks at {full['peak_gib']:.1f} GiB" if full["peak_gib"] is not None else ""
    report(a, device, f"{sched.method} schedule ({a.preset})", full, stages, total, mem)


if __name__ == "__main__":
    main()
