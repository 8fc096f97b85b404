"""Pre-training comparison reports: the Table-3-style markdown tables (one seed, and mean ± std)."""

from __future__ import annotations

from ..report import fmt


def summary_markdown(rows: list[dict], title: str = "") -> str:
    """One row per method: runtime, speed-up, theoretical (FLOPs) speed-up, top-1, EMA top-1."""
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| method | growth | schedule | wall time (s) | speed-up | FLOPs speed-up | top-1 (%) | EMA top-1 (%) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["method"] + (f" (budget of {r['budget_of']})" if r.get("budget_of") else "")
        name += " — diverged, not ranked" if r.get("diverged") else ""
        lines.append(
            f"| {name} | {r.get('growth') or '–'} | {r.get('schedule_str') or '–'} | {fmt(r['wall_time_s'], '.1f')} | "
            f"{fmt(r.get('speedup'), '.2f')}× | {fmt(r.get('flops_speedup'), '.2f')}× | "
            f"{fmt(r.get('top1'), '.2f')} | {fmt(r.get('top1_ema'), '.2f')} |"
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
