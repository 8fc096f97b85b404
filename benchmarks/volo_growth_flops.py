"""How much of VOLO-D1's training compute prog's growth saves, with the outlookers in the growth space (the official
split, autoprog's default) and without them (the transformer blocks only, autoprog before 2026-12-06).

Counts the FLOPs of one training step (forward + backward, one 224-px image; torch's FlopCounterMode) of each
stage's sub-network of prog over 0.5Ω, four equal stages, and reports the mean against the full model's: the
theoretical speed-up of the paper's Table 15 (VOLO-D1 Prog: 6.8G -> 3.7G, +84.7 %). Also at the official code's
resolutions (``make_divisible(r, 32)``: 128, 160, 192, 224; autoprog rounds to VOLO's 16-px grid: 112, 144, 192,
224). CPU only, about a minute::

    python benchmarks/volo_growth_flops.py
"""

from __future__ import annotations

import argparse

import timm
import torch

from autoprog.adapters import elastic
from autoprog.metrics import train_step_flops
from autoprog.schedules import prog
from autoprog.space import SubNet, round_half_up


def step_gflops(net, subnet: SubNet, num_classes: int) -> float:
    net.apply_subnet(subnet)
    x = torch.randn(1, 3, subnet.resolution, subnet.resolution)
    return train_step_flops(net, x, num_classes) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="volo_d1_224")
    ap.add_argument("--start-ratio", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = elastic(timm.create_model(args.model, pretrained=False, num_classes=1000))
    space = net.growth_space(4, args.start_ratio)
    n_out, n_tr = space.segments.sizes
    full = step_gflops(net, space.full, 1000)
    stages = [s.subnet for s in prog(space).stages]
    official_res = [timm.layers.make_divisible(r * space.full_resolution, 32) for r in space.ratios()]
    variants = {
        "outlookers and transformers grow (official split, default)":
            [SubNet(r, s.depth) for r, s in zip([s.resolution for s in stages], stages)],
        "transformers only (outlookers always all)":
            [SubNet(s.resolution, n_out + round_half_up(ratio * n_tr),
                    tuple(range(n_out)) + tuple(n_out + j for j in range(round_half_up(ratio * n_tr))))
             for s, ratio in zip(stages, space.ratios())],
        "official split at the official code's resolutions":
            [SubNet(r, s.depth) for r, s in zip(official_res, stages)],
    }
    print(f"{args.model}: {n_out} outlookers + {n_tr} transformers; full model {full:.2f} GFLOPs per training step "
          f"(one {space.full_resolution}-px image, forward + backward)\n")
    for name, subs in variants.items():
        flops = [step_gflops(net, s, 1000) for s in subs]
        mean = sum(flops) / len(flops)
        print(f"## {name}")
        print("| stage | resolution | outlookers + transformers | GFLOPs | share of full |")
        print("|---:|---:|---|---:|---:|")
        for k, (s, f) in enumerate(zip(subs, flops), 1):
            parts = space.segments.partition(net.blocks_of(s))
            print(f"| {k} | {s.resolution} | {len(parts[0])} + {len(parts[1])} | {f:.2f} | {f / full:.3f} |")
        print(f"\nmean {mean:.2f} GFLOPs: theoretical speed-up {full / mean:.3f}x (+{100 * (full / mean - 1):.1f} %)\n")


if __name__ == "__main__":
    main()
