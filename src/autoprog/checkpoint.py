"""The run folder's files: resumable checkpoints (safetensors weights, optimizer state, JSON state) and results,
each written so that a crash leaves the old or the new version, never a part of one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .errors import AutoprogError, ConfigError
from .formats import check_fields, read_json_object

CHECKPOINT_DIR = "checkpoint"  # inside a run directory: the latest resumable state

PREVIOUS_SUFFIX = ".prev"  # the checkpoint before the newest, kept as a fallback


def fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old or the new file, never a part of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the finished directory ``tmp`` the new ``final``; the previous ``final`` becomes ``final.prev`` (the
    fallback). A crash at any point leaves a complete newest or previous one."""
    prev = final.with_name(final.name + PREVIOUS_SUFFIX)
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    fsync(final.parent)


def writable_dir(out: Path) -> Path:
    """Create ``out`` (and its parents) and check that files can be written there; a one-line
    :class:`ConfigError` otherwise (a file in the way, a read-only or virtual file system)."""
    from .errors import ConfigError

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".autoprog-write-test-{os.getpid()}"  # one per process: several may check at once
        probe.write_text("")
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"--out {out}: a file is in the way (it must be a directory)") from None
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create or write there ({err.strerror or err})") from None
    return out


# what a run writes in its folder (besides hidden temporary files): all that --overwrite removes
RUN_FILES = ("config.json", "results.json", "schedule.json", "samples", "logs", "model-samples",  # (autoprog sample's)
             *(d + s for d in (CHECKPOINT_DIR, "model") for s in ("", PREVIOUS_SUFFIX, ".tmp")))


