"""Fault test: try autoprog as a user who relies on it would, and count what holds.

* kills: ``kill -9`` a tiny run at random moments (mid-epoch, mid-search, mid-checkpoint), resume it until it
  finishes, and compare its final weights with an uninterrupted run's (they must be identical);
* interrupts: the same with Ctrl-C (SIGINT): the run must stop at a step boundary with that step checkpointed;
* corruptions: damage the newest checkpoint (or both) in each of several ways and resume: a clean one-line error
  or a fallback with a message, never a traceback, never NaN weights accepted;
* divergence: a learning rate of 1e6 must stop with exit 3, strict JSON and no exported model;
* bad inputs: every invocation in ``bad_inputs.txt`` must exit 2 with exactly one line and no traceback.

    python benchmarks/fault_test.py --kills 10 --out runs/fault     # figures go to docs/results.md
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = ["--subset", "256", "--batch-size", "32", "--embed-dim", "16", "--depth", "4", "--num-heads", "2",
        "--patch-size", "4", "--eval-samples", "64", "--no-flops", "--cpu"]
FT_TINY = ["--steps", "24", "--batch-size", "16", "--eval-points", "2", "--curve-samples", "8", "--fd-samples", "16",
           "--sample-steps", "2", "--feature-epochs", "1", "--subset", "512", "--cpu"]
KILL_RUNS = {  # name: the command after `autoprog`, epochs/steps small enough to kill and resume quickly
    "prog": ["pretrain", "--method", "prog", "--epochs", "4", *TINY],
    "autoprog-one": ["pretrain", "--method", "autoprog-one", "--epochs", "4", "--search-epochs", "0.5",
                     "--time-source", "flops", *TINY],
    "finetune-prog": ["finetune", "--method", "prog", *FT_TINY],
}
BAD_INPUTS_FILE = Path(__file__).with_name("bad_inputs.txt")


def read_bad_inputs(path: Path = BAD_INPUTS_FILE) -> list[tuple[list[str], str]]:
    """``(argv after autoprog, why it is bad)`` for each line ``why | arguments`` of ``path``."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            why, _, argv = line.partition("|")
            out.append((shlex.split(argv), why.strip()))
    return out


BAD_INPUTS = read_bad_inputs()


def autoprog(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autoprog.cli", *map(str, argv)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # it trained instead of refusing (or hung): not clean
        return subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout} s")


def one_clean_line(proc: subprocess.CompletedProcess, code: int = 2) -> bool:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    return proc.returncode == code and len(lines) == 1 and lines[0].startswith("autoprog: error:") \
        and "Traceback" not in proc.stderr


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoint" / "model.safetensors")


