"""Pieces every ``autoprog`` command shares: the parser class, argument types, seed lists."""

from __future__ import annotations

import argparse

from ..errors import ConfigError, launch_note
from ..experiment import check_seeds
from ..optim import SEED_MAX, SEED_MIN
from ..options import parse_number


def positive_int(s: str) -> int:
    v = parse_number(int, s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def seconds(s: str) -> int:
    """A wait in whole seconds: 1 to 10^6 (11.6 days)."""
    v = positive_int(s)
    if v > 10 ** 6:
        raise argparse.ArgumentTypeError(f"must be at most 1000000 seconds, got {s}")
    return v


class Parser(argparse.ArgumentParser):
    """argparse, but mistakes give the one-line ``autoprog: error: ...`` (exit 2) of every other error."""

    help_command: str | None = None  # the help a mistake points to (default: PROG --help)

    def error(self, message: str):
        self.exit(2, f"autoprog: error: {message} (see '{self.help_command or self.prog + ' --help'}')\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but words no option takes are reported by the command they were given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, "command", None)
            chosen = self._subparsers._group_actions[0].choices.get(command) if self._subparsers and command else None
            (chosen or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def given_dests(parser: argparse.ArgumentParser, flags: list[str]) -> dict[str, str]:
    """Flag typed → the option it sets (its argparse ``dest``), abbreviations resolved as argparse does."""
    strings = parser._option_string_actions
    out = {}
    for flag in flags:
        matches = [s for s in strings if s == flag] or [s for s in strings if s.startswith(flag)]
        if len(matches) == 1:
            out[matches[0]] = strings[matches[0]].dest
    return out


def refuse_unused(args, task: str, users: dict, baseline: str) -> None:
    """A flag typed on the command line that the command's methods do not read (``users``: see
    :func:`autoprog.methods.unused_options`) is a one-line error; a --config file or preset may set it. The methods
    are ``--method``'s (nothing is checked on ``--resume``, which takes no options), or a comparison's
    ``baseline`` and ``--methods``."""
    from ..methods import get_method, method_names, unused_options

    if args.command == "compare":
        methods = list(dict.fromkeys([baseline, *compare_methods(args)]))
    elif args.resume:
        return
    else:
        methods = [args.method]
    given = getattr(args, "given_dests", {})
    unused = unused_options(given.values(), [get_method(m, task) for m in methods], users)
    if unused:
        flag = next(f for f, d in given.items() if d == unused[0])
        readers = [m for m in method_names(task) if users[unused[0].rsplit(".", 1)[-1]](get_method(m, task))]
        which = f"--method {methods[0]} does not" if len(methods) == 1 else f"none of --methods {','.join(methods)}"
        raise ConfigError(f"{flag} is read only by {', '.join(readers)}; {which} read{'s' * (len(methods) > 1)} it "
                          f"(drop {flag})")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` → ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    bad = [s for s in seeds if not SEED_MIN <= s <= SEED_MAX]
    if bad:
        raise ConfigError(f"--seeds must be 32-bit integers (-2^31 to 2^32-1), got {bad[0]}")
    return check_seeds(seeds)


def seed(text: str) -> int:
    """A ``--seed`` value: a 32-bit integer (-2^31 to 2^32-1)."""
    v = parse_number(int, text)
    if not SEED_MIN <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a 32-bit integer (-2^31 to 2^32-1), got {text}")
    return v


def add_run_flags(g, command: str) -> None:
    """Flags of every training command that are not part of a spec: devices, precision, option files."""
    g.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="mixed precision through Accelerate: auto (default) is bf16 on a CUDA device that runs it "
                        "natively (Ampere or later) and no (fp32) elsewhere; on CUDA, fp32 matrix products use TF32")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--log-with", metavar="TRACKERS",
                   help="experiment trackers through Accelerate, comma-separated: tensorboard (files under "
                        "OUT/logs), wandb (WANDB_MODE=offline keeps it local), mlflow, trackio, comet_ml, aim, "
                        "clearml, dvclive or swanlab, each installed by you; they get the training loss, learning "
                        "rate, stage and images/s every 50 steps, every evaluation and each stage's search")
    g.add_argument("--rendezvous-timeout", type=seconds, default=120, metavar="SECONDS",
                   help="under torchrun / accelerate launch: how long a process waits for the others to join its "
                        "group before it stops with an error (default: 120); once joined, collective operations "
                        "wait up to 30 minutes")
    g.add_argument("--config", help="YAML file of option values (keys: option names with '_')")
    g.add_argument("--preset", help="a shipped YAML preset of option values ('autoprog presets' lists them); "
                                    "--config and flags win over it")


def add_out_flags(p) -> None:
    """Where one run goes: ``--out`` (a new or empty folder), ``--resume``, ``--overwrite``."""
    p.add_argument("--out", help="output directory (required unless --resume): a new or empty folder, never a model "
                                 "folder, the base model or data the run reads, or a folder of other files")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="--out holds a run: remove its files and start again")


def add_front_flag(c, baseline: str) -> None:
    """``compare --front``: the budgets of the baseline's time–quality front."""
    c.add_argument("--front", default="0.25,0.5,0.75,1", metavar="FRACTIONS",
                   help=f"budgets of the {baseline} front, as fractions of its steps, each trained with its learning "
                        f"rate fully decayed within its budget (runs {baseline}@0.25 and so on); the whole {baseline} "
                        f"run and {baseline}@budget always belong to it, so --front 1 adds no run. Every method's "
                        "time-to-quality speed-up is read off this front: the time it needs to reach the method's "
                        "quality / the method's time (default: 0.25,0.5,0.75,1)")


def front_of(args) -> tuple[float, ...]:
    from ..front import parse_fractions

    fractions = parse_fractions(args.front)
    if not fractions:
        raise ConfigError(f"--front names no fraction, got {args.front!r} (--front 1 adds no run)")
    return tuple(fractions)


STOP_FLAGS = ("--stop-after-epochs", "--stop-after-steps")  # a resumed run may stop again
RESUME_FLAGS = ("--resume", "--task", "--cpu", "--mixed-precision", "--log-with", "--rendezvous-timeout",
                *STOP_FLAGS)  # what --resume may come with


def run_one(args, acc, what: str, run, make_spec, done) -> None:
    """One run: continue ``--resume DIR`` (to its end, or to ``--stop-after-*`` again), or start ``make_spec()``
    into ``--out`` (required); then print ``done(summary)``, or how to continue a run stopped early on purpose."""
    if args.resume:
        other = [f for f in getattr(args, "given", []) if f not in RESUME_FLAGS]
        if other:
            raise ConfigError(f"--resume continues a run with its own saved settings; drop {', '.join(other)} "
                              "(or start a new run with --out)")
        stop = next((getattr(args, "train." + f[2:].replace("-", "_")) for f in STOP_FLAGS
                     if f in getattr(args, "given", [])), None)
        res = run(None, args.resume, acc, resume=True, stop_after=stop)
        args.out = args.resume  # the run's folder, for ``done``
    else:
        if not args.out:
            raise ConfigError(f"{what} needs --out DIR (or --resume DIR)")
        res = run(make_spec(), args.out, acc, overwrite=args.overwrite)
    acc.print(done(res["summary"]) if res.get("done") else
              f"stopped early as asked; continue with `autoprog {what} --resume {args.out}`"
              f"{launch_note(acc.num_processes)}")


def compare_methods(args) -> list[str]:
    """``--methods``: comma-separated names, at least one."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods names no method, got {args.methods!r}")
    return methods


def run_compare(args, acc, one, over_seeds, files: str) -> None:
    """``compare``: ``one(methods, budget)`` for a single seed, ``over_seeds(methods, seeds, budget)`` with
    ``--seeds``; ``budget`` says whether to train the budget-matched baseline."""
    methods = compare_methods(args)
    budget = not args.no_budget_baseline
    if args.seeds is not None:
        over_seeds(methods, parse_seeds(args.seeds), budget)
    else:
        one(methods, budget)
    acc.print(f"wrote {args.out}/summary.json, summary.md, {files}")
