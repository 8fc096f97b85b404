"""Fine-tuning comparison reports: Table-6-style markdown tables and the FD-against-time curves (Fig. 8)."""

from __future__ import annotations

from pathlib import Path

from ..report import fmt, plot_curves, plot_front, schedule_string, speedup_cell, speedup_mean_cell

SPEEDUP_NOTE = ("time-to-quality speed-up: the time full fine-tuning's front (its runs at several budgets, each "
                "with its learning rate fully decayed) needs to reach the method's {metric}, divided by the method's "
                "time; >: beyond the longest budget, <: reached by the shortest already, ~: some seeds outside "
                "the front or without a figure")


def _finetune_name(r: dict) -> str:
    return (r["method"] + (f" (time of {r['budget_of']})" if r.get("budget_of") else "")
            + (" — diverged, not ranked" if r.get("diverged") else ""))


def _params(n) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k")


def finetune_markdown(rows: list[dict], title: str = "") -> str:
    """Table 6 style: one row per method with runtime ratio against full fine-tuning, FD and KID."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    lines = [f"## {title}", ""] if title else []
    lines += [f"| method | time-to-quality speed-up | schedule | wall time (s) | runtime vs full | FLOPs vs full | "
              f"search (s) | trainable params (mean) | {metric} | KID |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_finetune_name(r)} | {speedup_cell(r.get('tq_speedup'), r.get('tq_bound'))} | "
                     f"{schedule_string({'stages': r.get('schedule') or []}) or '–'} | "
                     f"{fmt(r['wall_time_s'], '.1f')} | {fmt(r.get('runtime_ratio'), '.2f')}× | "
                     f"{fmt(r.get('flops_ratio'), '.2f')}× | "
                     f"{fmt(r.get('search_time_s'), '.1f')} | {_params(r.get('mean_trainable_params'))} | "
                     f"{fmt(r.get('fd'), '.3f')} | {fmt(r.get('kid'), '.4f')} |")
    return "\n".join(lines) + "\n\n" + SPEEDUP_NOTE.format(metric=metric) + "\n"


def finetune_seeds_markdown(rows: list[dict], title: str) -> str:
    def cell(r, k, spec):
        return "–" if r.get(k) is None else f"{r[k]:{spec}} ± {r[k + '_std']:{spec}}"

    metric = next((r["metric"] for r in rows if r.get("metric")), "FD")
    lines = [f"## {title}", "", f"| method | time-to-quality speed-up | wall time (s) | runtime vs full | "
                                f"FLOPs vs full | {metric} | KID |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tq = speedup_mean_cell(r)
        lines.append(f"| {_finetune_name(r)} | {tq} | {cell(r, 'wall_time_s', '.1f')} | "
                     f"{cell(r, 'runtime_ratio', '.2f')}× | {cell(r, 'flops_ratio', '.2f')}× | "
                     f"{cell(r, 'fd', '.3f')} | {cell(r, 'kid', '.4f')} |")
    return "\n".join(lines) + "\n\n" + SPEEDUP_NOTE.format(metric=metric) + "\n"


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
    if summary.get("front"):
        plot_front(rows, [tuple(p) for p in summary["front"]], out / "front.png", "fd",
                   f"final {metric}, {spec.get('train', {}).get('fd_samples', '')} samples")
