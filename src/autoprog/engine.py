"""Mechanics both trainers share: DDP re-wrapping, broadcasting a decision, the calls controllers make on a
trainer, atomic file and directory writes."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
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


class RunTemplate:
    """The run template both trainers share: ``fit`` (resume, stop requests, divergence), and what a schedule
    controller may call on either trainer besides its own methods (broadcast a decision, log a stage record,
    print once). Needs ``acc`` (an Accelerator), ``step`` and ``stage_log``."""

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        return broadcast(self.acc, obj)

    def log_stage(self, info: dict) -> None:
        self.stage_log.append({"step": self.step, **info})

    def print(self, *args) -> None:
        self.acc.print(*args)

    def fit(self, resume: bool = False) -> dict:
        """Train to the end (or to the stop asked for); returns the results also in ``results.json``. A diverged
        run stops with :class:`~autoprog.errors.DivergedError`; its results say so and the last good checkpoint
        stays. Trainers implement ``_fit``, ``_load_checkpoint`` and ``_write_results(done=...)``."""
        from .errors import DivergedError

        try:
            with StopRequest() as self._stop:
                if resume:
                    self._load_checkpoint()
                else:
                    self.out.mkdir(parents=True, exist_ok=True)
                res = self._fit()
                if self._stop.requested:  # asked after the last step (evaluation, export): the run is complete
                    from .errors import Interrupted

                    raise Interrupted(f"interrupted; the run in {self.out} had finished training and is complete")
                return res
        except DivergedError as e:
            self._release()
            raise DivergedError(diverged_note(self, e, lambda: self._write_results(done=False))) from None

    _stop: StopRequest | None = None
    _stop_agreed = False  # set by a training step: every process saw a stop request (see StopRequest)

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.requested

    def _interrupt(self) -> None:
        """A stop was agreed after a finished step: checkpoint it (trainers' ``_checkpoint_now``) and stop."""
        from .errors import Interrupted

        self._checkpoint_now()
        self._release()
        raise Interrupted(f"interrupted at step {self.step}; {self.out / CHECKPOINT_DIR} holds that step "
                          f"(continue with --resume {self.out})")

    prepared_names = ("model", "net")  # attribute names of the Accelerate-prepared model and the model itself

    # ------------------------------------------------------------------ the training clock's measurements
    _instrument_time = 0.0  # seconds inside the running training clock that were measurement, not training

    def _clock_running(self) -> bool:
        """Whether the training clock runs now (each trainer says)."""
        raise NotImplementedError

    @contextmanager
    def measuring(self):
        """What runs inside is measurement (FLOP counts, budget mode's timings), not training: the training clock
        leaves it out."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._clock_running():
                self._instrument_time += time.perf_counter() - t0

    @contextmanager
    def counted_as_search(self):
        """Measurement inside (a search's FLOP counting under ``time_source="flops"``) is the search's time, which
        stays inside the run's runtime."""
        before = self._instrument_time
        try:
            yield
        finally:
            self._instrument_time = before

    def _release(self) -> None:
        """Forget the prepared model: a comparison's later runs must not keep it alive."""
        wrapped, module = (getattr(self, n) for n in self.prepared_names)
        release(self.acc, wrapped, module)


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


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint to resume from (the newest or its fallback)."""
    return any((out / (CHECKPOINT_DIR + s) / "state.json").is_file() for s in ("", PREVIOUS_SUFFIX))


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
    if not finite_state(model):
        from .errors import DivergedError

        raise DivergedError(f"the weights are not finite at step {state.get('step')}; {out / CHECKPOINT_DIR} keeps "
                            "the last good checkpoint")
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    opt = optimizer_state_tensors(optimizer, model)
    opt["__rng__"] = torch.get_rng_state()
    save_file(opt, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(strict_json(state), indent=2, allow_nan=False))
    replace_dir(tmp, out / CHECKPOINT_DIR)


def read_checkpoint(out: Path, total_steps: int | None, device, log=print, need_ema: bool = False
                    ) -> tuple[dict, dict, dict | None, dict]:
    """``(state, model weights, ema weights or None, optimizer tensors)`` of the newest usable checkpoint in
    ``out``, with the torch RNG restored. A damaged newest checkpoint falls back to the previous one (and says
    so); none usable, or one made for another number of steps (unless ``total_steps`` is None: a budget run's
    end moves), is a one-line :class:`ConfigError`."""
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
        if total_steps is not None and found[0]["total_steps"] != total_steps:
            raise ConfigError(f"checkpoint was made for {found[0]['total_steps']} steps, this run has {total_steps}")
        if problems:
            log(f"warning: {problems[0]}; resuming from the previous checkpoint {ck} instead")
        import torch

        torch.set_rng_state(found[3].pop("__rng__"))
        found[0]["checkpoint_dir"] = str(ck)
        return found
    if problems:
        raise ConfigError(f"no usable checkpoint in {out}: {'; '.join(problems)}")
    raise ConfigError(f"{out} has no checkpoint to resume from")


class _Damaged(Exception):
    pass


STATE_KEYS = ("step", "stage", "total_steps", "controller", "history", "stage_log")


def _read_one(ck: Path, device, need_ema: bool) -> tuple[dict, dict, dict | None, dict]:
    """One checkpoint directory, checked: parseable JSON with the state's keys, loadable safetensors, finite
    weights, the RNG state present."""
    import json

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
            tensors = load_file(path, device=str(on))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise _Damaged(f"{path} cannot be read ({' '.join(str(e).split())[:120]})") from None
        if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
            raise _Damaged(f"{path} holds non-finite values")
        return tensors

    try:
        state = json.loads((ck / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damaged(f"{ck / 'state.json'} cannot be read ({' '.join(str(e).split())[:120]})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise _Damaged(f"{ck / 'state.json'} lacks {', '.join(missing)}")
    model, ema = load("model.safetensors"), load("ema.safetensors", required=need_ema)
    opt = load("optimizer.safetensors", on="cpu")
    rng = opt.get("__rng__")
    if rng is None or rng.dtype != torch.uint8:
        raise _Damaged(f"{ck / 'optimizer.safetensors'} lacks the RNG state")
    opt["__rng__"] = rng.cpu()
    return state, model, ema, opt


def check_step(acc, loss, grad_norm, step: int, stop: bool = False) -> bool:
    """Raise :class:`DivergedError` when step ``step``'s loss (summed over processes, so every process agrees)
    or gradient norm is not finite: called before the optimizer applies the step. Returns whether any process
    asked to ``stop`` (see :class:`StopRequest`), agreed in the same reduction so all stop at one step."""
    import math

    import torch

    from .errors import DivergedError

    if acc.num_processes > 1:
        both = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)])
        total, stops = acc.reduce(both, reduction="sum").unbind()
        stop = bool(stops > 0)
    else:
        total = loss.detach()
    for name, value in (("loss", total), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(float(torch.as_tensor(value).float())):
            raise DivergedError(f"training diverged at step {step}: the {name} is {float(value)}")
    return stop


class StopRequest:
    """While active (``with``), the first Ctrl-C or SIGTERM only asks training to stop: the trainer finishes the
    step, checkpoints it and raises :class:`~autoprog.errors.Interrupted`. A second one stops at once (the last
    checkpoint is kept). Outside the main thread it does nothing (signals are delivered there)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:  # a forked data-loader worker: its parent decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if os.environ.get("RANK", "0") == "0":  # os.write: safe even inside another print
            os.write(2, b"autoprog: stopping after this step (checkpointing it); press Ctrl-C again to stop at once\n")

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a launcher that ignores it (`cmd &`) is obeyed
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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


def diverged_note(trainer, error: Exception, write_results) -> str:
    """Record a divergence on ``trainer`` (``results.json`` gets ``diverged``, ``done`` stays false) and say where
    the last good checkpoint is."""
    import json

    trainer.diverged = str(error)
    write_results()
    state = trainer.out / CHECKPOINT_DIR / "state.json"
    if state.is_file():
        step = json.loads(state.read_text()).get("step")
        where = f"{state.parent} keeps the last good checkpoint (step {step})"
    else:
        where = "no checkpoint had been written yet"
    return f"{error}; {where}. Lower --lr (or raise the warm-up, or clip gradients) and start again"
