"""What both tasks' reports share: number cells, schedule strings, quality-against-time curves."""

from __future__ import annotations

from pathlib import Path


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def times(v, spec: str = ".2f") -> str:
    """A ratio cell: ``1.42×``, or ``–`` when unknown (no FLOPs counted: ``--no-flops``)."""
    return "–" if v is None else f"{v:{spec}}×"


def mean_cell(row: dict, key: str, spec: str, unit: str = "") -> str:
    """A seed mean with its std, the unit after the mean as a single run's cell has it: ``1.42× ± 0.10``."""
    return "–" if row.get(key) is None else f"{row[key]:{spec}}{unit} ± {row.get(key + '_std', 0.0):{spec}}"


def schedule_string(schedule: dict) -> str:
    return " → ".join(f"{s['resolution']}px·{s['depth']}" for s in schedule.get("stages", []))


def plot_curves(histories: dict[str, list[dict]], path: str | Path, ylabel: str = "top-1 (%)",
                key: str = "top1") -> None:
    """Metric against cumulative training time, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, hist in histories.items():
        pts = [(h["train_time_s"], h[key]) for h in hist if h.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=method)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def speedup_cell(value, bound: str | None) -> str:
    """A time-to-quality speed-up cell: ``1.42×``, ``>1.10×`` (beyond the front), ``<0.80×`` (before it)."""
    if value is None:
        return "–"
    return f"{'' if bound in (None, '=') else bound}{value:.2f}×"


BASELINE_WORDS = {"original": ("the original", "train the original"), "full": ("full fine-tuning", "fine-tune fully")}


def reading(rows: list[dict], baseline: str) -> str | None:
    """One line that reads a comparison: whether the best method beats training ``baseline`` for less time."""
    ranked = [r for r in rows if r["method"] != baseline and "@" not in r["method"]  # not the baseline's own runs
              and r.get("tq_speedup") is not None]
    if not ranked:
        return None
    noun, verb = BASELINE_WORDS.get(baseline, (f"the {baseline}", f"train the {baseline}"))
    best = max(ranked, key=lambda r: r["tq_speedup"])
    cell = speedup_cell(best["tq_speedup"], best.get("tq_bound"))
    if best.get("tq_bound") == "~":  # a seed mean of exact figures and bounds (or of fewer seeds): no verdict
        return (f"reading: no verdict from the seed means: {best['method']}'s speed-up ({cell}) averages figures of "
                "different kinds (bounds beyond or before the front, or a diverged seed); read the per-seed rows")
    if best["tq_speedup"] >= 1.0 and best.get("tq_bound") != "<":
        return (f"reading: {best['method']} reaches its quality {cell} sooner than {noun}'s front ({noun} for "
                f"less time, learning rate decayed): {best['method']} pays here")
    return (f"reading: no method beats {noun} for less time here (best: {best['method']}, {cell}); for this budget "
            f"{verb} (--budget), or a regime further from its plateau")


def with_reading(md: str, rows: list[dict], baseline: str, note: str = "") -> str:
    """A comparison's markdown summary ended by its :func:`reading` line (``note`` after it), when it has one."""
    line = reading(rows, baseline)
    return md if line is None else md.rstrip("\n") + f"\n\n{line}{note}\n"


def speedup_mean_cell(row: dict) -> str:
    """A seed-mean time-to-quality speed-up with its std: ``1.42× ± 0.10``."""
    if row.get("tq_speedup") is None:
        return "–"
    return f"{speedup_cell(row['tq_speedup'], row.get('tq_bound'))} ± {row.get('tq_speedup_std', 0.0):.2f}"


def plot_front(rows: list[dict], envelope: list[tuple[float, float]], path: str | Path, quality: str,
               ylabel: str) -> None:
    """The baseline's time–quality front (its runs and their monotone envelope) and every other method as one
    point on the same axes: a method above-left of the front (top-1) or below-left (FD) beats the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    front = [(r["wall_time_s"], r[quality]) for r in rows if r.get("front") and r.get(quality) is not None]
    if front:
        ax.scatter(*zip(*front), color="0.4", s=18, zorder=2, label="baseline runs")
    if envelope:
        ax.plot(*zip(*envelope), color="0.4", linestyle="--", zorder=1, label="baseline front")
    for r in rows:
        if r.get("front") or r.get(quality) is None or r.get("wall_time_s") is None:
            continue
        ax.scatter([r["wall_time_s"]], [r[quality]], s=36, zorder=3,
                   label=f"{r['method']} ({speedup_cell(r.get('tq_speedup'), r.get('tq_bound'))})")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
