"""Experiment trackers through Accelerate (``--log-with tensorboard``, ``wandb``, ``mlflow``, …).

A run opens its trackers when training starts (:func:`start_tracking`: the run's name, its flattened options as
the run's configuration, TensorBoard's files under ``OUT/logs``) and closes them when it ends
(:func:`end_tracking`), so the runs of one ``compare`` are separate runs of the tracker. The engine logs the
training loss, learning rate, stage and images per second at its health checks (every 50 steps: values it
reads anyway, no extra host-device sync), every evaluation point's figures, and each stage's sub-network and
search result. Only the main process logs.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}  # pip names that differ from the tracker's


def check_trackers(names: list[str]) -> list[str]:
    """The trackers ``--log-with`` names, each installed (Accelerate would drop a missing one with a warning)."""
    from accelerate.utils import imports

    out = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--log-with: unknown tracker {name!r}; use one or more of {', '.join(TRACKERS)}")
        available = getattr(imports, f"is_{name}_available", lambda: False)
        if not available():
            raise ConfigError(f"--log-with {name} needs the {PACKAGES.get(name, name)} package: "
                              f"pip install {PACKAGES.get(name, name)}")
        out.append(name)
    return out


def parse_log_with(text: str | None) -> list[str]:
    """``--log-with tensorboard,wandb`` → the checked tracker names (empty: none)."""
    if text is None:
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--log-with names no tracker, got {text!r}")
    return check_trackers(names)


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested configuration as one level of scalars (what every tracker accepts as hyper-parameters)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "/"))
        elif isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        elif v is None or isinstance(v, float):
            out[key] = str(v)
        else:
            out[key] = str(v)[:250]
    return out


def numbers(record: dict, prefix: str) -> dict:
    """The finite numbers of a flat record (an evaluation point, a stage), named ``prefix/key``."""
    return {f"{prefix}/{k}": v for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def is_on(acc) -> bool:
    """Whether the run has trackers (`--log-with`)."""
    return bool(getattr(acc, "log_with", None))


def start_tracking(acc, out: Path, config: dict) -> None:
    """Open this run's trackers (any left open by an earlier run of the same process are closed first)."""
    if not is_on(acc):
        return
    end_tracking(acc)
    acc.project_configuration.project_dir = str(out)
    acc.project_configuration.logging_dir = str(out / "logs")
    acc.init_trackers(out.name, config=flat_config(config))


def end_tracking(acc) -> None:
    if not is_on(acc):
        return
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []


def log(acc, values: dict, step: int) -> None:
    if is_on(acc) and acc.trackers and values:
        acc.log(values, step=step)


def log_images(acc, images: dict, step: int) -> None:
    """Send PIL images (sample grids) to the trackers that take images (TensorBoard, W&B, ...)."""
    if not (is_on(acc) and acc.trackers and images):
        return
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in images.items()}
    for tracker in acc.trackers:
        if callable(getattr(tracker, "log_images", None)):
            tracker.log_images(arrays, step=step, **({"dataformats": "HWC"} if tracker.name == "tensorboard" else {}))


def stage_values(info: dict) -> dict:
    """A stage record for the trackers: the sub-networks it names (resolution, depth), its numbers, and a search's
    candidate table as text."""
    values = numbers(info, "stage")
    for key, v in info.items():
        if isinstance(v, dict) and "resolution" in v:
            values.update({f"stage/{key}_{k}": v[k] for k in ("resolution", "depth") if isinstance(v.get(k), int)})
    cands = info.get("candidates")
    if isinstance(cands, list) and cands and isinstance(cands[0], dict):
        cols = list(cands[0])
        rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        rows += ["| " + " | ".join(str(c.get(k, "")) for k in cols) + " |" for c in cands]
        values["search/candidates"] = "\n".join(rows)
    return values
