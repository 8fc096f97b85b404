"""The baseline's time–quality front and time-to-quality speed-up (autoprog.front, experiment.add_speedups)."""

from __future__ import annotations

import math

import pytest

from autoprog.errors import ConfigError
from autoprog.experiment import add_speedups, seed_speedup
from autoprog.front import Front, Speedup, front_name, mean_speedup, parse_fractions
from autoprog.report import speedup_cell


def test_the_front_is_monotone_and_interpolated():
    # 30 s reached 70 %, 60 s only 68 % (noise): a user would have stopped at 30 s, so the front stays at 70 %
    f = Front([(60, 68.0), (10, 50.0), (30, 70.0), (90, 80.0)])
    assert f.envelope == [(10, 50.0), (30, 70.0), (90, 80.0)]
    assert f.time_to(60.0) == (20.0, "=")
    assert f.time_to(75.0) == (60.0, "=")
    assert f.time_to(80.0) == (90.0, "=")
    assert f.speedup(30.0, 75.0) == Speedup(2.0, "=")  # the front needs 60 s for 75 %


def test_outside_the_front_is_a_bound():
    f = Front([(10, 50.0), (40, 70.0)])
    assert f.time_to(90.0) == (40.0, ">") and f.speedup(20.0, 90.0) == Speedup(2.0, ">")
    assert f.time_to(10.0) == (10.0, "<") and f.speedup(20.0, 10.0) == Speedup(0.5, "<")


def test_lower_is_better_for_fd():
    f = Front([(10, 300.0), (20, 200.0), (40, 150.0)], higher_is_better=False)
    assert f.time_to(250.0) == (15.0, "=")
    assert f.speedup(5.0, 175.0) == Speedup(6.0, "=")
    assert f.time_to(100.0)[1] == ">" and f.time_to(400.0)[1] == "<"


def test_runs_without_a_finite_quality_draw_nothing():
    f = Front([(10, None), (20, math.nan), (30, 60.0)])
    assert f.points == [(30.0, 60.0)]
    assert f.speedup(10.0, None).value is None and f.speedup(0.0, 50.0).value is None
    with pytest.raises(ConfigError, match="no finished run"):
        Front([(10, None)])


def test_seed_means_keep_a_common_bound_and_flag_a_mixed_one():
    assert mean_speedup([Speedup(2.0, ">"), Speedup(3.0, ">")]) == Speedup(2.5, ">")
    assert mean_speedup([Speedup(2.0, "="), Speedup(3.0, ">")]) == Speedup(2.5, "~")
    assert mean_speedup([Speedup(None), Speedup(1.5)]) == Speedup(1.5, "~"), "a seed without a figure is flagged"
    assert str(Speedup(1.234, ">")) == ">1.23×" and str(Speedup(1.5)) == "1.50×" and str(Speedup(None)) == "–"
    assert speedup_cell(1.5, "<") == "<1.50×" and speedup_cell(None, "=") == "–"


def test_parse_fractions_and_names():
    assert parse_fractions("0.5, 0.25,1,0.5") == [0.25, 0.5, 1.0]
    assert parse_fractions("") == []
    for bad in ("0", "1.5", "x", "nan"):
        with pytest.raises(ConfigError, match="--front"):
            parse_fractions(bad)
    assert front_name("original", 0.25) == "original@0.25" and front_name("full", 1.0) == "full"


def test_add_speedups_marks_the_front_and_never_ranks_a_diverged_row():
    rows = [{"method": "original", "wall_time_s": 40.0, "top1": 70.0},
            {"method": "original@0.25", "wall_time_s": 10.0, "top1": 50.0},
            {"method": "original@budget", "wall_time_s": 20.0, "top1": 60.0},
            {"method": "prog", "wall_time_s": 15.0, "top1": 65.0},
            {"method": "bad", "wall_time_s": 5.0, "top1": 99.0, "diverged": "the loss is nan"}]
    front = add_speedups(rows, "original", "top1", higher_is_better=True)
    by = {r["method"]: r for r in rows}
    assert [r["front"] for r in rows] == [True, True, True, False, False]
    assert front.envelope == [(10.0, 50.0), (20.0, 60.0), (40.0, 70.0)]
    assert by["prog"]["tq_speedup"] == pytest.approx(2.0) and by["prog"]["tq_bound"] == "="  # front: 30 s for 65 %
    assert by["bad"]["tq_speedup"] is None
    assert by["original"]["tq_speedup"] == pytest.approx(1.0)
    per_seed = seed_speedup([by["prog"], {**by["prog"], "tq_bound": ">"}])
    assert per_seed["tq_bound"] == "~" and per_seed["tq_bounds_per_seed"] == ["=", ">"]


