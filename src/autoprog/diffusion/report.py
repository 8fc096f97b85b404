"""Fine-tuning comparison reports: Table-6-style markdown tables and the FD-against-time curves (Fig. 8)."""

from __future__ import annotations

from pathlib import Path

from ..report import (
    fmt,
    mean_cell,
    plot_curves,
    plot_front,
    schedule_string,
    speedup_cell,
    speedup_mean_cell,
    times,
    with_reading,
)
from .dreambooth import SCORE_LABELS

SPEEDUP_NOTE = ("time-to-quality speed-up: the time full fine-tuning's front (its runs at several budgets, each "
                "with its learning rate fully decayed) needs to reach the method's {metric}, divided by the method's "
                "time; >: beyond the longest budget, <: reached by the shortest already, ~: some seeds outside "
                "the front or without a figure")


def _finetune_name(r: dict) -> str:
    return (r["method"] + (f" (time of {r['budget_of']})" if r.get("budget_of") else "")
            + (" — diverged, not ranked" if r.get("diverged") else ""))


def _params(n) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k")


def quality_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(key, header, format) of the quality columns the rows have: FD and KID, or DreamBooth's scores."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    scores = [(k, label, ".3f") for k, label in SCORE_LABELS.items() if any(r.get(k) is not None for r in rows)]
    fd = [("fd", metric, ".3f"), ("kid", "KID", ".4f")]
    return (fd + scores if any(r.get("fd") is not None for r in rows) else scores) or fd


def finetune_markdown(rows: list[dict], title: str = "") -> str:
    """Table 6 style: one row per method with its speed-ups against full fine-tuning, FD and KID (DreamBooth:
    its scores)."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    cols = quality_columns(rows)
    lines = [f"## {title}", ""] if title else []
    lines += ["| method | time-to-quality speed-up | schedule | wall time (s) | speed-up | FLOPs speed-up | "
              "search (s) | trainable params (mean) | " + " | ".join(h for _, h, _ in cols) + " |",
              "|---|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {_finetune_name(r)} | {speedup_cell(r.get('tq_speedup'), r.get('tq_bound'))} | "
                     f"{schedule_string({'stages': r.get('schedule') or []}) or '–'} | "
                     f"{fmt(r['wall_time_s'], '.1f')} | {times(r.get('speedup'))} | "
                     f"{times(r.get('flops_speedup'))} | "
                     f"{fmt(r.get('search_time_s'), '.1f')} | {_params(r.get('mean_trainable_params'))} | "
                     + " | ".join(fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n\n" + SPEEDUP_NOTE.format(metric=metric) + "\n"


def finetune_seeds_markdown(rows: list[dict], title: str) -> str:

    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    cols = quality_columns(rows)
    lines = [f"## {title}", "", "| method | time-to-quality speed-up | wall time (s) | speed-up | "
                                "FLOPs speed-up | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        tq = speedup_mean_cell(r)
        lines.append(f"| {_finetune_name(r)} | {tq} | {mean_cell(r, 'wall_time_s', '.1f')} | "
                     f"{mean_cell(r, 'speedup', '.2f', '×')} | {mean_cell(r, 'flops_speedup', '.2f', '×')} | "
                     + " | ".join(mean_cell(r, k, f) for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n\n" + SPEEDUP_NOTE.format(metric=metric) + "\n"


def write_finetune_report(summary: dict, out: str | Path) -> None:
    """``summary.md`` and ``fd_curves.png`` (FD against training time, Fig. 8 style) for a fine-tuning comparison."""
    out = Path(out)
    rows = summary["rows"]
    spec = summary.get("spec", {})
    title = (f"{summary['title']}, {spec.get('train', {}).get('steps', '?')} steps, "
             f"seed {spec.get('train', {}).get('seed', '?')}")
    md = finetune_markdown(rows, title)
    if summary.get("reference"):
        md += ("\nThe subject images themselves score " + ", ".join(f"{SCORE_LABELS[k]} {v:.3f}" for k, v in
                                                              summary["reference"].items()) + ".\n")
    (out / "summary.md").write_text(with_reading(md, rows, "full"))
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    key = summary.get("headline", "fd")
    curve_key = "fd_curve" if key == "fd" else key
    curves = {m: [{**p, curve_key: p.get(curve_key, p.get(key))} for p in c] for m, c in summary["curves"].items()}
    plot_curves(curves, out / "fd_curves.png", ylabel=f"{metric}, {spec.get('train', {}).get('curve_samples', '')} samples",
                key=curve_key)
    if summary.get("front"):
        plot_front(rows, [tuple(p) for p in summary["front"]], out / "front.png", key,
                   f"final {metric}, {spec.get('train', {}).get('fd_samples', '')} samples")
