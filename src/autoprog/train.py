"""The progressive pre-training loop, on Accelerate.

The trainer runs steps and calls the schedule at well-named moments: it asks which stage a step belongs
to, lets the growth operator initialise the new sub-network, moves the optimizer state with the weights,
and has the adapter apply the sub-network. It never decides what to grow.

Every epoch it evaluates top-1 (online and momentum/EMA model) at full resolution, writes
``results.json`` and a checkpoint (safetensors weights + JSON state) from which a run resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters.vit import ElasticViT
from .data import DataBundle
from .errors import ConfigError
from .growth import GrowthOperator, MomentumNetwork
from .metrics import top1_correct, train_step_flops
from .optim import build_optimizer, load_optimizer_state, optimizer_state_tensors, remap_block_state, sync_params
from .schedules import Schedule
from .space import SubNet

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method, so comparisons differ only in the schedule."""

    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.998
    seed: int = 0
    eval_samples: int | None = None
    max_steps: int | None = None
    num_workers: int = 0
    count_flops: bool = True
    stop_after_epochs: int | None = None  # stop early (checkpoint kept) e.g. to test resuming

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")


class Trainer:
    """Train ``net`` on ``data`` following ``schedule``, growing with ``growth`` at stage boundaries."""

    def __init__(self, net: ElasticViT, schedule: Schedule, growth: GrowthOperator, data: DataBundle,
                 cfg: TrainConfig, out_dir: str | Path, accelerator=None, run_info: dict | None = None):
        from accelerate import Accelerator

        cfg.validate()
        schedule.validate_for(net.growth_space(1, 1.0))
        self.net, self.schedule, self.growth, self.data, self.cfg = net, schedule, growth, data, cfg
        self.out = Path(out_dir)
        self.acc = accelerator or Accelerator()
        self.run_info = run_info or {}
        self.net.to(self.acc.device)
        self.ema = MomentumNetwork(self.net, cfg.ema_decay)
        self.optimizer = build_optimizer(self.net, cfg.lr, cfg.weight_decay)
        self.model = self.acc.prepare_model(self.net)
        self.test_loader = self.acc.prepare_data_loader(
            data.loader("test", cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers)
        )
        self.eval_loader = self.test_loader
        if cfg.eval_samples is not None and cfg.eval_samples < len(data.test):
            self.eval_loader = self.acc.prepare_data_loader(
                data.loader("test", cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers,
                            limit=cfg.eval_samples)
            )
        self.steps_per_epoch = len(self._train_loader(0))
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(data.train)} images) is smaller than one batch of {cfg.batch_size}"
            )
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        from timm.scheduler import CosineLRScheduler

        warmup = min(self.total_steps // 2, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.lr_sched = CosineLRScheduler(
            self.optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
            warmup_lr_init=cfg.lr * 0.01, warmup_prefix=True, t_in_epochs=False,
        )
        self.step = 0
        self.epoch = 0
        self.stage = -1
        self.train_time = 0.0
        self.flops_sum = 0.0
        self.flops_cache: dict[tuple, int] = {}
        self.history: list[dict] = []
        self.stage_log: list[dict] = []

    # ------------------------------------------------------------------------------------- helpers
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.acc.num_processes

    def _train_loader(self, epoch: int):
        loader = self.data.loader("train", self.cfg.batch_size, shuffle=True, seed=self.cfg.seed * 7919 + epoch,
                                  drop_last=True, num_workers=self.cfg.num_workers)
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(loader, self.acc.device, num_processes=self.acc.num_processes,
                                   process_index=self.acc.process_index, put_on_device=True)

    def _step_flops(self, subnet: SubNet) -> int:
        key = (subnet.resolution, subnet.active_blocks)
        if key not in self.flops_cache:
            if not self.cfg.count_flops:
                return 0
            size = self.data.image_size
            sample = torch.zeros(1, self.data.in_chans, size, size, device=self.acc.device)
            with torch.random.fork_rng(devices=[]):
                self.flops_cache[key] = train_step_flops(self.net, sample, self.data.num_classes) * self.global_batch
        return self.flops_cache[key]

    def _enter_stage(self, k: int) -> None:
        """Grow from the current sub-network to stage ``k``'s, then apply it."""
        dst = self.schedule.stages[k].subnet
        src = self.net.subnet
        info = {"stage": k, "step": self.step, "subnet": dst.to_dict(), "growth": None}
        if self.stage >= 0 and dst != src:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed * 1009 + k)  # same fresh weights on every process
                result = self.growth.grow(self.net, self.ema.module, src, dst)
            remap_block_state(self.optimizer, self.net, result.block_map)
            sync_params(self.optimizer, self.net, self.cfg.weight_decay)  # gates may have come or gone
            info["growth"] = {"operator": self.growth.name,
                              "block_map": {str(d): s for d, s in result.block_map.items()},
                              "gated": result.gated}
        self.net.apply_subnet(dst)
        self.ema.module.apply_subnet(dst)
        self.stage = k
        if self.acc.num_processes > 1:  # DDP tracks only parameters that required grad when wrapped
            self.acc._models = [m for m in self.acc._models if m is not self.model]
            self.model = self.acc.prepare_model(self.net)
        self._step_flops(dst)
        self.stage_log.append(info)
        self.acc.print(f"stage {k + 1}/{len(self.schedule.stages)}: {dst}"
                       + (f" (grown by {self.growth.name})" if info["growth"] else ""))

    @torch.no_grad()
    def evaluate(self, full: bool = False) -> tuple[float, float]:
        """Top-1 of the online and the momentum model at full resolution with the current blocks."""
        loader = self.test_loader if full else self.eval_loader
        accs = []
        for net in (self.net, self.ema.module):
            cur = net.subnet
            net.subnet = replace(cur, resolution=net.full_resolution)
            was = net.training
            net.eval()
            correct = total = 0
            try:
                for x, y in loader:
                    x = self.data.prepare(x, train=False)
                    with self.acc.autocast():
                        logits = net(x)
                    c, n = self.acc.gather_for_metrics((top1_correct(logits, y).view(1), torch.tensor([len(y)], device=y.device)))
                    correct += int(c.sum())
                    total += int(n.sum())
            finally:
                net.subnet = cur
                net.train(was)
            accs.append(100.0 * correct / max(1, total))
        return accs[0], accs[1]

    # ----------------------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict:
        if resume:
            self._load_checkpoint()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            self.schedule.save(self.out / "schedule.json")
        full_flops = self._step_flops(self.net.full_subnet) if self.cfg.count_flops else 0
        starts = self.schedule.boundaries(self.total_steps)
        k = self.schedule.stage_at(self.step, self.total_steps)
        if self.stage != k:
            self._enter_stage(k)
        self.model.train()
        stopped_early = False
        while self.epoch < self.num_epochs:
            epoch_start_step = self.step
            torch.manual_seed(self.cfg.seed * 100003 + self.epoch * 131 + self.acc.process_index)
            gen = torch.Generator().manual_seed(self.cfg.seed * 7 + self.epoch * 104729 + self.acc.process_index)
            loss_sum, loss_n = torch.zeros((), device=self.acc.device), 0
            steps_this_epoch = min(self.steps_per_epoch, self.total_steps - self.step)
            bar = tqdm(total=steps_this_epoch, desc=f"epoch {self.epoch + 1}/{self.num_epochs}", leave=False,
                       disable=not self.acc.is_local_main_process or None, dynamic_ncols=True)
            self._sync()
            t_epoch = time.perf_counter()
            step_times = []
            for x, y in self._train_loader(self.epoch):
                if self.step >= self.total_steps:
                    break
                t0 = time.perf_counter()
                k = self.schedule.stage_at(self.step, self.total_steps)
                if k != self.stage:
                    self._enter_stage(k)
                loss = self._train_step(x, y, gen)
                loss_sum += loss.detach()
                loss_n += 1
                self.flops_sum += self._step_flops(self.net.subnet)
                self.step += 1
                step_times.append(time.perf_counter() - t0)
                if bar.n % 10 == 0 or bar.n + 1 == steps_this_epoch:
                    bar.set_postfix(stage=f"{self.stage + 1}/{len(starts)}", subnet=str(self.net.subnet),
                                    loss=f"{loss.item():.3f}", img_s=f"{self.global_batch / step_times[-1]:.0f}")
                bar.update(1)
            self._sync()
            epoch_time = time.perf_counter() - t_epoch
            bar.close()
            self.train_time += epoch_time
            self.epoch += 1
            final = self.step >= self.total_steps
            top1, top1_ema = self.evaluate(full=final)
            mean_loss = float(self.acc.reduce(loss_sum, reduction="mean")) / max(1, loss_n)
            steps = self.step - epoch_start_step
            self.history.append({
                "epoch": self.epoch, "step": self.step, "stage": self.stage + 1,
                "resolution": self.net.subnet.resolution, "depth": self.net.subnet.depth,
                "lr": self.optimizer.param_groups[0]["lr"], "train_loss": round(mean_loss, 5),
                "top1": round(top1, 3), "top1_ema": round(top1_ema, 3),
                "eval_samples": len(self.data.test) if final or self.eval_loader is self.test_loader
                else self.cfg.eval_samples,
                "epoch_time_s": round(epoch_time, 3), "train_time_s": round(self.train_time, 3),
                "step_time_median_s": round(sorted(step_times)[len(step_times) // 2], 5) if step_times else None,
                "images_per_s": round(steps * self.global_batch / max(epoch_time, 1e-9), 1),
                "flops_per_step": self.flops_sum / max(1, self.step),
            })
            self.acc.print(
                f"epoch {self.epoch}/{self.num_epochs} stage {self.stage + 1} {self.net.subnet} "
                f"loss {mean_loss:.4f} top1 {top1:.2f} ema {top1_ema:.2f} "
                f"time {self.train_time:.1f}s ({self.history[-1]['images_per_s']:.0f} img/s)"
            )
            self._save_checkpoint()
            self._write_results(full_flops, done=final)
            if self.cfg.stop_after_epochs is not None and self.epoch >= self.cfg.stop_after_epochs and not final:
                stopped_early = True
                break
        return self._write_results(full_flops, done=not stopped_early)

    def _train_step(self, x, y, gen) -> torch.Tensor:
        x = self.data.prepare(x, train=True, generator=gen)
        with self.acc.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        self.acc.backward(loss)
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_sched.step_update(self.step + 1)
        self.ema.update(self.net)
        return loss

    def _sync(self) -> None:
        if torch.cuda.is_available() and self.acc.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------------------------- results
    def summary(self, full_flops: int) -> dict:
        last = self.history[-1] if self.history else {}
        avg_flops = self.flops_sum / max(1, self.step)
        return {
            **self.run_info,
            "growth": self.growth.name,
            "epochs": self.num_epochs, "steps": self.step, "total_steps": self.total_steps,
            "wall_time_s": round(self.train_time, 3),
            "top1": last.get("top1"), "top1_ema": last.get("top1_ema"),
            "best_top1": max((h["top1"] for h in self.history), default=None),
            "flops_per_step": avg_flops, "full_model_flops_per_step": full_flops,
            "theoretical_speedup": round(full_flops / avg_flops, 4) if avg_flops and full_flops else None,
            "schedule": self.schedule.to_dict(),
        }

    def _write_results(self, full_flops: int, done: bool) -> dict:
        res = {"config": asdict(self.cfg), "run": self.run_info, "done": done, "epochs": self.history,
               "stages": self.stage_log, "summary": self.summary(full_flops)}
        if self.acc.is_main_process:
            _atomic_write(self.out / "results.json", json.dumps(res, indent=2) + "\n")
        return res

    # --------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        tmp = self.out / (CHECKPOINT_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()}, tmp / "ema.safetensors")
        opt = optimizer_state_tensors(self.optimizer, self.net)
        opt["__rng__"] = torch.get_rng_state()
        save_file(opt, tmp / "optimizer.safetensors")
        state = {
            "epoch": self.epoch, "step": self.step, "stage": self.stage, "subnet": self.net.subnet.to_dict(),
            "gated_blocks": self.net.gated_blocks(), "train_time_s": self.train_time, "flops_sum": self.flops_sum,
            "flops_cache": [[r, list(b), f] for (r, b), f in self.flops_cache.items()],
            "history": self.history, "stage_log": self.stage_log, "total_steps": self.total_steps,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        final = self.out / CHECKPOINT_DIR
        old = self.out / (CHECKPOINT_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        ck = self.out / CHECKPOINT_DIR
        if not (ck / "state.json").is_file():
            raise ConfigError(f"{self.out} has no checkpoint to resume from")
        state = json.loads((ck / "state.json").read_text())
        if state["total_steps"] != self.total_steps:
            raise ConfigError(f"checkpoint was made for {state['total_steps']} steps, this run has {self.total_steps}")
        for net in (self.net, self.ema.module):
            for i in state["gated_blocks"]:
                net.set_gate(i, 0.0)
        dev = self.acc.device
        self.net.load_state_dict(load_file(ck / "model.safetensors", device=str(dev)))
        self.ema.module.load_state_dict(load_file(ck / "ema.safetensors", device=str(dev)))
        sync_params(self.optimizer, self.net, self.cfg.weight_decay)
        opt = load_file(ck / "optimizer.safetensors")
        torch.set_rng_state(opt.pop("__rng__"))
        load_optimizer_state(self.optimizer, self.net, opt)
        subnet = SubNet.from_dict(state["subnet"])
        self.net.apply_subnet(subnet)
        self.ema.module.apply_subnet(subnet)
        if self.acc.num_processes > 1:
            self.acc._models = [m for m in self.acc._models if m is not self.model]
            self.model = self.acc.prepare_model(self.net)
        self.epoch, self.step, self.stage = state["epoch"], state["step"], state["stage"]
        self.train_time, self.flops_sum = state["train_time_s"], state["flops_sum"]
        self.flops_cache = {(r, tuple(b)): f for r, b, f in state["flops_cache"]}
        self.history, self.stage_log = state["history"], state["stage_log"]
        self.lr_sched.step_update(self.step)
        self.acc.print(f"resumed from {ck} at epoch {self.epoch}, step {self.step}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

