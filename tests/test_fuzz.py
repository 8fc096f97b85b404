"""Fuzz the command line with hypothesis: random values for the options, and damaged files where autoprog reads a
file. Every invocation must end in a documented way (exit 0, 2, 3 or 130), never a traceback; a refusal is one
line; and no file outside its --out changes. Training itself is replaced by a sentinel: what is fuzzed is every
check made before the first step, which is where input is checked.

``AUTOPROG_FUZZ_EXAMPLES`` (default 80) sets the examples, ``AUTOPROG_FUZZ_RANDOM=1`` draws new ones instead of
the same derandomized sequence (use it to look for new cases; add what it finds to benchmarks/bad_inputs.txt).
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprog.cli import build_parser, main
from autoprog.diffusion.runner import DEFAULT_BASE
from autoprog.engine import RunTemplate

pytestmark = pytest.mark.slow

NASTY = ["", " ", "0", "-1", "1", "2", "3", "0.5", "-0.0", "nan", "inf", "-inf", "1e400", "1e-400",
         "99999999999999999999", "-99999999999999999999", "100000000000000", "4294967296", "-2147483649", "x", "1,2", ",", "a,,b", "{}", "{", "}", "{x}", "a {} {}",
         "é", "16x4,28x6", "/nonexistent", "auto", "none", "true", "3.5", "5-9", "0,2,4", "1h", "10s"]
FILES = ["yaml-duplicate", "not-utf8", "folder", "json-nan", "json-truncated", "empty", "schedule", "yaml-list-key",
         "yaml-deep"]
NEVER = {"--help", "--out", "--resume", "--cpu", "--data-root", "--cache-dir", "--overwrite", "--task", "--seeds"}
COMMANDS = {  # the command, and the options that keep an accepted run small
    "pretrain": ["--subset", "64", "--batch-size", "32", "--epochs", "1", "--embed-dim", "16", "--depth", "2",
                 "--num-heads", "2", "--patch-size", "4", "--eval-samples", "32", "--no-flops"],
    "compare": ["--subset", "64", "--batch-size", "32", "--epochs", "1", "--embed-dim", "16", "--depth", "2",
                "--num-heads", "2", "--patch-size", "4", "--eval-samples", "32", "--no-flops", "--methods", "prog"],
    "finetune": ["--steps", "2", "--batch-size", "8", "--eval-points", "1", "--curve-samples", "4", "--fd-samples",
                 "4", "--sample-steps", "2", "--feature-epochs", "1", "--subset", "64", "--method", "bitfit"],
    "sample": ["--per-class", "1", "--sample-steps", "2", "--classes", "0"],
}


class WouldTrain(BaseException):
    """Raised where the first training step would run: the input was accepted."""


def _flags(command: str) -> list[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return sorted(s for a in sub._actions for s in a.option_strings[-1:] if s not in NEVER)


FLAGS = {c: _flags(c) for c in COMMANDS}


def _files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    made = {"yaml-duplicate": ("c.yaml", b"epochs: 1\nepochs: 2\n"), "not-utf8": ("b.json", b"\xff\xfe{}"),
            "json-nan": ("n.json", b'{"stages": [{"resolution": 14, "depth": 2, "fraction": NaN}]}'),
            "json-truncated": ("t.json", b'{"stages": [{"resolution": 1'), "empty": ("e.yaml", b""),
            "schedule": ("s.json", b'{"stages": [{"resolution": 14.5, "depth": 2}]}'),
            "yaml-list-key": ("k.yaml", b"? [1, 2]\n: 3\n"), "yaml-deep": ("d.yaml", b"a: " + b"[" * 3000 + b"]" * 3000)}
    out = {"folder": root}
    for key, (name, data) in made.items():
        (root / name).write_bytes(data)
        out[key] = root / name
    return out


def _snapshot(*roots: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fuzz_env(fake_fmnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return fake_fmnist, _files(root / "files"), root / "runs", root / "cache"


def _invoke(argv: list[str]) -> tuple[object, str]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # each command is a new process's first
    GradientState._reset_state()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except WouldTrain:
            code = "trains"
    return code, err.getvalue()


_counter = itertools.count()
OUTCOMES = collections.Counter()  # exit code (or "trains") → examples, for the summary below


@settings(max_examples=int(os.environ.get("AUTOPROG_FUZZ_EXAMPLES", "80")), deadline=None,
          derandomize=os.environ.get("AUTOPROG_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_options_and_files_end_cleanly(fuzz_env, monkeypatch, data):
    data_root, files, runs, cache = fuzz_env
    monkeypatch.setattr(RunTemplate, "fit", lambda self, resume=False: (_ for _ in ()).throw(WouldTrain()))
    command = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    nasty = st.sampled_from(NASTY) | st.sampled_from(FILES).map(lambda k: str(files[k]))
    picks = data.draw(st.lists(st.sampled_from(FLAGS[command]), min_size=1, max_size=3), label="flags")
    out = runs / f"r{next(_counter)}"
    argv = [command, *(["--out", str(out), "--cpu"] if command != "sample" else [str(DEFAULT_BASE), "--out", str(out)]),
            *(["--data-root", str(data_root)] if command != "sample" else []),
            *(["--cache-dir", str(cache)] if command == "finetune" else []), *COMMANDS[command]]
    for flag in picks:
        action = sub._option_string_actions[flag]
        if action.nargs == 0:
            argv.append(flag)
            continue
        usual = [str(v) for v in (action.choices or [action.default]) if v is not None]  # values that work
        value = data.draw(st.sampled_from(usual) | nasty if usual else nasty, label=flag)
        argv += [flag, value]
    before = _snapshot(data_root, files["folder"], DEFAULT_BASE)
    try:
        code, err = _invoke(argv)
    except Exception as e:  # a traceback
        raise AssertionError(f"autoprog {' '.join(argv)} raised {type(e).__name__}: {e}") from e
    OUTCOMES[code] += 1
    assert code in (0, 2, 3, 130, "trains"), (argv, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln
             and not ln.startswith("autoprog: warning:")]
    if code in (2, 3):
        assert len(lines) == 1 and lines[0].startswith("autoprog: error:"), (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert _snapshot(data_root, files["folder"], DEFAULT_BASE) == before, f"{argv} changed a file outside --out"


def test_the_fuzzing_reached_training_and_refusals():
    """The sequence above is not all refusals (nor all accepted): both sides of the checks were exercised."""
    if not OUTCOMES:
        pytest.skip("the fuzz test did not run in this session")
    assert OUTCOMES["trains"] + OUTCOMES[0] > 0 and OUTCOMES[2] > 0, OUTCOMES
