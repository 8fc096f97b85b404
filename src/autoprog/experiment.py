"""What both tasks' experiments share: reuse or resume finished runs, check a saved run's settings, the
budget-matched baseline runs, and aggregation over seeds. Task runners build on this; it imports no task."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

from .checkpoint import has_checkpoint, is_model_dir, saved_run_record
from .errors import ConfigError, DivergedError
from .formats import read_json_object
from .front import FRONT_SEPARATOR, Front, Speedup, front_name, mean_speedup

BUDGET_SUFFIX = "@budget"


RUN_KINDS = {  # config.json's "task" → what made the run, and the command that continues it
    "classification": ("a pre-training (classification) run", "autoprog pretrain --resume"),
    "diffusion": ("a base diffusion model's run", "autoprog pretrain --task diffusion --resume"),
    "finetune": ("a fine-tuning run", "autoprog finetune --resume"),
    "transfer": ("a classifier's fine-tuning run", "autoprog finetune --task classification --resume"),
}


def read_run_config(out: Path, kind: str) -> dict:
    """The ``config.json`` of the run in ``out``, which must be a run of ``kind`` (a key of :data:`RUN_KINDS`):
    a missing, unreadable or malformed file, or a run of another kind, is a one-line error saying what to do."""
    cfg = out / "config.json"
    if is_model_dir(out):
        raise ConfigError(f"--resume {out}: that is a model folder, not a run's (a run folder holds config.json "
                          "and checkpoint/)")
    if not cfg.is_file():
        runs = sorted(d.name for d in out.iterdir() if (d / "config.json").is_file() and not is_model_dir(d)) \
            if out.is_dir() else []
        if runs:  # a comparison's folder: its runs lie inside
            raise ConfigError(f"--resume {out}: that is a comparison's folder (runs {', '.join(runs[:4])}"
                              f"{', ...' if len(runs) > 4 else ''}); run the same compare command again to continue "
                              f"it, or --resume one of its runs ({out / runs[0]})")
        raise ConfigError(f"--resume {out}: no config.json there; it is not a run directory")
    d = read_json_object(cfg, "run settings")
    if "task" not in d and "method" not in d:
        raise ConfigError(f"--resume {out}: {cfg} is not a run's settings (no task or method)")
    found = d.get("task", "classification")
    if found not in RUN_KINDS:
        raise ConfigError(f"{cfg}: unknown task {found!r}; expected {', '.join(RUN_KINDS)}")
    if found != kind:
        what, command = RUN_KINDS[found]
        raise ConfigError(f"--resume {out}: that is {what}; continue it with '{command} {out}'")
    return d


# the settings that name files or folders a run reads (a dataset, a base model, a VAE, a schedule...)
PATH_SETTINGS = ("dataset", "data_root", "base", "vae", "schedule", "instance_dir", "fid_weights", "clip_model",
                 "dino_model", "token_labels")


def input_paths(spec) -> dict[str, str]:
    """Flag → value of every setting of ``spec`` in :data:`PATH_SETTINGS` that names an existing file or folder
    (a built-in dataset's name is no path), which its ``--out`` must neither be nor hold."""
    from .data import is_image_folder

    out = {}
    for name in PATH_SETTINGS:
        v = getattr(spec, name, None) or getattr(getattr(spec, "train", None), name, None)
        if isinstance(v, str) and v and Path(v).exists() and (name != "dataset" or is_image_folder(v)):
            out["--" + name.replace("_", "-")] = v
    return out


def spec_differences(saved: dict, wanted: dict, prefix: str = "", ignore: tuple[str, ...] = ()) -> list[str]:
    """``"name: X there, Y now"`` for every setting (dotted name) that differs between two spec dicts."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if key in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, f"{prefix}{key}.", ignore)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def saved_differences(out: Path, spec, load_saved, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """How the run in ``out`` was set up differently from ``spec`` (None: no run there).

    ``load_saved`` turns the run's ``config.json`` into a spec of ``spec``'s class; going through the dataclass
    makes settings added since the run was made compare at their defaults.
    """
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        return None
    saved = json.loads(json.dumps(load_saved(read_json_object(cfg_path, "run settings")).to_dict()))
    return spec_differences(saved, json.loads(json.dumps(spec.to_dict())), ignore=ignore)


def drop_stale_budget_run(out: Path, differ: list[str] | None, steps_key: str, acc) -> None:
    """A budget row is derived from the other rows' wall-clock: when they changed (a method added or re-run)
    its step count changes too, and a budget run made for another step count is removed to be trained again."""
    if differ and all(d.startswith(f"{steps_key}:") for d in differ):
        acc.print(f"{out.name}: the budget changed ({differ[0]}); training it again")
        if acc.is_main_process:
            shutil.rmtree(out)
        acc.wait_for_everyone()


def reuse_or_run(out: Path, method: str, differ: list[str] | None, run: Callable[[bool], dict],
                 log: Callable[[str], None] = print, data: Callable[[], dict] | None = None,
                 processes: int | None = None) -> dict:
    """The results of the run in ``out``: reused when finished, else ``run(resume)`` (resuming when a checkpoint
    is there). ``differ`` lists how a saved run's settings differ from the wanted ones (None: no saved run);
    a run made with other settings is refused, naming them. ``data``: the wanted training data's identity, and
    ``processes``: this launch's, which a finished run's checkpoint must record to be reused (a global batch of
    another count is another run; a resumed one checks both itself)."""
    article = "an" if method[:1].lower() in "aeiou" else "a"
    if differ:
        raise ConfigError(f"{out} holds {article} {method} run with different settings ({', '.join(differ)}); "
                          "use another --out for this comparison")
    res_file = out / "results.json"
    if differ is not None and res_file.is_file():
        res = json.loads(res_file.read_text())
        if res.get("done"):
            saved, made_by = saved_run_record(out)
            if processes is not None and made_by is not None and made_by != processes:
                raise ConfigError(f"{out} holds {article} {method} run trained by {made_by} process"
                                  f"{'es' * (made_by != 1)} and this launch has {processes} (another global "
                                  f"batch): run the comparison in a launch of {made_by}, or use another --out")
            if data is not None and saved is not None and saved != (now := data()):
                from .data import identity_change

                raise ConfigError(f"{out} holds {article} {method} run on other training data"
                                  f"{identity_change(saved, now)}; use another --out for this comparison")
            log(f"{method}: reusing finished run in {out}")
            return res
        if res.get("diverged"):  # it would diverge again: same settings, same seed
            raise DivergedError(res["diverged"])
    resume = differ is not None and has_checkpoint(out)
    log(f"=== {method} ({'resuming' if resume else 'new run'}) -> {out}")
    return run(resume)


def method_list(methods) -> list[str]:
    """A comparison's methods: names in a list, or one comma-separated string as ``--methods`` takes them; each
    once, in order."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    bad = [m for m in methods if not isinstance(m, str)]
    if bad:
        raise ConfigError(f"methods must be names (strings), got {bad[0]!r}")
    if not methods:
        raise ConfigError("no method to compare")
    return list(dict.fromkeys(methods))


def check_seeds(seeds) -> list[int]:
    """A seed comparison's seeds: at least one, none twice (a repeat would read as seeds that agree)."""
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds is empty")
    repeated = next((s for s in seeds if seeds.count(s) > 1), None)
    if repeated is not None:
        raise ConfigError(f"--seeds names {repeated} twice: each seed is one comparison (a repeat would read as "
                          "seeds that agree)")
    return seeds


def seed_rows(per_seed: dict[int, list[dict]], seeds: list[int], keys, describe) -> list[dict]:
    """One row per method over ``seeds``: mean, std and per-seed values of each of ``keys``, plus ``describe(runs)``.

    ``per_seed`` maps a seed to that comparison's rows (one per method, each with ``method``).
    """
    rows = []
    for m in [r["method"] for r in per_seed[seeds[0]]]:
        runs = [next(r for r in per_seed[s] if r["method"] == m) for s in seeds]
        row = {"method": m, "seeds": seeds, **describe(runs)}
        for k in keys:
            vals = [r[k] for r in runs if r.get(k) is not None]
            row[k] = round(statistics.fmean(vals), 4) if vals else None
            row[k + "_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
            row[k + "_per_seed"] = [r.get(k) for r in runs]
        rows.append(row)
    return rows


def run_methods(methods: list[str], run: Callable[[str], dict], reference: str, log: Callable[[str], None] = print
                ) -> tuple[dict[str, dict], dict[str, str]]:
    """``run(method)`` for each method: ``(results, diverged)``, where a method that diverged is set aside with its
    message instead of failing the comparison (the ``reference`` method diverging does fail it)."""
    results, diverged = {}, {}
    for m in methods:
        try:
            results[m] = run(m)
        except DivergedError as e:
            if m == reference:
                raise
            diverged[m] = str(e)
            log(f"{m} diverged; it is left out of the comparison: {e}")
    return results, diverged


def diverged_rows(rows: list[dict], diverged: dict[str, str]) -> list[dict]:
    """``rows`` plus one row per diverged method: no figures, only ``diverged`` (it is never ranked)."""
    keys = rows[0].keys() if rows else ("method",)
    return rows + [{**dict.fromkeys(keys), "method": m, "diverged": msg} for m, msg in diverged.items()]


def budget_matched_run(results: dict[str, dict], baseline: str, methods: list[str], budget_mode: str | None,
                       total_steps: int, run: Callable[[str, int], dict], min_steps: int = 1,
                       log: Callable[[str], None] = print, agree: Callable = lambda choice: choice) -> None:
    """Add ``baseline@budget`` to ``results``: the baseline trained for the wall-clock of the fastest of
    ``methods`` (its steps scaled from the baseline's ``total_steps`` by the measured times; at least
    ``min_steps``), with ``run(name, steps)``. Under a budget (``budget_mode`` describes it) every method had the
    same budget, so the baseline is its own budget-matched run and none is added. ``agree``: the main process's
    choice on every process (each process measured its own times; they must train the same steps)."""
    if budget_mode is not None:
        log(f"budget mode: every method had the same budget ({budget_mode}), so {baseline} is the budget-matched "
            f"baseline itself (no {baseline}{BUDGET_SUFFIX})")
        return
    if not methods:
        return
    fastest = min(methods, key=lambda m: results[m]["summary"]["wall_time_s"])
    ratio = results[fastest]["summary"]["wall_time_s"] / results[baseline]["summary"]["wall_time_s"]
    matched = round(total_steps * ratio)
    fastest, steps = agree((fastest, max(min_steps, matched)))
    name = baseline + BUDGET_SUFFIX
    if steps > matched:  # (the least run: one epoch of pre-training)
        log(f"\n=== {name}: {baseline} for {steps} steps, its least run; the wall-clock of {fastest} is {matched} "
            "of its steps ===")
    else:
        log(f"\n=== {name}: {baseline} for {steps} steps, the wall-clock of {fastest} ===")
    results[name] = run(name, steps)
    results[name]["summary"]["budget_of"] = fastest


def front_runs(baseline: str, fractions: list[float], total_steps: int, run: Callable[[str, int, float], dict],
               log: Callable[[str], None] = print, budget: str | None = None, whole: bool = False
               ) -> dict[str, dict]:
    """The baseline trained at each budget ``fraction`` (< 1) of its ``total_steps``, each with its learning rate
    fully decayed within that budget: ``run(name, steps, fraction)`` for ``name`` like ``original@0.5``.
    ``budget`` (budget mode: the run's budget, described) makes the fractions fractions of it. The whole run
    (fraction 1) is the baseline itself, unless ``whole`` (the baseline does not decay its learning rate, e.g.
    fine-tuning's constant rate): then it is run too, as ``original@1``."""
    out = {}
    for f in fractions:
        if f >= 1 and not whole:
            continue  # the whole run is the baseline itself
        steps = max(1, round(total_steps * f))
        name = front_name(baseline, f) if f < 1 else f"{baseline}{FRONT_SEPARATOR}1"
        log(f"\n=== {name}: the {baseline} run for " + (f"{f:g} of its budget of {budget}" if budget else
            f"{steps} of its {total_steps} steps") + ", learning rate decayed by then")
        try:
            out[name] = run(name, steps, f)
        except DivergedError as e:  # a front point less; the comparison goes on
            log(f"{name} diverged; the front goes without it: {e}")
            continue
        out[name]["summary"]["front_fraction"] = f
    return out


def is_front_run(name: str, baseline: str) -> bool:
    """Whether the row ``name`` is one of the baseline's own runs (the whole run, a front budget, @budget)."""
    return name == baseline or name.startswith(baseline + FRONT_SEPARATOR)


def ratio_fields(summary: dict, baseline: dict) -> dict:
    """A run's ratios against the baseline run, the same in every task: ``speedup`` (the baseline's wall-clock ÷
    the run's), ``flops_speedup`` (the baseline's training FLOPs ÷ the run's: the theoretical speed-up) and
    ``realised_fraction`` (how much of the FLOPs speed-up the wall-clock realises)."""
    t, bt = summary.get("wall_time_s"), baseline.get("wall_time_s")
    speedup = round(bt / t, 4) if t and bt else None
    flops = (summary.get("flops_per_step") or 0) * (summary.get("steps") or 0)
    base_flops = (baseline.get("flops_per_step") or 0) * (baseline.get("steps") or 0)
    flops_speedup = round(base_flops / flops, 4) if flops and base_flops else None
    return {"speedup": speedup, "flops_speedup": flops_speedup,
            "realised_fraction": round(speedup / flops_speedup, 4) if speedup and flops_speedup else None}


def comparison_row(name: str, summary: dict, baseline: dict) -> dict:
    """The fields every task's comparison row has: the run's name, wall-clock, :func:`ratio_fields` against the
    baseline's summary, steps, and which budget it ran for (``budget_of``, ``front_fraction``, ``budget_used``)."""
    return {"method": name, "wall_time_s": summary["wall_time_s"], **ratio_fields(summary, baseline),
            "steps": summary["steps"], "budget_of": summary.get("budget_of"),
            "front_fraction": summary.get("front_fraction"), "budget_used": summary.get("budget", {}).get("used")}


def add_speedups(rows: list[dict], baseline: str, quality: str, higher_is_better: bool) -> Front | None:
    """Set ``tq_speedup`` / ``tq_bound`` on every row: the time-to-quality speed-up against the front drawn by
    the baseline's runs among ``rows`` (see :mod:`autoprog.front`); rows marked ``front`` draw it. Returns the
    front, None when no baseline run has a finite quality (every speed-up is then None)."""
    for r in rows:
        r["front"] = is_front_run(r["method"], baseline) and not r.get("diverged")
    try:
        front = Front([(r["wall_time_s"], r.get(quality)) for r in rows if r["front"]], higher_is_better)
    except ConfigError:  # no baseline run with a finite quality: no speed-up can be read off
        front = None
    for r in rows:
        s = front.speedup(r.get("wall_time_s"), r.get(quality)) if front and not r.get("diverged") else Speedup(None)
        r["tq_speedup"], r["tq_bound"] = s.value, s.bound
    return front


def seed_speedup(runs: list[dict]) -> dict:
    """Per-seed time-to-quality speed-ups of one method, summarised for :func:`seed_rows`' ``describe``."""
    mean = mean_speedup([Speedup(r.get("tq_speedup"), r.get("tq_bound", "=")) for r in runs])
    return {"tq_bound": mean.bound, "tq_bounds_per_seed": [r.get("tq_bound") for r in runs],
            "front": bool(runs[0].get("front"))}