def test_seed_tables_lead_with_the_mean_speedup_and_its_bound():
    from autoprog.classification.report import seeds_markdown
    from autoprog.diffusion.report import finetune_seeds_markdown
    from autoprog.experiment import seed_rows

    def row(method, tq, bound, **kw):
        return {"method": method, "tq_speedup": tq, "tq_bound": bound, "front": method == "original", **kw}

    keys = ("tq_speedup", "wall_time_s", "speedup", "flops_speedup", "realised_fraction", "top1", "top1_ema")
    per_seed = {s: [row("original", 1.0, "=", wall_time_s=10.0, speedup=1.0, flops_speedup=1.0, realised_fraction=1.0,
                        top1=70.0, top1_ema=70.0),
                    row("prog", 1.2 + s / 10, ">", wall_time_s=6.0, speedup=1.6, flops_speedup=1.8,
                        realised_fraction=0.9, top1=71.0, top1_ema=71.0)] for s in (0, 1)}
    rows = seed_rows(per_seed, [0, 1], keys, seed_speedup)
    md = seeds_markdown(rows, "t")
    assert "| prog | >1.25× ± 0.07 |" in md and "| original | 1.00× ± 0.00 |" in md
    ft = [{**r, "fd": 100.0, "fd_std": 1.0, "kid": 1.0, "kid_std": 0.0, "metric": "FD"} for r in rows]
    assert "| prog | >1.25× ± 0.07 |" in finetune_seeds_markdown(ft, "t")
    # every ratio column writes its unit after the mean, as the speed-up's does (they read 1.60 ± 0.00×)
    assert "| 1.60× ± 0.00 | 1.80× ± 0.00 |" in md and "| 1.60× ± 0.00 | 1.80× ± 0.00 |" in \
        finetune_seeds_markdown(ft, "t")


def test_a_ratio_not_counted_reads_as_a_dash():
    """--no-flops leaves the FLOPs speed-up unknown: its cell was '–×'."""
    from autoprog.classification.report import summary_markdown

    md = summary_markdown([{"method": "original", "tq_speedup": 1.0, "tq_bound": "=", "wall_time_s": 1.0,
                            "speedup": 1.0, "flops_speedup": None}], "t")
    assert "| 1.00× | – |" in md and "–×" not in md


def test_reading_says_whether_the_best_method_beats_the_front():
    from autoprog.report import reading

    rows = [{"method": "original", "tq_speedup": 1.0, "tq_bound": "="},
            {"method": "original@0.5", "tq_speedup": 1.0, "tq_bound": "="},
            {"method": "original@budget", "tq_speedup": 1.0, "tq_bound": "="},
            {"method": "prog", "tq_speedup": 1.58, "tq_bound": "="},
            {"method": "autoprog-one", "tq_speedup": 1.2, "tq_bound": "="}]
    line = reading(rows, "original")
    assert line.startswith("reading: prog ") and "1.58×" in line and "pays" in line
    rows[3]["tq_speedup"], rows[4]["tq_speedup"] = 0.6, None
    line = reading(rows, "original")
    assert "no method beats" in line and "prog, 0.60×" in line
    rows[3].update(tq_speedup=1.2, tq_bound="<")
    assert "no method beats" in reading(rows, "original"), "an upper bound above 1 is no claim that it pays"
    rows[3].update(tq_speedup=1.13, tq_bound="~")  # seeds of <1.22× and >1.04×: their mean is no claim either way
    line = reading(rows, "original")
    assert "no verdict from the seed means" in line and "pays" not in line and "~1.13×" in line
    assert reading(rows[:3], "original") is None
    full = [{**r, "method": r["method"].replace("original", "full")} for r in rows]
    full[3].update(tq_speedup=1.3, tq_bound="=")
    assert "sooner than full fine-tuning's front (full fine-tuning for less time" in reading(full, "full")
    full[3].update(tq_speedup=0.8)
    assert "no method beats full fine-tuning for less time" in reading(full, "full") and "fine-tune fully" in \
        reading(full, "full")
    from autoprog.report import with_reading

    md = with_reading("| t |\n", full, "full", " (seed means)")
    assert md.endswith("regime further from its plateau (seed means)\n")
    assert with_reading("| t |\n", full[:3], "full") == "| t |\n"


def test_a_budget_matched_run_floored_at_its_least_says_so():
    """original@budget trains at least one epoch: when the fastest method's wall-clock is fewer steps, the log
    says the run is the least, not that it matches that wall-clock."""
    from autoprog.experiment import budget_matched_run

    results = {"original": {"summary": {"wall_time_s": 100.0}}, "prog": {"summary": {"wall_time_s": 5.0}}}
    lines, runs = [], []
    budget_matched_run(results, "original", ["prog"], None, 80, lambda n, s: runs.append(s) or {"summary": {}},
                       min_steps=8, log=lines.append)
    assert runs == [8] and "original for 8 steps, its least run; the wall-clock of prog is 4 of its steps" in lines[0]
    budget_matched_run(results, "original", ["prog"], None, 800, lambda n, s: runs.append(s) or {"summary": {}},
                       min_steps=8, log=lines.append)
    assert runs[-1] == 40 and lines[-1].endswith("original for 40 steps, the wall-clock of prog ===")