# the files a comparison writes in its folder, beside a folder per run
COMPARISON_FILES = ("summary.json", "summary.md", "curves.png", "fd_curves.png", "front.png", "samples.png",
                    "samples.txt")


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds an exported model (autoprog's, a diffusers model or pipeline, or a timm checkpoint)."""
    return any((path / f).exists() for f in ("model.safetensors", "diffusion_pytorch_model.safetensors",
                                              "pytorch_model.bin", "model_index.json", "autoprog.json", "unet"))


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _refuse_overlap(out: Path, protected: dict[str, str | Path | None] | None) -> None:
    """A one-line :class:`ConfigError` when ``out`` is or lies in one of ``protected`` (what it is → its path:
    what the run reads), or one of them lies in ``out``."""
    for what, path in (protected or {}).items():
        if not path or not Path(path).exists():
            continue
        if _same_or_inside(out, Path(path)):
            raise ConfigError(f"--out {out} is inside {what} {path}, which this run reads; choose another --out")
        if _same_or_inside(Path(path), out):
            raise ConfigError(f"{what} {path} lies inside --out {out}, where the run writes; choose another --out")


@contextmanager
def no_empty_folder_left(out: str | os.PathLike):
    """While active, a run's folder that did not exist before and is still empty when the run fails (refused
    settings, a crash before anything was written) is removed again: a refused command leaves nothing behind."""
    out = Path(out)
    new = not out.exists()
    try:
        yield
    except BaseException:
        if new and out.is_dir() and not any(out.iterdir()):
            try:
                out.rmdir()
            except OSError:  # (another process wrote there, or removed it first)
                pass
        raise


def new_run_dir(out: Path, overwrite: bool = False, protected: dict[str, str | Path | None] | None = None) -> Path:
    """Make ``out`` the folder of a new run: a new or empty folder, or one holding only a run's files (a run
    stopped before its first checkpoint is started again there). Never a model folder, a folder holding other
    files, or one of ``protected`` (what it is → its path: the ``--base`` a run reads); a run with a checkpoint
    or results there is continued with ``--resume``, or removed first with ``overwrite``. One-line
    :class:`ConfigError` otherwise."""
    out = Path(out)
    _refuse_overlap(out, protected)
    if out.is_dir():
        if is_model_dir(out):
            raise ConfigError(f"--out {out} is a model folder; choose a new or empty folder (a run writes its model "
                              "to OUT/model)")
        entries = sorted(e.name for e in out.iterdir() if not e.name.startswith("."))
        others = [e for e in entries if e not in RUN_FILES]
        if others:
            raise ConfigError(f"--out {out} holds files that are not a run's ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")
        if has_checkpoint(out) or (out / "results.json").is_file():
            if not overwrite:
                raise ConfigError(f"{out} already holds a run: pass --resume {out} (in Python: resume=True) to "
                                  "continue it, --overwrite (overwrite=True) to "
                                  "start it again, or choose another --out")
            if os.environ.get("RANK", "0") == "0":  # one process removes; the others only check
                for name in entries:
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    return writable_dir(out)


def comparison_dir(out: Path, protected: dict[str, str | Path | None] | None = None) -> Path:
    """Make ``out`` the folder of a comparison (its runs and summaries; re-running reuses them): never a model
    folder, or a folder an input lies in or that lies in an input (``protected``, as in :func:`new_run_dir`)."""
    out = Path(out)
    _refuse_overlap(out, protected)
    if out.is_dir() and is_model_dir(out):
        raise ConfigError(f"--out {out} is a model folder; choose a new or empty folder")
    if out.is_dir() and (has_checkpoint(out) or any((out / f).is_file() for f in ("config.json", "results.json"))):
        raise ConfigError(f"--out {out} holds a run, not a comparison; choose a new or empty folder (or the "
                          "comparison's own)")
    others = sorted(e.name for e in out.iterdir() if e.is_file() and not e.name.startswith(".")
                    and e.name not in COMPARISON_FILES) if out.is_dir() else []
    if others:
        raise ConfigError(f"--out {out} holds files that are not a comparison's ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")
    return writable_dir(out)


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint to resume from (the newest or its fallback)."""
    return any((out / (CHECKPOINT_DIR + s) / "state.json").is_file() for s in ("", PREVIOUS_SUFFIX))


def saved_run_record(out: Path) -> tuple[dict | None, int | None]:
    """``(data identity, processes)`` the newest readable checkpoint of the run in ``out`` records: its training
    data's identity and the number of processes that trained it (None: no checkpoint, or one from before
    2026-12-07 that records neither)."""
    for suffix in ("", PREVIOUS_SUFFIX):
        try:
            state = json.loads((out / (CHECKPOINT_DIR + suffix) / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            return None, None
        data, processes = state.get("data"), state.get("processes")
        return (data if isinstance(data, dict) else None,
                processes if isinstance(processes, int) and not isinstance(processes, bool) else None)
    return None, None


def save_checkpoint(out: Path, acc, model: nn.Module, ema: nn.Module | None, optimizer, state: dict) -> None:
    """Replace ``out/checkpoint`` atomically: safetensors weights of ``model`` (and of the momentum ``ema``), the
    optimizer state by parameter name plus the torch RNG, and ``state`` as JSON. Main process only; every
    process waits here first."""
    import json

    import torch

    from .optim import optimizer_state_tensors

    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    if not finite_state(model):
        from .errors import DivergedError

        raise DivergedError(f"the weights are not finite at step {state.get('step')}; {out / CHECKPOINT_DIR} keeps "
                            "the last good checkpoint")
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        if ema is not None:
            save_tensors({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        opt = optimizer_state_tensors(optimizer, model)
        opt["__rng__"] = torch.get_rng_state()
        save_tensors(opt, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(strict_json(state), indent=2, allow_nan=False))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # (a full disk: what it took is given back)
        raise
    replace_dir(tmp, out / CHECKPOINT_DIR)


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, whose I/O failures (a full disk) are raised as the :class:`OSError` they are
    (safetensors raises its own error type, naming the OS error only in its text)."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def read_checkpoint(out: Path, total_steps: int | None, device, log=print, need_ema: bool = False,
                    processes: int | None = None, apply: Callable | None = None
                    ) -> tuple[dict, dict, dict | None, dict]:
    """``(state, model weights, ema weights or None, optimizer tensors)`` of the newest usable checkpoint in
    ``out``, with the torch RNG restored. ``apply(state, weights, ema, optimizer)`` loads them into the run: a
    checkpoint that does not fit it (a missing tensor, another shape: ``RuntimeError``, ``KeyError`` or
    ``ValueError``) counts as damaged. A damaged newest checkpoint falls back to the previous one (and says so);
    none usable, one made by another number of ``processes`` (its global batch), or for another number of steps
    (unless ``total_steps`` is None: a budget run's end moves), is a one-line :class:`ConfigError`."""
    from .errors import ConfigError

    problems = []
    for suffix in ("", PREVIOUS_SUFFIX):
        ck = out / (CHECKPOINT_DIR + suffix)
        if not ck.exists():
            continue
        try:
            found = _read_one(ck, device, need_ema)
        except _Damaged as e:
            problems.append(str(e))
            continue
        made_by = found[0].get("processes")  # (checkpoints before 2026-12-07 do not say)
        if processes is not None and made_by is not None and made_by != processes:
            raise ConfigError(f"this run was trained by {made_by} process{'es' * (made_by != 1)} and this launch "
                              f"has {processes}: resume it with {made_by}, as it started (the global batch, and so "
                              "the steps, follow from the count)")
        if total_steps is not None and found[0]["total_steps"] != total_steps:
            raise ConfigError(f"checkpoint was made for {found[0]['total_steps']} steps, this run has {total_steps}")
        found = (migrate_state(found[0]), *found[1:])
        rng = found[3].pop("__rng__")
        if apply is not None:
            try:
                apply(*found)
            except (RuntimeError, KeyError, ValueError) as e:
                if isinstance(e, AutoprogError):  # (the run's own refusal: other data, settings)
                    raise
                problems.append(f"{ck} does not fit this run ({' '.join(str(e).split())[:160]})")
                continue
        if problems:
            log(f"warning: {problems[0]}; resuming from the previous checkpoint {ck} instead")
        import torch

        torch.set_rng_state(rng)
        found[0]["checkpoint_dir"] = str(ck)
        return found
    if problems:
        raise ConfigError(f"no usable checkpoint in {out}: {'; '.join(problems)}")
    raise ConfigError(f"{out} has no checkpoint to resume from")


class _Damaged(Exception):
    pass


STATE_KEYS = ("step", "stage", "total_steps", "controller", "history", "stage_log")
RUN_STATE_FORMAT = "autoprog-run/2"  # the engine's checkpoint state; /1 (no "format" key) is migrated on reading


def migrate_state(state: dict) -> dict:
    """A checkpoint state of an older autoprog in the current format (``RUN_STATE_FORMAT``): before 2026-12-06
    each trainer wrote its own keys (the pre-training's epoch in progress, fine-tuning's loss since the last
    point, a list-shaped step-time cache)."""
    fmt = state.get("format", "autoprog-run/1")
    if fmt == RUN_STATE_FORMAT:
        return state
    if fmt != "autoprog-run/1":
        from .errors import ConfigError

        raise ConfigError(f"this checkpoint's state is {fmt!r}, newer than this autoprog reads ({RUN_STATE_FORMAT}); "
                          "update autoprog to resume it")
    state = dict(state, format=RUN_STATE_FORMAT)
    state.setdefault("lr_step", state["step"])
    state.setdefault("search_time_s", 0.0)
    state.setdefault("sec_per_flop", None)
    state["pending_point"] = state.pop("pending_epoch", None)
    state["in_segment"] = state.pop("in_epoch", None)
    if state.get("loss_n"):  # fine-tuning, checkpointed between evaluation points: every process read this back
        state["in_segment"] = {"start_step": state["step"], "time_s": 0.0, "step_times": [],
                               "shared": {"loss_sum": state.pop("loss_sum"), "loss_n": state.pop("loss_n")}}
    times = state.get("time_cache", {})
    if isinstance(times, list):  # [[resolution, blocks, seconds], ...]
        times = {f"{r}:{','.join(map(str, b))}": v for r, b, v in times}
    state["time_cache"] = times
    return state


def _read_one(ck: Path, device, need_ema: bool) -> tuple[dict, dict, dict | None, dict]:
    """One checkpoint directory, checked: parseable JSON with the state's keys, loadable safetensors, finite
    weights, the RNG state present."""

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load(name: str, required: bool = True, on=device):
        path = ck / name
        if not path.is_file():
            if required:
                raise _Damaged(f"{path} is missing")
            return None
        try:
            tensors = load_file(path, device="cpu" if torch.device(on).type == "cpu" else str(on))  # (not cpu:0)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise _Damaged(f"{path} cannot be read ({' '.join(str(e).split())[:120]})") from None
        if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
            raise _Damaged(f"{path} holds non-finite values")
        return tensors

    try:
        state = read_json_object(ck / "state.json", "checkpoint state")
        check_fields(state, {"step": int, "stage": int, "total_steps": int, "history": [dict], "stage_log": [dict]},
                     str(ck / "state.json"), required=STATE_KEYS)
    except ConfigError as e:
        raise _Damaged(str(e)) from None
    model, ema = load("model.safetensors"), load("ema.safetensors", required=need_ema)
    opt = load("optimizer.safetensors", on="cpu")
    rng = opt.get("__rng__")
    if rng is None or rng.dtype != torch.uint8:
        raise _Damaged(f"{ck / 'optimizer.safetensors'} lacks the RNG state")
    opt["__rng__"] = rng.cpu()
    return state, model, ema, opt


def finite_state(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite."""
    import torch

    return all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


def strict_json(obj):
    """``obj`` with every non-finite float replaced by None, so ``json.dumps(..., allow_nan=False)`` holds."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN/Infinity), written atomically."""
    import json

    atomic_write(path, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")
