"""Option values from YAML: ``--config FILE`` (keys are option names with ``_`` or ``-``) and the shipped presets
(``--preset NAME``; ``autoprog presets`` lists them). Values become command-line tokens, so argparse checks
their types and choices exactly as it checks flags."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

PRESET_TASKS = {"classification": "autoprog pretrain / autoprog compare",
                "diffusion": "autoprog pretrain --task diffusion",
                "finetune": "autoprog finetune / autoprog compare --task finetune"}


def _yaml(text: str, where: str):
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e


def read_options(path: str) -> dict:
    """The option mapping of a --config file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from e
    values = _yaml(text, f"--config {path}")
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of option: value")
    return values


def options_argv(sub: argparse.ArgumentParser, values: dict, where: str) -> list[str]:
    """Command-line tokens for ``values`` on the (sub)command ``sub``; unknown options are a one-line error."""
    actions = {a.option_strings[-1][2:]: a for a in sub._actions if a.option_strings}
    argv = []
    for key, value in values.items():
        action = actions.get(str(key).replace("_", "-"))
        if action is None or action.dest in ("config", "preset", "help"):
            raise ConfigError(f"{where}: unknown option {key!r}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false switches
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} needs a single value, got {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def _preset_files() -> dict:
    """Preset name → its resource (a file on disk, or inside an archive)."""
    root = resources.files("autoprog") / "configs"
    return {f.name.removesuffix(".yaml"): f for f in root.iterdir() if f.name.endswith(".yaml")}


def load_preset(name: str) -> dict:
    """A shipped preset: ``{"description", "task", "options"}``."""
    files = _preset_files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(sorted(files))} (see 'autoprog presets')")
    d = _yaml(files[name].read_text(), f"preset {name}")
    if not isinstance(d, dict) or set(d) != {"description", "task", "options"} or d["task"] not in PRESET_TASKS \
            or not isinstance(d["options"], dict):
        raise ConfigError(f"preset {name} ({files[name]}) needs exactly description, task "
                          f"({', '.join(PRESET_TASKS)}) and an options mapping")
    return d


def command_task(args: argparse.Namespace) -> str:
    """The preset task a parsed command runs: classification, diffusion (base DiT) or finetune."""
    return "finetune" if args.command == "finetune" else getattr(args, "task", "classification")


def check_preset_fits(preset: dict, command: str, task: str) -> None:
    if preset["task"] != task:
        raise ConfigError(f"this preset is for {PRESET_TASKS[preset['task']]}, not for {command} with {task}")


def list_presets() -> list[tuple[str, str, str]]:
    """(name, commands, description) of every shipped preset."""
    return [(name, PRESET_TASKS[p["task"]], p["description"]) for name in sorted(_preset_files())
            for p in [load_preset(name)]]
