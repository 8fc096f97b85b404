"""Pre-training comparison reports: the Table-3-style markdown tables (one seed, and mean ± std)."""

from __future__ import annotations

from ..report import fmt, mean_cell, speedup_cell, speedup_mean_cell, times


def speedup_note(baseline: str = "original") -> str:
    return (f"time-to-quality speed-up: the time the {baseline}'s front (its runs at several budgets, each with its "
            "learning rate fully decayed) needs to reach the method's top-1, divided by the method's time; "
            ">: beyond the longest budget, <: reached by the shortest already, ~: some seeds outside the front "
            "or without a figure")


def _name(r: dict) -> str:
    name = r["method"] + (f" (budget of {r['budget_of']})" if r.get("budget_of") else "")
    return name + (" — diverged, not ranked" if r.get("diverged") else "")


def summary_markdown(rows: list[dict], title: str = "", baseline: str = "original") -> str:
    """One row per method: time-to-quality speed-up against the ``baseline``'s front, runtime, wall-clock and
    theoretical (FLOPs) speed-up at equal epochs and the share of the second the first realises, top-1, EMA
    top-1."""
    lines = [f"## {title}", ""] if title else []
    size = next((r["eval_size"] for r in rows if r.get("eval_size")), None)  # --eval-size: its column too
    lines += [
        "| method | time-to-quality speed-up | growth | schedule | wall time (s) | speed-up | FLOPs speed-up | "
        "realised / theoretical | top-1 (%) | EMA top-1 (%) |" + (f" top-1 at {size} px (%) |" if size else ""),
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if size else ""),
    ]
    for r in rows:
        lines.append(
            f"| {_name(r)} | {speedup_cell(r.get('tq_speedup'), r.get('tq_bound'))} | {r.get('growth') or '–'} | "
            f"{r.get('schedule_str') or '–'} | {fmt(r['wall_time_s'], '.1f')} | "
            f"{times(r.get('speedup'))} | {times(r.get('flops_speedup'))} | "
            f"{fmt(r.get('realised_fraction'), '.2f')} | {fmt(r.get('top1'), '.2f')} | {fmt(r.get('top1_ema'), '.2f')} |"
            + (f" {fmt(r.get('top1_at_eval_size'), '.2f')} |" if size else "")
        )
    return "\n".join(lines) + "\n\n" + speedup_note(baseline) + "\n"


def seeds_markdown(rows: list[dict], title: str, baseline: str = "original") -> str:
    """Mean ± std over seeds, one row per method."""
    lines = [f"## {title}", "",
             "| method | time-to-quality speed-up | wall time (s) | speed-up | FLOPs speed-up | realised / theoretical "
             "| top-1 (%) | EMA top-1 (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tq = speedup_mean_cell(r)
        lines.append(f"| {_name(r)} | {tq} | {mean_cell(r, 'wall_time_s', '.1f')} | "
                     f"{mean_cell(r, 'speedup', '.2f', '×')} | {mean_cell(r, 'flops_speedup', '.2f', '×')} | "
                     f"{mean_cell(r, 'realised_fraction', '.2f')} | "
                     f"{mean_cell(r, 'top1', '.2f')} | {mean_cell(r, 'top1_ema', '.2f')} |")
    return "\n".join(lines) + "\n\n" + speedup_note(baseline) + "\n"
