"""Option values from YAML: ``--config FILE`` (keys are option names with ``_`` or ``-``) and the shipped presets
(``--preset NAME``; ``autoprog presets`` lists them; a copy of one is a --config file). Values become
command-line tokens, so argparse checks their types and choices exactly as it checks flags."""

from __future__ import annotations

import argparse
from importlib import resources

from ..errors import ConfigError
from ..formats import parse_yaml, read_text

PRESET_TASKS = {"classification": "autoprog pretrain / autoprog compare",
                "diffusion": "autoprog pretrain --task diffusion",
                "finetune": "autoprog finetune / autoprog compare --task finetune",
                "text-to-image": "autoprog finetune --task text-to-image / autoprog compare --task text-to-image",
                "dreambooth": "autoprog finetune --task dreambooth / autoprog compare --task dreambooth"}


PRESET_KEYS = {"description", "task", "options"}


def read_options(path: str, command: str, task: str) -> dict:
    """The option mapping of a --config file (UTF-8 YAML, each key once, not empty): ``option: value`` lines, or
    a preset's layout (a copy of a shipped preset, edited): its ``options``, its ``task`` fitting the command."""
    if not path:
        raise ConfigError("--config needs a YAML file's path, got ''")
    values = parse_yaml(read_text(path, "--config"), f"--config {path}")
    if values is None:
        raise ConfigError(f"--config {path} is empty; give option: value lines, or drop --config")
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of option: value")
    if "options" in values and set(values) <= PRESET_KEYS:  # a preset's layout
        if not isinstance(values["options"], dict):
            raise ConfigError(f"--config {path}: options must be a mapping of option: value")
        if "task" in values:
            if values["task"] not in PRESET_TASKS:
                raise ConfigError(f"--config {path}: task must be one of {', '.join(PRESET_TASKS)}, "
                                  f"got {values['task']!r}")
            check_preset_fits(values, command, task, f"--config {path}")
        return values["options"]
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
            _check_value(action, str(value), f"{where}: {key} ({flag})")
            argv += [flag, str(value)]
    return argv


def _check_value(action: argparse.Action, text: str, where: str) -> None:
    """The check argparse makes of a flag's value, made here so that the error names the file and the key."""
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ConfigError(f"{where} {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {text!r}")


def _preset_files() -> dict:
    """Preset name → its resource (a file on disk, or inside an archive)."""
    root = resources.files("autoprog") / "configs"
    return {f.name.removesuffix(".yaml"): f for f in root.iterdir() if f.name.endswith(".yaml")}


def load_preset(name: str) -> dict:
    """A shipped preset: ``{"description", "task", "options"}``."""
    files = _preset_files()
    if not name:
        raise ConfigError(f"--preset needs a name, got ''; choose from {', '.join(sorted(files))}")
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(sorted(files))} (see 'autoprog presets')")
    d = parse_yaml(files[name].read_text(encoding="utf-8"), f"preset {name}")
    if not isinstance(d, dict) or set(d) != {"description", "task", "options"} or d["task"] not in PRESET_TASKS \
            or not isinstance(d["options"], dict):
        raise ConfigError(f"preset {name} ({files[name]}) needs exactly description, task "
                          f"({', '.join(PRESET_TASKS)}) and an options mapping")
    return d


def command_task(args: argparse.Namespace) -> str:
    """The preset task a parsed command runs (a key of :data:`PRESET_TASKS` when a preset can fit it):
    classification, diffusion (a base DiT), finetune (class-conditional), text-to-image or dreambooth fine-tuning,
    or a task no preset is for (a text-to-image base model, transfer)."""
    task = getattr(args, "task", "classification")
    if args.command == "finetune":
        return {"class-conditional": "finetune", "classification": "transfer"}.get(task, task)
    if args.command == "pretrain" and task == "text-to-image":
        return "text-to-image base"
    return task


def check_preset_fits(preset: dict, command: str, task: str, what: str = "this preset") -> None:
    """A one-line error when ``preset`` (or a --config file in its layout, ``what``) is for another task."""
    if preset["task"] != task:
        typed = ({"finetune": "class-conditional", "transfer": "classification"} if command == "finetune"
                 else {"text-to-image base": "text-to-image"}).get(task, task)  # the --task given (or its default)
        raise ConfigError(f"{what} is for {PRESET_TASKS[preset['task']]}, not for {command} --task {typed}")


def list_presets() -> list[tuple[str, str, str]]:
    """(name, commands, description) of every shipped preset."""
    return [(name, PRESET_TASKS[p["task"]], p["description"]) for name in sorted(_preset_files())
            for p in [load_preset(name)]]
