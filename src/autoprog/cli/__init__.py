"""``autoprog`` command line: ``pretrain`` one run, ``compare`` several methods side by side, ``finetune``
a diffusion model, ``sample`` from one, list the ``presets``.

``--task`` picks the task of ``pretrain`` (classification: a ViT; diffusion: a base DiT) and of ``compare``
(classification: growth schedules; finetune: fine-tuning methods); it must be given on the command line.
Every option has a default; ``autoprog compare`` with no arguments runs the built-in default
comparison on Fashion-MNIST. Options can also come from a YAML file (``--config``) whose keys are the
option names with ``_`` for ``-``; options given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import errno
import sys

from ..accelerator import end_processes, launch_env, leave_process, make_accelerator
from ..errors import (
    AutoprogError,
    ConfigError,
    DataError,
    DivergedError,
    Interrupted,
    first_line,
    forget_warnings,
    launch_note,
    one_line,
    out_of_memory,
)
from .common import Parser, add_front_flag, add_out_flags, given_dests, positive_int
from .config import check_preset_fits, command_task, list_presets, load_preset, options_argv, read_options

TASKS = {"pretrain": ("classification", "diffusion", "text-to-image"),
         "compare": ("classification", "finetune", "text-to-image", "dreambooth", "transfer"),
         "finetune": ("class-conditional", "text-to-image", "dreambooth", "classification")}


def _task_flag(p: argparse.ArgumentParser, command: str) -> None:
    first, *others = TASKS[command]
    p.add_argument("--task", choices=TASKS[command], default=first,
                   help=f"{first} (default), {' or '.join(others)}; each task has options of its own: see "
                        f"'autoprog {command} --task TASK --help' (e.g. --task {others[0]})")


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``task`` selects the option set of ``pretrain``/``compare`` (see the module docstring)."""
    from . import diffusion as cli_diffusion

    parser = Parser(
        prog="autoprog",
        description="Automated progressive learning: train vision transformers faster by growing them "
                    "(patches and depth) during training, and fine-tune diffusion models faster by "
                    "unfreezing them progressively.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub, task)
    _add_compare(sub, task)
    _add_finetune(sub, task)
    cli_diffusion.add_sample_parser(sub)
    _add_token_labels(sub)
    sub.add_parser("presets", help="list the shipped option presets (use one with --preset NAME)",
                   description="List the YAML option presets shipped with autoprog: the paper's settings and our "
                               "CPU defaults. A preset's values come first; --config and flags win over them.")
    if task is not None:  # a mistake's hint names the options it was parsed with
        for name, command in sub.choices.items():
            if any("--task" in a.option_strings for a in command._actions):
                command.help_command = f"autoprog {name} --task {task} --help"
    return parser


def _add_token_labels(sub) -> None:
    t = sub.add_parser("token-labels", help="write a teacher's score maps for token labeling (--token-labels)",
                       description="Run a trained classifier over every training image of an ImageFolder and write "
                                   "its class logits at each place of its token grid (the top k, with their class "
                                   "indices), OUT/<class>/<stem>.pt, the format --token-labels reads (the "
                                   "TokenLabeling repository's). Each image is resized whole to the teacher's "
                                   "resolution. Maps already in OUT are kept: run it again to continue.")
    t.add_argument("--teacher", required=True, help="the classifier: a run folder or its model/ folder, a timm "
                                                    "checkpoint folder, or a weights file with --model timm:NAME; a "
                                                    "ViT/DeiT (its head on each patch token) or a VOLO (its "
                                                    "auxiliary head)")
    t.add_argument("--model", default="vit", help="timm:NAME for a bare weights file")
    t.add_argument("--dataset", required=True, help="the ImageFolder dataset (its train/ images are labelled)")
    t.add_argument("--out", required=True, help="the folder of score maps to write")
    t.add_argument("--top-k", type=positive_int, help="classes kept per place (default: 5, the official maps', or "
                                                      "every class when there are fewer)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    t.add_argument("--workers", type=int, default=None, help="loader workers (default: this machine's cores less "
                                                             "one, at most 8)")
    t.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")


def _run_token_labels(args, acc) -> None:
    from ..classification.score_maps import check_maps_out, generate_score_maps, load_teacher
    from ..data import default_workers

    if acc.num_processes > 1:
        raise ConfigError("token-labels runs in one process: start it without torchrun/accelerate launch")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be at least 0, got {args.workers}")
    check_maps_out(args.dataset, args.out)
    teacher = load_teacher(args.teacher, args.model)
    done = generate_score_maps(teacher, args.dataset, args.out, top_k=args.top_k, batch_size=args.batch_size,
                               workers=default_workers() if args.workers is None else args.workers,
                               device=acc.device, progress=lambda m: print(m, end="\r", flush=True))
    grid = f" of {done['grid'][0]} x {done['grid'][1]} places" if done["grid"] else ""
    print(f"\nwrote {done['written']} score maps{grid} ({done['kept']} already there), top {done['top_k']} classes, "
          f"in {args.out}")


def _add_pretrain(sub, task: str | None) -> None:
    from . import classification as cli_classification
    from . import diffusion as cli_diffusion

    if task in ("diffusion", "text-to-image"):
        text = task == "text-to-image"
        p = sub.add_parser("pretrain", help="train one model",
                           description=("Train a base text-to-image model (a small UNet2DConditionModel and CLIP text "
                                        "encoder) from scratch on captions made from class names (default: "
                                        "Fashion-MNIST classes 0-4, 'a photo of a t-shirt', ...), to fine-tune "
                                        "later. Writes OUT/model (a pipeline directory: unet/, text_encoder/, "
                                        "tokenizer/, scheduler/)" if text else
                                        "Train a base class-conditional DiT from scratch (default: Fashion-MNIST "
                                        "classes 0-4), to fine-tune later. Writes OUT/model (config.json + "
                                        "safetensors)") + ", OUT/results.json and a resumable checkpoint.")
        _task_flag(p, "pretrain")
        add_out_flags(p)
        cli_diffusion.add_base_options(p, text)
    else:
        p = sub.add_parser("pretrain", help="train one model with a growth schedule (--task diffusion: a base DiT)",
                           description="Pre-train a ViT with a growth schedule. Writes OUT/results.json, "
                                       "OUT/schedule.json and a resumable checkpoint in OUT/checkpoint/.")
        _task_flag(p, "pretrain")
        cli_classification.add_pretrain_options(p)


def _add_compare(sub, task: str | None) -> None:
    from . import classification as cli_classification
    from . import diffusion as cli_diffusion

    if task in ("finetune", "text-to-image", "dreambooth"):
        from ..diffusion.runner import DEFAULT_COMPARE

        c = sub.add_parser("compare", help="train several methods side by side",
                           description="Fine-tune the base model with each method (same data, seed and steps), "
                                       "plus full@budget: full fine-tuning stopped at the wall-clock of the fastest "
                                       "progressive method with its learning rate decayed by then. Writes "
                                       "OUT/summary.json, summary.md (Table 6 style), fd_curves.png (Fig. 8 style) "
                                       "and samples.png. Re-running with the same --out reuses finished runs.")
        _task_flag(c, "compare")
        c.add_argument("--methods", default=",".join(DEFAULT_COMPARE),
                       help=f"comma-separated methods; full is required (default: {','.join(DEFAULT_COMPARE)})")
        out = {"finetune": "runs/finetune"}.get(task, f"runs/{task}")  # (each task its own: they never collide)
        c.add_argument("--out", default=out, help=f"output directory (default: {out})")
        c.add_argument("--no-budget-baseline", action="store_true", help="skip the full@budget run")
        c.add_argument("--seeds", help="comma-separated seeds: one comparison per seed in OUT/seed<N>, mean ± std "
                                      "in OUT/summary.json and summary.md (overrides --seed)")
        add_front_flag(c, "full")
        cli_diffusion.add_finetune_options(c, single=False, task=task)
    elif task == "transfer":
        c = sub.add_parser("compare", help="train several methods side by side",
                           description="Fine-tune a pre-trained classifier with each method (full, prog and "
                                       "autoprog-zero unfreezing; same data, seed and steps), plus full@budget and "
                                       "full's front; write OUT/summary.json, summary.md, curves.png and "
                                       "front.png. Default: the shipped Fashion-MNIST ViT to scikit-learn digits. "
                                       "Re-running with the same --out reuses finished runs.")
        _task_flag(c, "compare")
        cli_classification.add_compare_options(c, transfer=True)
    else:
        c = sub.add_parser("compare", help="train several methods side by side (--task finetune: fine-tuning methods)",
                           description="Train each method with the same seed, data and settings; write "
                                       "OUT/summary.json, OUT/summary.md and OUT/curves.png. With no arguments: the "
                                       "built-in default comparison on Fashion-MNIST. Re-running with the same "
                                       "--out reuses finished runs and resumes unfinished ones.")
        _task_flag(c, "compare")
        cli_classification.add_compare_options(c)


def _add_finetune(sub, task: str | None) -> None:
    from . import classification as cli_classification
    from . import diffusion as cli_diffusion

    if task == "classification":
        f = sub.add_parser("finetune", help="fine-tune a model with one method",
                           description="Fine-tune a pre-trained classifier on another dataset (Table 4's transfer; "
                                       "default: the shipped built-in ViT pre-trained on Fashion-MNIST, to "
                                       "scikit-learn digits): full, or unfreezing it progressively (prog, "
                                       "autoprog-zero). Writes OUT/model, OUT/results.json, OUT/schedule.json and a "
                                       "resumable checkpoint.")
        _task_flag(f, "finetune")
        cli_classification.add_transfer_options(f)
        return

    f = sub.add_parser("finetune", help="fine-tune a diffusion model (--task classification: a classifier) with one method",
                       description=("Fine-tune a text-to-image model (a Stable Diffusion pipeline directory; default: "
                                    "the shipped UNet pre-trained on captioned Fashion-MNIST classes 0-4, to the "
                                    "captions of classes 5-9)" if task == "text-to-image" else
                                    "DreamBooth: teach a text-to-image model (a Stable Diffusion pipeline directory; "
                                    "default: the shipped UNet pre-trained on captioned Fashion-MNIST classes 0-4) "
                                    "one subject from a few images (--instance-dir; default: 5 near-identical dresses "
                                    "it never saw) and an instance prompt ('a photo of sks dress'); "
                                    "--with-prior-preservation also trains on class images the base generates once" if
                                    task == "dreambooth" else
                                    "Fine-tune a pre-trained class-conditional DiT (default: the shipped base model, "
                                    "to Fashion-MNIST classes 5-9)") +
                                   ". Writes OUT/model, OUT/results.json (FD curve, search tables), "
                                   "OUT/schedule.json and a resumable checkpoint.")
    _task_flag(f, "finetune")
    add_out_flags(f)
    cli_diffusion.add_finetune_options(f, single=True, task=task)


def task_of(argv: list[str]) -> str | None:
    """The ``--task`` value on the command line, if any (it chooses which options the command has); given twice,
    the last, as for every other option."""
    task = None
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            task = argv[i + 1]
        elif a.startswith("--task="):
            task = a.split("=", 1)[1]
    return task


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a preset's values come first, then a --config file's, then the flags given (they win)."""
    args = parser.parse_args(argv)
    args.given = [a.split("=", 1)[0] for a in argv if a.startswith("--")]  # the flags typed, for --resume's check
    if args.command is not None:
        args.given_dests = given_dests(parser._subparsers._group_actions[0].choices[args.command], args.given)
    if args.command is None or (getattr(args, "preset", None) is None and getattr(args, "config", None) is None):
        return args
    sub = parser._subparsers._group_actions[0].choices[args.command]
    front = []
    if args.preset is not None:
        preset = load_preset(args.preset)
        check_preset_fits(preset, args.command, command_task(args))
        front += options_argv(sub, preset["options"], f"preset {args.preset}")
    if args.config is not None:
        front += options_argv(sub, read_options(args.config, args.command, command_task(args)),
                              f"--config {args.config}")
    given, dests = args.given, args.given_dests
    args = parser.parse_args([args.command, *front, *argv[argv.index(args.command) + 1:]])
    args.given, args.given_dests = given, dests
    return args


def _run(args, acc) -> int:
    from . import diffusion as cli_diffusion
    from .classification import run_classification

    if args.command == "sample":
        cli_diffusion.run_sample(args, acc)
        return 0
    if args.command == "token-labels":
        _run_token_labels(args, acc)
        return 0
    if args.command == "presets":
        for name, commands, description in list_presets():
            print(f"{name}\n    for: {commands}\n    {description}")
        return 0
    from .classification import is_transfer

    if not is_transfer(args) and (args.command == "finetune"
                                  or getattr(args, "task", "classification") != "classification"):
        cli_diffusion.run_diffusion(args, acc)
        return 0
    run_classification(args, acc)
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's stop, `kill`): the same clean stop as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else argv
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)  # a caller's own handler comes back (autoprog inside a program)


def entry() -> None:
    """The ``autoprog`` program: :func:`main`, then exit with its code; a Ctrl-C or SIGTERM while the process
    winds down (after the results are written) no longer kills it by the signal."""
    import signal

    try:
        code = main()
    except KeyboardInterrupt:  # between main's own handlers and here: everything was written
        print("autoprog: interrupted after the command had finished; results complete", file=sys.stderr)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        launched = launch_env()[0] > 1
    except AutoprogError:  # (already said by main)
        launched = False
    if launched:
        leave_process(code)
    sys.exit(code)


WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # (a full disk, a read-only one)


def _run_folder(args) -> str | None:
    """The run a ``pretrain``/``finetune`` command (or any ``--resume``) trains in; None for the others."""
    return getattr(args, "resume", None) or (getattr(args, "out", None) if getattr(args, "command", None) in
                                             ("pretrain", "finetune") else None)


def _write_failed(args) -> str:
    """What a failed write (a full or read-only disk) leaves, and how to go on."""
    from pathlib import Path

    from ..checkpoint import has_checkpoint

    run = _run_folder(args)
    if run is not None and has_checkpoint(Path(run)):
        return (f"the last checkpoint in {run} is kept: free space (or copy the run to a writable disk), then "
                f"continue with --resume {run}{launch_note(launch_env()[0])}")
    if getattr(args, "command", None) == "compare":
        return "free space, then run the same command again: finished runs are reused"
    return "free space (or choose a writable --out) and start again"


def _interrupted(args) -> str:
    """What a Ctrl-C outside a training step (loading, building, evaluating, writing) leaves, truthfully."""
    from pathlib import Path

    from ..checkpoint import has_checkpoint
    from ..formats import read_json_object

    run = _run_folder(args)
    if run is None:
        return "interrupted (re-run the same command to continue: finished runs are reused)" \
            if args.command == "compare" else "interrupted"
    try:
        done = read_json_object(Path(run) / "results.json").get("done") is True
    except AutoprogError:  # none yet, or cut
        done = False
    if done:
        return f"interrupted after the run had finished; results complete in {run}"
    if has_checkpoint(Path(run)):
        return f"interrupted; the last checkpoint in {run} is kept (continue with --resume {run}" \
               f"{launch_note(launch_env()[0])})"
    return f"interrupted before the first checkpoint; nothing to resume in {run} (start the run again)"


def _main(argv: list[str]) -> int:
    forget_warnings()  # (a settings warning is said once per command)
    args = None
    try:
        parser = build_parser(task_of(argv))  # imports torch and the tasks: a Ctrl-C here is a clean stop too
        args = _parse(parser, argv)
        if args.command is None:
            parser.print_help()
            return 2
        acc = make_accelerator(getattr(args, "mixed_precision", "auto"), getattr(args, "cpu", False),
                               getattr(args, "log_with", None), getattr(args, "rendezvous_timeout", 120))
        succeeded = False
        try:
            code = _run(args, acc)
            succeeded = True
            return code
        except DivergedError:  # decided on every process alike: all of them are here
            succeeded = True
            raise
        finally:
            end_processes(acc, succeeded)  # a gloo group left to interpreter shutdown can abort a finished run
    except DivergedError as e:  # decided on every process alike
        _say(f"error: {one_line(e)}")
        return 3
    except DataError as e:  # a file of one process's share of the data
        _say(f"error: {one_line(e)}", every_process=True)
        return 2
    except AutoprogError as e:
        _say(f"error: {one_line(e)}")
        return 2
    except Interrupted as e:
        _say(e.advice(getattr(args, "command", None)))
        return 130
    except KeyboardInterrupt:
        _say(_interrupted(args) if args is not None and args.command is not None else "interrupted")
        return 130
    except OSError as e:
        if e.errno not in WRITE_FAILURES:
            raise
        _say(f"error: cannot write {e.filename or 'a file'}: {e.strerror}; {_write_failed(args)}")
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        _say(f"error: out of memory ({first_line(e)[:160]}): lower --batch-size or the image size; a run's last "
             "checkpoint is kept", every_process=True)
        return 2


def _say(message: str, every_process: bool = False) -> None:
    """``autoprog: message`` on stderr, once per launch: processes other than the first stay silent (they meet
    the same settings error, or stop because the first did), unless ``every_process`` (what may happen to one
    process only: a bad image in its share of the data, its device's memory), when they name themselves. All
    speak when the launch itself is broken."""
    try:
        _, rank = launch_env()
    except AutoprogError:
        rank = 0
    if rank == 0:
        print(f"autoprog: {message}", file=sys.stderr)
    elif every_process:
        print(f"autoprog: process {rank}: {message}", file=sys.stderr)

