"""The README's examples still match autoprog: every command line parses with the CLI's own parser, and every
complete Python example runs with the training calls bound to their real signatures instead of training."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def _commands() -> list[list[str]]:
    """Every ``autoprog ...`` (or ``torchrun ... -m autoprog.cli ...``) line of the bash examples, as argv."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "autoprog.cli" in words:
                out.append(words[words.index("autoprog.cli") + 1:])
            elif words[:1] == ["autoprog"]:
                out.append(words[1:])
    return out


COMMANDS = _commands()


def test_the_readme_has_examples_to_check():
    assert len(COMMANDS) >= 40 and len(re.findall(r"^(?:from|import) ", "".join(_blocks("python")), re.M)) >= 5


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:70] for a in COMMANDS])
def test_every_readme_command_parses(argv):
    """Parsed as ``autoprog`` parses it (a preset's values included), without running it: a flag renamed or a
    choice dropped fails here."""
    from autoprog.cli import _parse, build_parser, task_of

    args = _parse(build_parser(task_of(argv)), argv)
    assert args.command == argv[0]


INLINE = [a for a in COMMANDS if a[0] == "pretrain" and "--schedule" in a and not a[a.index("--schedule") + 1]
          .endswith(".json") and "--dataset" not in a]


@pytest.mark.parametrize("argv", INLINE, ids=[" ".join(a)[:70] for a in INLINE])
def test_the_readmes_inline_schedules_fit_the_built_in_model(argv, fake_fmnist):
    """An inline schedule on the default data and model is checked as a run checks it (each resolution a
    multiple of the patch size, each depth within the model)."""
    from autoprog.classification.runner import validate_spec
    from autoprog.cli import _parse, build_parser
    from autoprog.cli.classification import spec_from_args

    args = _parse(build_parser(), [*argv, "--data-root", str(fake_fmnist), "--cpu"])
    validate_spec(spec_from_args(args, args.method))


class _Results(dict):
    """A run's results, as the examples read them: any key, nested."""

    def __missing__(self, key):
        return _Results()


PYTHON = [b for b in _blocks("python") if re.search(r"^(from|import) ", b, re.M)]  # (fragments are skipped)


def test_the_readme_python_examples_run_against_the_api(monkeypatch, tmp_path):
    """In the README's order, in one namespace (as a reader runs them: a later example may use an earlier one's
    imports): its specs are built for real; ``pretrain``, ``compare``, ``finetune`` ... are called with arguments
    that bind to their real signatures, the spec of the class the call takes, and return results with any key."""
    import autoprog.classification.runner as cls_runner
    import autoprog.diffusion.runner as diff_runner

    calls = []

    def stand_in(real):
        sig = inspect.signature(real)

        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            spec = next(iter(bound.arguments.values()))
            want = real.__globals__[sig.parameters[next(iter(sig.parameters))].annotation]  # (a string: RunSpec)
            assert isinstance(spec, want), f"{real.__name__} takes a {want.__name__}, got {type(spec).__name__}"
            calls.append(real.__name__)
            return [] if real.__name__.startswith("compare") else _Results()

        return call

    for module, names in ((cls_runner, ("pretrain", "compare", "finetune_classifier")),
                          (diff_runner, ("finetune", "compare_finetune"))):
        for name in names:
            monkeypatch.setattr(module, name, stand_in(getattr(module, name)))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    for block in PYTHON:
        try:
            exec(compile(block, str(README), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README example beginning {block.splitlines()[0]!r}: {e!r}") from e
    assert set(calls) == {"pretrain", "compare", "finetune_classifier", "finetune", "compare_finetune"}, calls


def test_the_test_command_keeps_no_passing_tests_folders(request):
    """The README's test command runs on machines with little disk (CI fills up otherwise: a VOLO run's folder is
    ~0.9 GB): a passing test's tmp_path goes when it ends and only the last session's failures are kept."""
    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert int(request.config.getini("tmp_path_retention_count")) <= 1
