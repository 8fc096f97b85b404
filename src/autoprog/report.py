"""Comparison reports: the Table-3-style markdown table and the accuracy-against-time curves (Fig. 6)."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def summary_markdown(rows: list[dict], title: str = "") -> str:
    """One row per method: runtime, speed-up, theoretical (FLOPs) speed-up, top-1, EMA top-1."""
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| method | growth | schedule | wall time (s) | speed-up | FLOPs speed-up | top-1 (%) | EMA top-1 (%) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["method"] + (f" (budget of {r['budget_of']})" if r.get("budget_of") else "")
        lines.append(
            f"| {name} | {r.get('growth') or '–'} | {r.get('schedule_str') or '–'} | {_fmt(r['wall_time_s'], '.1f')} | "
            f"{_fmt(r.get('speedup'), '.2f')}× | {_fmt(r.get('flops_speedup'), '.2f')}× | "
            f"{_fmt(r.get('top1'), '.2f')} | {_fmt(r.get('top1_ema'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def seeds_markdown(rows: list[dict], title: str) -> str:
    """Mean ± std over seeds, one row per method."""
    def cell(r, k, spec):
        return "–" if r[k] is None else f"{r[k]:{spec}} ± {r[k + '_std']:{spec}}"

    lines = [f"## {title}", "",
             "| method | wall time (s) | speed-up | FLOPs speed-up | realised / theoretical | top-1 (%) | EMA top-1 (%) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["method"] + (f" (budget of {r['budget_of']})" if r.get("budget_of") else "")
        lines.append(f"| {name} | {cell(r, 'wall_time_s', '.1f')} | {cell(r, 'speedup', '.2f')}× | "
                     f"{cell(r, 'flops_speedup', '.2f')}× | {cell(r, 'realised_fraction', '.2f')} | "
                     f"{cell(r, 'top1', '.2f')} | {cell(r, 'top1_ema', '.2f')} |")
    return "\n".join(lines) + "\n"


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


# ------------------------------------------------------------------------------------- fine-tuning
def _finetune_name(r: dict) -> str:
    return r["method"] + (f" (time of {r['budget_of']})" if r.get("budget_of") else "")


def _params(n) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k")


def finetune_markdown(rows: list[dict], title: str = "") -> str:
    """Table 6 style: one row per method with runtime ratio against full fine-tuning, FD and KID."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    lines = [f"## {title}", ""] if title else []
    lines += [f"| method | schedule | wall time (s) | runtime vs full | FLOPs vs full | search (s) | "
              f"trainable params (mean) | {metric} | KID |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_finetune_name(r)} | {schedule_string({'stages': r.get('schedule') or []}) or '–'} | "
                     f"{_fmt(r['wall_time_s'], '.1f')} | {_fmt(r.get('runtime_ratio'), '.2f')}× | "
                     f"{_fmt(r.get('flops_ratio'), '.2f')}× | "
                     f"{_fmt(r.get('search_time_s'), '.1f')} | {_params(r.get('mean_trainable_params'))} | "
                     f"{_fmt(r.get('fd'), '.3f')} | {_fmt(r.get('kid'), '.4f')} |")
    return "\n".join(lines) + "\n"


def finetune_seeds_markdown(rows: list[dict], title: str) -> str:
    def cell(r, k, spec):
        return "–" if r.get(k) is None else f"{r[k]:{spec}} ± {r[k + '_std']:{spec}}"

    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    lines = [f"## {title}", "", f"| method | wall time (s) | runtime vs full | FLOPs vs full | {metric} | KID |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_finetune_name(r)} | {cell(r, 'wall_time_s', '.1f')} | {cell(r, 'runtime_ratio', '.2f')}× | "
                     f"{cell(r, 'flops_ratio', '.2f')}× | "
                     f"{cell(r, 'fd', '.3f')} | {cell(r, 'kid', '.4f')} |")
    return "\n".join(lines) + "\n"


def write_finetune_report(summary: dict, out: str | Path) -> None:
    """``summary.md`` and ``fd_curves.png`` (FD against training time, Fig. 8 style) for a fine-tuning comparison."""
    out = Path(out)
    rows = summary["rows"]
    spec = summary.get("spec", {})
    title = (f"Fine-tuning {spec.get('dataset', '')} classes {spec.get('classes', '')}, "
             f"{spec.get('train', {}).get('steps', '?')} steps, seed {spec.get('train', {}).get('seed', '?')}")
    (out / "summary.md").write_text(finetune_markdown(rows, title))
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    curves = {m: [{**p, "fd_curve": p.get("fd_curve", p.get("fd"))} for p in c] for m, c in summary["curves"].items()}
    plot_curves(curves, out / "fd_curves.png", ylabel=f"{metric}, {spec.get('train', {}).get('curve_samples', '')} samples",
                key="fd_curve")
