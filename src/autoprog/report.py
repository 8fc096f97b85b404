"""What both tasks' reports share: number cells, schedule strings, quality-against-time curves."""

from __future__ import annotations

from pathlib import Path


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


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
