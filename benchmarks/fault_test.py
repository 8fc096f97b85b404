"""Fault test: try autoprog as a user who relies on it would, and count what holds.

* kills: ``kill -9`` a tiny run at random moments (mid-epoch, mid-search, mid-checkpoint), resume it until it
  finishes, and compare its final weights with an uninterrupted run's (they must be identical);
* interrupts: the same with Ctrl-C (SIGINT): the run must stop at a step boundary with that step checkpointed;
* corruptions: damage the newest checkpoint (or both) in each of several ways and resume: a clean one-line error
  or a fallback with a message, never a traceback, never NaN weights accepted;
* divergence: a learning rate of 1e6 must stop with exit 3, strict JSON and no exported model;
* bad inputs: every invocation in ``bad_inputs.txt`` must exit 2 with exactly one line and no traceback;
* fuzz: tests/test_fuzz.py with new random command lines and damaged files (exit 0/2/3/130, no traceback, one
  line when refused, nothing outside --out touched).

    python benchmarks/fault_test.py --kills 10 --out runs/fault     # figures go to docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
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


def autoprog(*argv: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``autoprog ARGV`` in a new process (``env``: variables set on top of this process's)."""
    cmd = [sys.executable, "-m", "autoprog.cli", *map(str, argv)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
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
                    clean = stopped_at_checkpoint(proc.returncode, err, run)
                    counts["stopped at a checkpointed step"] += clean
                    if not clean:
                        print(f"  not clean: {name_of} of {name}: rc {proc.returncode}: {err[-400:]!r}", flush=True)
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
    began, e.g. while loading, counts when it exits 130 in one line); a signal that lands once the results are
    written may also end in exit 0 (the run is complete)."""
    import re

    res = run / "results.json"
    if code == 0 and "Traceback" not in err and res.is_file() and json.loads(res.read_text()).get("done"):
        return True

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


def _images(root: Path, classes: dict[str, int], bad: dict[str, bytes] | None = None) -> Path:
    """An image folder: ``classes`` maps a sub-folder (``train/a``, or ``""`` for root itself) to its number of
    readable 8-px PNGs; ``bad`` maps file paths under ``root`` to the bytes written there."""
    import numpy as np
    from PIL import Image

    for sub, n in classes.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * k % 255, np.uint8)).save(root / sub / f"{k}.png")
    for name, data in (bad or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _token_data(d: Path, change=None) -> Path:
    """An image folder (``d/ds``, classes a and b) with a valid 2 × 2 score map per training image (``d/maps``);
    ``change(maps)`` spoils them."""
    import torch

    _images(d / "ds", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2})
    for cls in ("a", "b"):
        (d / "maps" / cls).mkdir(parents=True)
        for k in range(4):
            m = torch.stack([torch.randn(2, 2, 2), torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 2, 2)])
            torch.save(m.half(), d / "maps" / cls / f"{k}.pt")
    if change is not None:
        change(d / "maps")
    return d


def _model_copy(d: Path, change=None) -> Path:
    """A copy of the shipped base model whose config.json is rewritten by ``change(config) -> text``."""
    from autoprog.diffusion.runner import DEFAULT_BASE

    shutil.copytree(DEFAULT_BASE, d)
    if change is not None:
        cfg = json.loads((d / "config.json").read_text())
        text = change(cfg)
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def _drop(d: dict, *keys: str) -> None:
    for k in keys[:-1]:
        d = d[k]
    d.pop(keys[-1])


def _set(d: dict, value, *keys: str) -> None:
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def _run_folder(d: Path, argv: list[str], change=None) -> Path:
    """A real run folder: ``argv`` stopped after its first checkpoint; ``change(config) -> text`` rewrites its
    config.json."""
    if not (d / "config.json").is_file():
        assert autoprog(*argv, "--out", d).returncode == 0, f"fixture run {argv} failed"
    if change is not None:
        cfg = json.loads((d / "config.json").read_text())
        text = change(cfg)
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


PRETRAIN_RUN = ["pretrain", "--method", "prog", "--epochs", "2", "--stop-after-epochs", "1", *TINY]
FINETUNE_RUN = ["finetune", "--method", "full", "--stop-after-steps", "4", *FT_TINY]
SCHEDULE = {"method": "fixed", "stages": [{"resolution": 14, "depth": 6, "fraction": 0.5},
                                          {"resolution": 28, "depth": 12, "fraction": 0.5}]}
# FIX:<name> in bad_inputs.txt: a file or folder made for the case, in its own directory
FIXTURES = {
    "yaml-duplicate-key": lambda d: _write(d / "c.yaml", "epochs: 1\nepochs: 2\n"),
    "yaml-not-utf8": lambda d: _write(d / "c.yaml", b"epochs: \xff\xfe1\n"),
    "yaml-empty": lambda d: _write(d / "c.yaml", ""),
    "yaml-nan": lambda d: _write(d / "c.yaml", "lr: .nan\n"),
    "yaml-huge-int": lambda d: _write(d / "c.yaml", "seed: 99999999999999999999999\n"),
    "yaml-list": lambda d: _write(d / "c.yaml", "- epochs\n"),
    "yaml-list-key": lambda d: _write(d / "c.yaml", "? [1, 2]\n: 3\n"),
    "yaml-deep": lambda d: _write(d / "c.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
    "a-folder": lambda d: d,
    "schedule-truncated": lambda d: _write(d / "s.json", json.dumps(SCHEDULE)[:30]),
    "schedule-not-utf8": lambda d: _write(d / "s.json", b"\xff\xfe{}"),
    "schedule-nan": lambda d: _write(d / "s.json", json.dumps(SCHEDULE).replace("0.5", "NaN", 1)),
    "schedule-fractional-resolution": lambda d: _write(d / "s.json", json.dumps(SCHEDULE).replace("14", "14.5")),
    "schedule-duplicate-key": lambda d: _write(d / "s.json", json.dumps(SCHEDULE)[:-1] + ', "stages": []}'),
    "schedule-string-depth": lambda d: _write(d / "s.json", json.dumps(SCHEDULE).replace("6", '"6"', 1)),
    "schedule-not-object": lambda d: _write(d / "s.json", "[1, 2]"),
    "model-missing-key": lambda d: _model_copy(d / "m", lambda c: json.dumps(_drop(c, "config", "depth") or c)),
    "model-wrong-type": lambda d: _model_copy(d / "m", lambda c: json.dumps(_set(c, "six", "config", "depth") or c)),
    "model-negative-width": lambda d: _model_copy(d / "m", lambda c: json.dumps(_set(c, -96, "config", "hidden_size")
                                                                                   or c)),
    "model-truncated-config": lambda d: _model_copy(d / "m", lambda c: json.dumps(c)[:40]),
    "model-config-not-utf8": lambda d: _model_copy(d / "m", lambda c: b"\xff" + json.dumps(c).encode()),
    "model-nan-config": lambda d: _model_copy(d / "m", lambda c: json.dumps(c).replace("4.0", "NaN")),
    "model-classes-not-list": lambda d: _model_copy(d / "m", lambda c: json.dumps(_set(c, 3, "classes") or c)),
    "model-without-weights": lambda d: (_model_copy(d / "m") / "model.safetensors").unlink() or d / "m",
    "model-garbage-weights": lambda d: _write(_model_copy(d / "m") / "model.safetensors", b"\x00" * 64).parent,
    "model": lambda d: _model_copy(d / "m"),
    "run-with-model": lambda d: _write(_model_copy(d / "r" / "model").parent / "results.json", '{"done": true}').parent,
    "folder-with-a-file": lambda d: _write(d / "mine" / "notes.txt", "my notes").parent,
    "a-file": lambda d: _write(d / "notes.txt", "my notes"),
    "images-corrupt": lambda d: _images(d / "ds", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2},
                                         {"train/a/bad.png": b"not a png"}),
    "images-empty-file": lambda d: _images(d / "ds", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2},
                                            {"train/b/empty.png": b""}),
    "images-one-class": lambda d: _images(d / "ds", {"train/a": 8, "val/a": 2}),
    "images-no-val-images": lambda d: _images(d / "ds", {"train/a": 4, "train/b": 4, "val/a": 0, "val/b": 0}),
    "images": lambda d: _images(d / "ds", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2}),
    "token-data": lambda d: _token_data(d),
    "token-maps-of-other-classes": lambda d: _token_data(d, lambda m: _write(
        m / "token-labels.json", json.dumps({"top_k": 2, "classes": ["a", "c"]}))),
    "token-missing-map": lambda d: _token_data(d, lambda m: (m / "b" / "3.pt").unlink()),
    "token-map-shape": lambda d: _token_data(d, lambda m: __import__("torch").save(
        __import__("torch").zeros(3, 2, 2), m / "a" / "0.pt")),
    "token-map-class": lambda d: _token_data(d, lambda m: __import__("torch").save(
        __import__("torch").full((2, 2, 2, 2), 7.0).half(), m / "a" / "0.pt")),
    "token-map-garbage": lambda d: _write(_token_data(d) / "maps" / "a" / "0.pt", b"not a tensor").parent.parent.parent,
    "instance-corrupt": lambda d: _images(d / "inst", {"": 3}, {"bad.jpg": b"\x00\x01"}),
    "instance-empty": lambda d: _images(d / "inst", {"": 0}),
    "run-pretrain": lambda d: _run_folder(d.parent / "fixture-pretrain", PRETRAIN_RUN),
    "run-finetune": lambda d: _run_folder(d.parent / "fixture-finetune", FINETUNE_RUN),
    "run-config-truncated": lambda d: _run_folder(_copy_run(d, "pretrain"), [], lambda c: json.dumps(c)[:50]),
    "run-config-not-utf8": lambda d: _run_folder(_copy_run(d, "pretrain"), [], lambda c: b"\xff" + json.dumps(c).encode()),
    "run-config-nan-lr": lambda d: _run_folder(_copy_run(d, "pretrain"), [],
                                               lambda c: json.dumps(_set(c, float("nan"), "train", "lr") or c)),
    "run-config-wrong-type": lambda d: _run_folder(_copy_run(d, "pretrain"), [],
                                                   lambda c: json.dumps(_set(c, "x", "train", "epochs") or c)),
    "run-config-missing-key": lambda d: _run_folder(_copy_run(d, "pretrain"), [],
                                                    lambda c: json.dumps(_drop(c, "train") or c)),
    "run-config-not-object": lambda d: _run_folder(_copy_run(d, "pretrain"), [], lambda c: "[]"),
    "finetune-config-wrong-type": lambda d: _run_folder(_copy_run(d, "finetune"), [],
                                                        lambda c: json.dumps(_set(c, "x", "spec", "train", "steps")
                                                                             or c)),
}


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _copy_run(d: Path, kind: str) -> Path:
    src = FIXTURES[f"run-{kind}"](d)
    shutil.copytree(src, d / "run")
    return d / "run"


def case_argv(argv: list[str], run: Path) -> tuple[list[str], dict]:
    """A bad_inputs.txt case ready to run in ``run``: placeholders filled in, leading ``NAME=value`` tokens taken
    as environment variables."""
    from autoprog.diffusion.runner import DEFAULT_BASE

    env = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        name, _, value = argv[0].partition("=")
        env[name] = value
        argv = argv[1:]
    out, made = [], {}
    for a in argv:
        if a.startswith("FIX:"):  # FIX:name, or FIX:name/inside to name a path inside the fixture
            name, _, inside = a[4:].partition("/")
            if name not in made:
                fix = run.parent / f"{run.name}-fixture-{len(made)}"
                shutil.rmtree(fix, ignore_errors=True)
                fix.mkdir(parents=True)
                made[name] = FIXTURES[name](fix)
            a = str(made[name] / inside) if inside else str(made[name])
        out.append(str(run) if a == "OUT" else str(DEFAULT_BASE) if a == "BASE" else a.replace("OUT/", f"{run}/"))
    return out, env


def bad_inputs(out: Path, match: str = "", start: int = 0, timeout: int = 90, jobs: int = 1) -> dict:
    """Every case of bad_inputs.txt (or those whose reason matches ``match``): its fixtures made here in turn, its
    command run in ``jobs`` processes at once (each case in its own folder)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i, (argv, why) in enumerate(BAD_INPUTS):
        if i < start or (match and not re.search(match, why)):
            continue
        run = out / f"bad-{i}"
        shutil.rmtree(run, ignore_errors=True)
        args, env = case_argv(argv, run)
        cpu = ["--cpu"] if args[0] in ("pretrain", "finetune", "compare") else []
        cases.append((argv, why, args + cpu, env))
    counts = {"bad inputs": 0, "clean": 0}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        procs = pool.map(lambda case: autoprog(*case[2], timeout=timeout, env=case[3]), cases)
        for (argv, why, _, _), proc in zip(cases, procs, strict=True):
            counts["bad inputs"] += 1
            ok = one_clean_line(proc)
            counts["clean"] += ok
            if not ok:
                print(f"  not clean: {why}: {' '.join(argv)}: rc {proc.returncode}: {proc.stderr[-300:]}",
                      flush=True)
    return counts


