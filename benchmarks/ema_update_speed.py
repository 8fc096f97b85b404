"""Seconds of one fine-tuning EMA update per unfreezing stage: timm's ``ModelEmaV3`` (every weight, every step)
against autoprog's ``LazyEma`` (the frozen weights' updates deferred and applied at once), in one run.

The update runs after every optimizer step of a run with ``--ema-decay`` (the ``dit-xl2-paper`` preset's 0.9999,
as the official code). Each stage's learnable blocks are changed in place before each update, as an optimizer
step changes them; the figure is the median of ``--updates`` timed updates after two untimed ones, and the
lazy EMA's deferred updates are applied (its average read) once per stage, untimed, as an evaluation does.
Synthetic weights, nothing downloaded. Example (DiT-XL/2, the uniform linear schedule of the paper's 4 stages):

    python benchmarks/ema_update_speed.py --preset DiT-XL/2 --updates 10 --out ema.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from finetune_step_speed import PRESETS, UNET_PRESETS, build_model
from timm.utils import ModelEmaV3

from autoprog.adapters.unfreezer import LAYOUTS, Unfreezer
from autoprog.ema import LazyEma
from autoprog.schedules import prog


def timed_updates(ema, model, learnable, updates: int, device) -> float:
    """Median seconds of ``ema.update(model)`` after the ``learnable`` weights changed in place."""
    times = []
    for i in range(updates + 2):
        with torch.no_grad():
            torch._foreach_add_(learnable, 1e-6)  # an optimizer step's change
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ema.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(UNET_PRESETS), default="DiT-XL/2")
    p.add_argument("--updates", type=int, default=10, help="timed updates per stage and EMA")
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--layout", choices=LAYOUTS, default="spread", help="which blocks a stage trains")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(a.preset, None).to(device)
    unfreezer = Unfreezer(model, a.layout)
    space = unfreezer.space(a.num_stages, 0.25)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for stage in [*prog(space).stages, None]:
        unfreezer.apply(stage.subnet if stage is not None else space.full)
        learnable = [p for p in model.parameters() if p.requires_grad]
        row = {"subnet": str(stage.subnet) if stage is not None else "full",
               "learnable_share": sum(p.numel() for p in learnable) / total}
        for name, kind in (("timm", ModelEmaV3), ("lazy", LazyEma)):
            ema = kind(model, decay=0.9999)
            row[f"{name}_s"] = timed_updates(ema, model, learnable, a.updates, device)
            if name == "lazy":
                ema.averaged()
            del ema
        row["speedup"] = row["timm_s"] / row["lazy_s"]
        rows.append(row)
        print(f"{row['subnet']:>14}: learnable {row['learnable_share']:5.1%}  timm {1000 * row['timm_s']:8.1f} ms  "
              f"lazy {1000 * row['lazy_s']:8.1f} ms  ({row['speedup']:.2f}x)")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"EMA update ({a.preset}, {total / 1e6:.0f}M parameters) on {dev}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "args": vars(a), "parameters": total, "stages": rows}, f, indent=2)


if __name__ == "__main__":
    main()