def identical(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kills(out: Path, n: int, rng: random.Random, sig: int = signal.SIGKILL) -> dict:
    """Stop each run of KILL_RUNS with ``sig`` at random moments and resume it to the end. With SIGINT/SIGTERM a
    run must also stop cleanly: exit 130 naming the step it stopped at, and that step checkpointed."""
    name_of = "kills" if sig == signal.SIGKILL else "interrupts"
    counts = {name_of: 0, "resumed": 0, "identical": 0, "runs": 0}
    if sig != signal.SIGKILL:
        counts["stopped at a checkpointed step"] = 0
    for name, argv in KILL_RUNS.items():
        ref = out / f"ref-{name}"
        if not ((ref / "results.json").is_file() and json.loads((ref / "results.json").read_text()).get("done")):
            shutil.rmtree(ref, ignore_errors=True)
            assert autoprog(*argv, "--out", ref).returncode == 0, f"reference run {name} failed"
        t0 = time.perf_counter()  # timed once caches (the feature classifier) are warm, as the killed runs are
        shutil.rmtree(out / "timing", ignore_errors=True)
        autoprog(*argv, "--out", out / "timing")
        took = time.perf_counter() - t0
        for i in range(max(1, n // len(KILL_RUNS))):
            run = out / f"{name_of}-{name}-{i}"
            shutil.rmtree(run, ignore_errors=True)
            proc = subprocess.Popen([sys.executable, "-m", "autoprog.cli", *argv, "--out", str(run)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_default_sigint)
            time.sleep(rng.uniform(0.3, 0.9) * took)
            if proc.poll() is None:
                proc.send_signal(sig)
                counts[name_of] += 1
                try:
                    _, err = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:  # it did not stop: not clean
                    proc.kill()
                    _, err = proc.communicate()
                    err += "\ndid not stop within 300 s"
                if sig != signal.SIGKILL:
                    counts["stopped at a checkpointed step"] += stopped_at_checkpoint(proc.returncode, err, run)
            proc.wait()
            for _ in range(5):  # resume until it finishes (a resume can itself be the first start)
                res = run / "results.json"
                if res.is_file() and json.loads(res.read_text()).get("done"):
                    break
                if (run / "checkpoint").exists() or (run / "checkpoint.prev").exists():
                    cmd = (argv[0], "--resume", run)
                else:  # killed before its first checkpoint: nothing to resume, start again
                    shutil.rmtree(run, ignore_errors=True)
                    cmd = (*argv, "--out", run)
                autoprog(*cmd)
            counts["runs"] += 1
            done = (run / "results.json").is_file() and json.loads((run / "results.json").read_text()).get("done")
            counts["resumed"] += bool(done)
            counts["identical"] += bool(done) and identical(ref, run)
    return counts


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal (a background `fault_test.py &` passes SIGINT on as ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stopped_at_checkpoint(code: int, err: str, run: Path) -> bool:
    """Exit 130 with one line ``interrupted at step N`` and N the checkpointed step (a stop before training
    began, e.g. while loading, counts when it exits 130 in one line)."""
    import re

    lines = [ln for ln in err.splitlines() if ln.startswith("autoprog:") and "stopping after this step" not in ln]
    if code != 130 or len(lines) != 1 or "Traceback" in err:
        return False
    m = re.search(r"interrupted at step (\d+)", lines[0])
    if m is None:  # stopped before training began (loading, building): the generic clean stop
        return "interrupted" in lines[0] and ("stopping after this step" not in err or "had finished" in lines[0])
    state = run / "checkpoint" / "state.json"
    return state.is_file() and json.loads(state.read_text())["step"] == int(m.group(1))


def corruptions(out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    base = out / "corrupt-base"
    argv = KILL_RUNS["prog"]
    assert autoprog(*argv, "--out", base, "--stop-after-epochs", "2").returncode == 0

    def nan_weights(ck):
        w = load_file(ck / "model.safetensors")
        k = next(iter(w))
        w[k] = torch.full_like(w[k], float("nan"))
        save_file(w, ck / "model.safetensors")

    damages = {
        "truncated model": lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:99]),
        "empty model": lambda ck: (ck / "model.safetensors").write_bytes(b""),
        "missing model": lambda ck: (ck / "model.safetensors").unlink(),
        "missing ema": lambda ck: (ck / "ema.safetensors").unlink(),
        "missing optimizer": lambda ck: (ck / "optimizer.safetensors").unlink(),
        "garbage optimizer": lambda ck: (ck / "optimizer.safetensors").write_bytes(b"\x00" * 64),
        "NaN weights": nan_weights,
        "missing state": lambda ck: (ck / "state.json").unlink(),
        "garbage state": lambda ck: (ck / "state.json").write_text("{oops"),
        "state not an object": lambda ck: (ck / "state.json").write_text("[1, 2]"),
        "state without keys": lambda ck: (ck / "state.json").write_text("{}"),
        "binary state": lambda ck: (ck / "state.json").write_bytes(b"\xff\xfe\x00"),
    }
    counts = {"corruptions": 0, "clean": 0}
    for both in (False, True):
        for name, damage in damages.items():
            run = out / f"corrupt-{'both-' if both else ''}{name.replace(' ', '-')}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            damage(run / "checkpoint")
            if both:
                damage(run / "checkpoint.prev")
            proc = autoprog("pretrain", "--resume", run)
            counts["corruptions"] += 1
            fallback = proc.returncode == 0 and "previous checkpoint" in proc.stdout + proc.stderr
            ok = (fallback and not both) or (both and one_clean_line(proc))
            counts["clean"] += bool(ok)
            if not ok:
                print(f"  not clean: {'both ' if both else ''}{name}: rc {proc.returncode}: {proc.stderr[-300:]}")
    return counts


def divergence(out: Path) -> dict:
    counts = {"divergences": 0, "stopped": 0}
    for argv in (["pretrain", "--method", "prog", "--lr", "1e6", "--epochs", "2", *TINY],
                 ["finetune", "--method", "full", "--lr", "1e6", *FT_TINY]):
        run = out / f"diverge-{argv[0]}"
        shutil.rmtree(run, ignore_errors=True)
        proc = autoprog(*argv, "--out", run)
        counts["divergences"] += 1
        try:
            res = json.loads((run / "results.json").read_text(), parse_constant=lambda c: 1 / 0)
        except (OSError, ValueError, ZeroDivisionError):
            res = {}
        ok = one_clean_line(proc, 3) and res.get("diverged") and not res.get("done") and not (run / "model").exists()
        counts["stopped"] += bool(ok)
    return counts


def bad_inputs(out: Path) -> dict:
    from autoprog.diffusion.runner import DEFAULT_BASE

    counts = {"bad inputs": 0, "clean": 0}
    for i, (argv, why) in enumerate(BAD_INPUTS):
        run = out / f"bad-{i}"
        shutil.rmtree(run, ignore_errors=True)
        args = [str(run) if a == "OUT" else str(DEFAULT_BASE) if a == "BASE" else a for a in argv]
        proc = autoprog(*args, *(["--cpu"] if args[0] in ("pretrain", "finetune", "compare") else []), timeout=90)
        counts["bad inputs"] += 1
        ok = one_clean_line(proc)
        counts["clean"] += ok
        if not ok:
            print(f"  not clean: {why}: {' '.join(argv)}: rc {proc.returncode}: {proc.stderr[-300:]}")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fault")
    p.add_argument("--kills", type=int, default=9, help="kill -9s in all (spread over the runs) (default: 9)")
    p.add_argument("--interrupts", type=int, default=6, help="Ctrl-Cs (SIGINT) in all (default: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: kills,interrupts,corruptions,divergence,bad")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    figures = {}
    for part, run in (("kills", lambda: kills(out, a.kills, random.Random(a.seed))),
                      ("interrupts", lambda: kills(out, a.interrupts, random.Random(a.seed + 1), signal.SIGINT)),
                      ("corruptions", lambda: corruptions(out)),
                      ("divergence", lambda: divergence(out)), ("bad", lambda: bad_inputs(out))):
        if part not in skip:
            figures[part] = run()
            print(part, figures[part], flush=True)
    (out / "fault_test.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