def fuzz(out: Path, examples: int) -> dict:
    """tests/test_fuzz.py with ``examples`` new random examples (not the suite's fixed sequence): hypothesis stops
    at the first case that is not clean and shrinks it; its report goes to OUT/fuzz.log."""

    env = {**os.environ, "AUTOPROG_FUZZ_EXAMPLES": str(examples), "AUTOPROG_FUZZ_RANDOM": "1"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(root / "tests" / "test_fuzz.py")], capture_output=True, text=True, env=env, cwd=root)
    (out / "fuzz.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(f"  not clean: a fuzzed case, see {out / 'fuzz.log'}", flush=True)
    return {"fuzz examples": examples, "all clean": proc.returncode == 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fault")
    p.add_argument("--kills", type=int, default=9, help="kill -9s in all (spread over the runs) (default: 9)")
    p.add_argument("--interrupts", type=int, default=6, help="Ctrl-Cs (SIGINT) in all (default: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: kills,interrupts,corruptions,divergence,"
                                                "bad,fuzz")
    p.add_argument("--fuzz", type=int, default=300, help="random command lines for the fuzz part (default: 300)")
    p.add_argument("--match", default="", help="bad inputs: only the cases whose reason matches this regex")
    p.add_argument("--start", type=int, default=0, help="bad inputs: skip the first START cases")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="bad inputs: cases run at once (default: the machine's cores)")
    p.add_argument("--timeout", type=int, default=90, help="bad inputs: seconds before a case counts as accepted "
                                                           "(it trains instead of refusing) (default: 90)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    figures = {}
    for part, run in (("kills", lambda: kills(out, a.kills, random.Random(a.seed))),
                      ("interrupts", lambda: kills(out, a.interrupts, random.Random(a.seed + 1), signal.SIGINT)),
                      ("corruptions", lambda: corruptions(out)),
                      ("divergence", lambda: divergence(out)),
                      ("bad", lambda: bad_inputs(out, a.match, a.start, a.timeout, a.jobs)),
                      ("fuzz", lambda: fuzz(out, a.fuzz))):
        if part not in skip:
            figures[part] = run()
            print(part, figures[part], flush=True)
    (out / "fault_test.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
