"""Per-step speed (and GPU memory) of each stage of an unfreezing schedule against full fine-tuning.

What a CPU cannot show at paper scale: how much faster a training step of a DiT really gets when only
some blocks are learnable and the input is smaller, with mixed precision on a GPU. Each stage is timed as
the fine-tuning trainer runs it: all blocks forward, the frozen ones without gradients, AdamW over the
learnable parameters only. Synthetic latents, so nothing is downloaded. Example (GPU; DiT-XL/2 on
256-px images = 32x32x4 latents, as the paper fine-tunes):

    python benchmarks/finetune_step_speed.py --preset DiT-XL/2 --batch-size 32 --amp bf16

a found schedule instead of the uniform linear one: ``--schedule 8x7,16x14,24x21,32x28``; a small CPU check:

    python benchmarks/finetune_step_speed.py --preset tiny --batch-size 64 --steps 3

Stable Diffusion's UNet (``SD-1.5``: the 860 M-parameter UNet2DConditionModel and a 123 M CLIP ViT-L text
encoder of SD 1.5's config, random weights; the learnable units are its 4 down, mid and 4 up blocks) on
64x64 latents (512 px), or smaller ones with ``--latent-size``; the built-in text-to-image default is
``t2i-tiny``. On a CPU, where no CUDA memory counter exists, the peak is the process's resident memory
above what it held before the stage (sampled every 10 ms):

    python benchmarks/finetune_step_speed.py --preset SD-1.5 --batch-size 1 --steps 1 --latent-size 32

``--layout tail --frozen-prefix no-grad`` times the stages as they run with the learnable blocks contiguous from
the output side and the frozen prefix without autograd (nothing below the first learnable block kept for the
backward pass); each stage's line then says whether its share of full fine-tuning's step time is within its FLOPs
share + 0.10.

Prints one line per stage and the schedule's average over equal-length stages (harmonic combination of
the stage step times, which is what a run with that schedule realises), next to the FLOPs speed-up.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from _report import report

from autoprog.adapters.unfreezer import FROZEN_PREFIX, LAYOUTS, Unfreezer
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
# name: (latent size, channels per level, cross-attention (text) width, text layers, attention head dim)
UNET_PRESETS = {
    "SD-1.5": (64, (320, 640, 1280, 1280), 768, 12, 8),
    "t2i-tiny": (28, (16, 32), 64, 2, 8),  # the shipped text-to-image base's size
}


def build_model(preset: str, latent_size: int | None):
    if preset in PRESETS:
        size, patch, chans, hidden, depth, heads = PRESETS[preset]
        return DiT(size, patch, chans, 1000 if chans == 4 else 10, hidden, depth, heads)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from autoprog.models.text_unet import TextUNet, word_tokenizer

    size, channels, text_dim, text_layers, head_dim = UNET_PRESETS[preset]
    size = latent_size or size
    chans = 4 if preset == "SD-1.5" else 1
    n = len(channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 2 else ("DownBlock2D", "CrossAttnDownBlock2D")
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1) if n > 2 else ("CrossAttnUpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(sample_size=size, in_channels=chans, out_channels=chans, block_out_channels=channels,
                                layers_per_block=2 if n > 2 else 1, down_block_types=down, up_block_types=up,
                                cross_attention_dim=text_dim, attention_head_dim=head_dim,
                                norm_num_groups=min(32, *channels))
    length = 77 if preset == "SD-1.5" else 16
    tok = word_tokenizer("a photo of a dog".split(), max_length=length)
    vocab = tok.get_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408 if preset == "SD-1.5" else 0),
                                        hidden_size=text_dim, intermediate_size=4 * text_dim,
                                        num_hidden_layers=text_layers, num_attention_heads=max(1, text_dim // 64),
                                        max_position_embeddings=length, bos_token_id=vocab[tok.bos_token],
                                        eos_token_id=vocab[tok.eos_token], pad_token_id=vocab[tok.pad_token]))
    return TextUNet(unet, text, tok)


class PeakRSS:
    """Peak resident memory of this process above its level at the start (sampled every 10 ms), in GiB."""

    def __enter__(self):
        import psutil

        self.proc, self.base, self.peak, self.done = psutil.Process(), 0, 0, False
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.gib = (self.peak - self.base) / 2**30


def time_stage(model, unfreezer, subnet, batch, steps, amp, device, scheduler, warmup: int = 2) -> dict:
    unfreezer.apply(subnet)
    params = [p for p in model.parameters() if p.requires_grad]
    # on CUDA as the trainer's: fused (build_optimizer), the noise drawn on the device by a generator there (the
    # CPU keeps torch's default AdamW, so its figures stay comparable with those recorded before)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    r = subnet.resolution
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, model.in_chans, r, r, generator=g).to(device)
    if getattr(model, "kind", "") == "text-unet":
        y = model.tokenize(["a photo of a dog"] * batch).to(device)
    else:
        y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)

    noise_gen = torch.Generator(device).manual_seed(0) if device.type == "cuda" else g

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = diffusion_loss(model, x0, y, scheduler, model.null_condition(y), generator=noise_gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for i in range(steps + warmup):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss.gib

    def count():
        with torch.random.fork_rng(devices=[]):
            diffusion_loss(model, x0[:1], y[:1], scheduler, model.null_condition(y[:1])).backward()
        for p in model.parameters():
            p.grad = None

    def saved_bytes() -> int:
        """Bytes autograd keeps for the backward pass of one step (each storage once): the activation memory a
        stage needs, exactly, where the CPU's resident-memory peak is blurred by the allocator. Under ``--amp``
        this includes autocast's low-precision copies of the weights a backward pass goes through (about 2 bytes
        per such parameter in bf16): memory the stage needs too, but not there in an fp32 run."""
        seen = {}

        def pack(t):
            if t.device.type != "meta":
                seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
            return t

        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = diffusion_loss(model, x0, y, scheduler, model.null_condition(y), generator=noise_gen)
        del loss
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for (ptr, _), n in seen.items() if ptr not in params)  # weights are not activations

    return {"subnet": str(subnet), "step_s": sorted(times)[len(times) // 2], "flops": count_flops(count) * batch,
            "learnable_params": sum(p.numel() for p in params), "peak_gib": peak,
            "saved_activations_gib": saved_bytes() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(UNET_PRESETS), default="DiT-XL/2")
    p.add_argument("--latent-size", type=int, help="UNet presets: latent side (default: the preset's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each stage's timed ones")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--start-ratio", type=float, default=0.25, help="first stage's ratio (default: 0.25, Sec. 5.1.2)")
    p.add_argument("--schedule", help="time this schedule (inline RESxLEARNABLE_BLOCKS,... or a schedule.json) "
                                      "instead of the uniform linear one")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--layout", choices=LAYOUTS, default="spread", help="which blocks a stage trains (as "
                                                                        "--learnable-layout)")
    p.add_argument("--frozen-prefix", choices=FROZEN_PREFIX, default="backprop", help="as autoprog's option")
    p.add_argument("--no-sid", action="store_true", help="no stage identifier (by default the model has one, as "
                                                         "autoprog-zero fine-tuning gives it; it is learnable, so "
                                                         "gradients reach the condition through every block)")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]
    torch.manual_seed(0)
    model = build_model(a.preset, a.latent_size).to(device)
    if not a.no_sid:
        model.add_stage_identifier(a.num_stages)
    unfreezer = Unfreezer(model, a.layout, frozen_prefix=a.frozen_prefix)
    space = unfreezer.space(a.num_stages, a.start_ratio)
    sched = Schedule.from_arg(a.schedule, "prog") if a.schedule else prog(space)
    sched.validate_for(space)
    scheduler = training_scheduler()
    # one untimed full step first, so that the first stage timed does not pay alone for the allocator's first
    # touch of the whole model's gradients and optimizer state
    time_stage(model, unfreezer, space.full, a.batch_size, 1, amp, device, scheduler, 0)
    full = time_stage(model, unfreezer, space.full, a.batch_size, a.steps, amp, device, scheduler, a.warmup)
    stages = [time_stage(model, unfreezer, s.subnet, a.batch_size, a.steps, amp, device, scheduler, a.warmup)
              for s in sched.stages]
    fracs = [s.fraction for s in sched.stages]
    for row in stages:
        row["speedup"] = full["step_s"] / row["step_s"]
        row["flops_speedup"] = full["flops"] / row["flops"]
        row["time_share"], row["flops_share"] = 1 / row["speedup"], 1 / row["flops_speedup"]
        row["within_flops_share_plus_0.1"] = row["time_share"] <= row["flops_share"] + 0.10
        mem = f"  peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else ""
        mem += f"  activations {row['saved_activations_gib']:.2f} GiB"
        print(f"{row['subnet']:>14}: {1000 * row['step_s']:8.1f} ms/step  speed-up {row['speedup']:5.2f}x  "
              f"FLOPs speed-up {row['flops_speedup']:5.2f}x  learnable {row['learnable_params'] / 1e6:.1f}M{mem}  "
              f"time share {row['time_share']:.2f} vs FLOPs share {row['flops_share']:.2f}"
              f"{'' if row['within_flops_share_plus_0.1'] else '  (over FLOPs share + 0.10)'}")
    total = {"speedup": full["step_s"] / sum(f * r["step_s"] for f, r in zip(fracs, stages)),
             "flops_speedup": full["flops"] / sum(f * r["flops"] for f, r in zip(fracs, stages))}
    mem = f"; full fine-tuning peaks at {full['peak_gib']:.2f} GiB" if full["peak_gib"] is not None else ""
    mem += f", keeps {full['saved_activations_gib']:.2f} GiB of activations"
    report(a, device, f"{sched.method} schedule ({a.preset})", full, stages, total, mem)


if __name__ == "__main__":
    main()
