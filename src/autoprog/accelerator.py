"""The Accelerator a run uses: the CLI's (:func:`make_accelerator`), and a library call's when it is given none
(:func:`default_accelerator`, the same defaults): bf16 on a GPU that runs it natively, TF32, the launcher's
process group checked and its communicator formed at once."""

from __future__ import annotations

import os

from .errors import ConfigError, first_line

LIBRARY_RENDEZVOUS_S = 600  # a library call's processes may reach their first collective minutes apart


def default_accelerator():
    """The Accelerator of a library call given none. An Accelerate state this process already holds (an
    ``Accelerator`` or ``PartialState`` the caller built) is followed, as ``Accelerator()`` would; otherwise the
    CLI's defaults (:func:`make_accelerator`), with the precision and device ``accelerate launch`` set, if any
    (``ACCELERATE_MIXED_PRECISION``: its ``--mixed_precision``, ``no`` when not given; ``ACCELERATE_USE_CPU``),
    else ``auto``. Processes wait up to :data:`LIBRARY_RENDEZVOUS_S` for each other to join."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state or PartialState._shared_state:
        return Accelerator()
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return make_accelerator(os.environ.get("ACCELERATE_MIXED_PRECISION") or "auto", cpu=cpu,
                            rendezvous_timeout=LIBRARY_RENDEZVOUS_S)


def end_processes(acc, succeeded: bool = True) -> None:
    """Tear a multi-process run's group down before the interpreter exits (call it last, on every process).

    After a successful run every process first waits for the others: a gloo group destroyed while a peer still
    works, with DDP wrappers alive, aborted about one two-process run in twenty at exit ("terminate called without
    an active exception", exit code -6, after every file was written). After a failure there is no wait (the
    others may never arrive); the group is still destroyed."""
    if acc.num_processes > 1:
        try:
            if succeeded:
                acc.wait_for_everyone()
        finally:
            acc.end_training()


def leave_process(code: int = 0) -> None:
    """Exit a launched process at once, its output flushed, skipping the interpreter's shutdown; call it after
    :func:`end_processes`, once every result is written. DDP's reducers keep a destroyed group's gloo threads
    alive, and destroying them in the shutdown aborted finished processes ("terminate called without an active
    exception", SIGABRT): about 1 two-process launch in 20 without the final wait, about 1 in 200 with it, none in
    100 leaving this way."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def resolve_precision(requested: str, cpu: bool) -> str:
    """``--mixed-precision auto``: bf16 where the CUDA device this process will run on supports it natively
    (compute capability 8 or more: Ampere, Hopper, ...; pre-Ampere cards would emulate it slowly), else no. The
    device is read by its properties: nothing is allocated on it before the process takes its own GPU."""
    if requested != "auto":
        return requested
    import torch

    if cpu or not torch.cuda.is_available():
        return "no"
    if torch.version.hip:
        return "bf16"
    try:  # (a stray or invalid LOCAL_RANK outside a launcher means nothing: launch_env says so)
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    except ValueError:
        local = 0
    index = local % torch.cuda.device_count() if local >= 0 else 0  # the GPU Accelerate will give this process
    return "bf16" if torch.cuda.get_device_capability(index)[0] >= 8 else "no"


def launch_env() -> tuple[int, int]:
    """``(WORLD_SIZE, RANK)`` set by a launcher (1, 0 without one); a value that is not a valid count or rank is a
    one-line error."""
    values = {}
    if os.environ.get("WORLD_SIZE", "1").strip() == "1":  # one process: a stray RANK or LOCAL_RANK=-1 means nothing
        return 1, 0
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"the environment's {name}={text!r} is not an integer (set by torchrun or "
                              "accelerate launch; unset it to run one process)") from None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or not 0 <= rank < world or values["LOCAL_RANK"] < 0:
        raise ConfigError(f"the environment's WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={values['LOCAL_RANK']} "
                          "do not describe a process of a group")
    return world, rank


def _failed_to_join(error: BaseException) -> bool:
    """Whether ``error`` is torch's report that a process group could not be formed (a store that was not
    reached, or not every process arriving in time)."""
    names = {type(error).__name__} | {c.__name__ for c in type(error).__mro__}
    return bool(names & {"DistNetworkError", "DistStoreError", "DistError"}) or "timed out" in str(error).lower()


def _while_listening(fn):
    """``fn()`` in a helper thread, so that Ctrl-C (heard by the main thread only) stops a wait that blocks in
    C++ (joining a process group)."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


# A command's DDP wrappers: gradients as views of the all-reduce buckets (no second gradient-sized buffer per
# wrapper, no copy into it at every step; a search keeps a wrapper per candidate's trainable set), and no broadcast
# of buffers before every forward (autoprog's models' buffers never change in training: position ids, the stage
# identifier's lookup table, which every process sets alike). A library caller's own Accelerator keeps its settings.
DDP_SETTINGS = {"gradient_as_bucket_view": True, "broadcast_buffers": False}


def make_accelerator(mixed_precision: str = "auto", cpu: bool = False, log_with: str | None = None,
                     rendezvous_timeout: float = 120):
    """The Accelerator of a command. Launched by torchrun on a machine without GPUs, the processes join one gloo
    group by themselves (Accelerate picks multi-CPU only when told ``cpu=True``); processes that still do not
    form the group their launcher announced are refused, never run as independent copies. A process waits
    ``rendezvous_timeout`` seconds for the others to join (Ctrl-C stops the wait); collectives then wait up to 30
    minutes."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world, rank = launch_env()
    cpu = cpu or (world > 1 and not torch.cuda.is_available())
    from .tracking import parse_log_with

    trackers = parse_log_with(log_with)
    project = None
    if trackers:  # TensorBoard wants a folder now; every run sets its own (OUT/logs) when it starts
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(project_dir=".", logging_dir="logs")
    def accelerator():
        return Accelerator(mixed_precision=resolve_precision(mixed_precision, cpu), cpu=cpu, log_with=trackers or None,
                           project_config=project,
                           kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=rendezvous_timeout)),
                                            DistributedDataParallelKwargs(**DDP_SETTINGS)])

    if world == 1:
        acc = accelerator()
    else:
        try:
            acc = _while_listening(accelerator)
        except RuntimeError as e:
            if not _failed_to_join(e):
                raise
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise ConfigError(f"process {rank} of {world} could not join its group at {where} within "
                              f"{rendezvous_timeout:g} s ({first_line(e)[:120]}); start all {world} processes, or "
                              "raise the rendezvous timeout (--rendezvous-timeout)") from None
        if acc.device.type == "cuda":  # the current device is per thread: the group was joined in another one
            torch.cuda.set_device(acc.device)
        # NCCL forms its communicator at the first collective, every process but the first fetching its id through
        # the store under the rendezvous timeout: form it now, while every process is here, not after the main
        # process's first solo work (a feature classifier, class images), which may take longer
        acc.wait_for_everyone()
        if torch.distributed.is_initialized():  # (set_timeout is torch 2.14's name; before it, _set_pg_timeout)
            set_timeout = getattr(torch.distributed, "set_timeout", None) or getattr(
                torch.distributed.distributed_c10d, "_set_pg_timeout", None)
            if set_timeout is not None:
                set_timeout(timedelta(minutes=30))
    if acc.device.type == "cuda":  # TF32 matrix products for whatever runs in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if acc.num_processes != world:
        raise ConfigError(f"the launcher started {world} processes but they formed a group of {acc.num_processes}; "
                          "refusing to run them as independent copies writing to one --out")
    return acc
