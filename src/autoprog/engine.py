"""Mechanics both trainers share: DDP re-wrapping, broadcasting a decision, the calls controllers make on a
trainer, atomic file and directory writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

CHECKPOINT_DIR = "checkpoint"  # inside a run directory: the latest resumable state


def trained_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def rewrap_if_needed(acc, wrapped: nn.Module, module: nn.Module, wrapped_ids: set[int]) -> tuple[nn.Module, set[int]]:
    """DDP only tracks the parameters (objects) that required grad when it was wrapped: re-prepare ``module``
    when that set changed. Returns the (possibly new) wrapper and the set it tracks."""
    if acc.num_processes == 1:
        return wrapped, wrapped_ids
    now = trained_ids(module)
    if now == wrapped_ids:
        return wrapped, wrapped_ids
    release(acc, wrapped, module)
    return acc.prepare_model(module), now


def release(acc, wrapped: nn.Module, module: nn.Module) -> None:
    """Forget a prepared model: Accelerate lists the module itself (not its DDP wrapper) and, under mixed
    precision, wraps its ``forward`` in place; undo both so re-preparing does not nest wrappers and a
    finished run's model can be freed."""
    acc._models = [m for m in acc._models if m is not module and m is not wrapped]
    acc.unwrap_model(wrapped, keep_fp32_wrapper=False)


def broadcast(acc, obj):
    """The main process's ``obj`` on every process."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


class ControllerCalls:
    """What a schedule controller may call on either trainer besides its own methods: broadcast a decision,
    log a stage record, print once. Needs ``acc`` (an Accelerator), ``step`` and ``stage_log``."""

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        return broadcast(self.acc, obj)

    def log_stage(self, info: dict) -> None:
        self.stage_log.append({"step": self.step, **info})

    def print(self, *args) -> None:
        self.acc.print(*args)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; a crash at any point leaves a complete old or new one."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, acc, model: nn.Module, ema: nn.Module | None, optimizer, state: dict) -> None:
    """Replace ``out/checkpoint`` atomically: safetensors weights of ``model`` (and of the momentum ``ema``), the
    optimizer state by parameter name plus the torch RNG, and ``state`` as JSON. Main process only; every
    process waits here first."""
    import json

    import torch
    from safetensors.torch import save_file

    from .optim import optimizer_state_tensors

    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    opt = optimizer_state_tensors(optimizer, model)
    opt["__rng__"] = torch.get_rng_state()
    save_file(opt, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    replace_dir(tmp, out / CHECKPOINT_DIR)


def read_checkpoint(out: Path, total_steps: int, device) -> tuple[dict, dict, dict | None, dict]:
    """``(state, model weights, ema weights or None, optimizer tensors)`` of ``out/checkpoint``, with the torch RNG
    restored; a missing checkpoint or one made for another number of steps is a :class:`ConfigError`."""
    import json

    import torch
    from safetensors.torch import load_file

    from .errors import ConfigError

    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").is_file():
        raise ConfigError(f"{out} has no checkpoint to resume from")
    state = json.loads((ck / "state.json").read_text())
    if state["total_steps"] != total_steps:
        raise ConfigError(f"checkpoint was made for {state['total_steps']} steps, this run has {total_steps}")
    dev = str(device)
    model = load_file(ck / "model.safetensors", device=dev)
    ema = load_file(ck / "ema.safetensors", device=dev) if (ck / "ema.safetensors").is_file() else None
    opt = load_file(ck / "optimizer.safetensors")
    torch.set_rng_state(opt.pop("__rng__"))
    return state, model, ema, opt
