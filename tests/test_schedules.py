"""Manual schedules (Prog, ProgStack), stage boundaries, and schedule.json replay."""

from __future__ import annotations

import json

import pytest

from autoprog.errors import ConfigError
from autoprog.schedules import Schedule, Stage, build_schedule, original, prog, progstack
from autoprog.space import GrowthSpace, SubNet

SPACE = GrowthSpace(28, 4, 6, num_stages=4, start_ratio=0.5)


def _subnets(s: Schedule):
    return [(st.subnet.resolution, st.subnet.depth) for st in s.stages]


def test_prog_stages_28px_patch4_depth6():
    s = build_schedule("prog", SPACE)
    assert s.method == "prog"
    assert _subnets(s) == [(16, 3), (20, 4), (24, 5), (28, 6)]
    assert [st.fraction for st in s.stages] == pytest.approx([0.25] * 4)
    assert s.default_growth == "mogrow"


def test_prog_with_other_start_ratio_and_stage_count():
    s = prog(GrowthSpace(28, 4, 6, num_stages=3, start_ratio=0.25))
    assert _subnets(s) == [(8, 2), (16, 4), (28, 6)]  # ratios 0.25, 0.625 (7·0.625 = 4.375 → 4), 1
    assert [st.fraction for st in s.stages] == pytest.approx([1 / 3] * 3)


def test_original_is_the_full_model_throughout():
    s = build_schedule("original", SPACE)
    assert _subnets(s) == [(28, 6)]
    assert s.stages[0].fraction == pytest.approx(1.0)
    assert s.boundaries(10) == [0]
    assert s is not None and original(SPACE).stages == s.stages


@pytest.mark.parametrize("depth, depths", [(6, [2, 3, 6]), (12, [3, 6, 12]), (8, [2, 4, 8]), (4, [1, 2, 4])])
def test_progstack_depths_and_1_2_5_fractions(depth, depths):
    s = build_schedule("progstack", GrowthSpace(28, 4, depth))
    assert [st.subnet.depth for st in s.stages] == depths
    assert all(st.subnet.resolution == 28 for st in s.stages), "ProgStack grows depth only"
    assert [st.fraction for st in s.stages] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    assert s.default_growth == "stacking"


def test_boundaries_and_stage_at():
    s = prog(SPACE)
    assert s.boundaries(16) == [0, 4, 8, 12]
    assert [s.stage_at(i, 16) for i in range(16)] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert s.boundaries(10) == [0, 3, 5, 8]  # 2.5 → 3, 7.5 → 8: halves round up
    assert [s.stage_at(i, 10) for i in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    ps = progstack(SPACE)
    assert ps.boundaries(80) == [0, 10, 30]
    assert ps.stage_at(9, 80) == 0 and ps.stage_at(10, 80) == 1 and ps.stage_at(29, 80) == 1
    assert ps.stage_at(30, 80) == 2 and ps.stage_at(79, 80) == 2


def test_very_few_steps_skip_empty_stages():
    s = prog(SPACE)
    assert s.boundaries(3) == [0, 1, 2, 2]  # stage 3 is empty
    assert [s.stage_at(i, 3) for i in range(3)] == [0, 1, 3]


@pytest.mark.parametrize("stages, total", [(4, 1), (4, 2), (6, 3)])
def test_last_stage_is_never_empty(stages, total):
    s = prog(GrowthSpace(28, 4, 6, num_stages=stages, start_ratio=0.25))
    assert s.boundaries(total)[-1] < total
    assert s.stage_at(total - 1, total) == len(s.stages) - 1


def test_last_stage_is_reached_when_it_has_half_a_step_or_more():
    for total in range(3, 40):
        for s in (prog(SPACE), progstack(SPACE)):
            assert s.boundaries(total)[-1] < total, (s.method, total)
            assert s.stage_at(total - 1, total) == len(s.stages) - 1


def test_fractions_are_normalised():
    s = Schedule("x", (Stage(SubNet(16, 3), 1.0), Stage(SubNet(28, 6), 3.0)))
    assert [st.fraction for st in s.stages] == pytest.approx([0.25, 0.75])


def test_save_load_roundtrip(tmp_path):
    s = Schedule("custom", (Stage(SubNet(16, 2, blocks=(0, 5)), 0.2), Stage(SubNet(20, 4), 0.3),
                            Stage(SubNet(28, 6), 0.5)), default_growth="identity")
    p = tmp_path / "schedule.json"
    s.save(p)
    d = json.loads(p.read_text())
    assert d["format"] == "autoprog-schedule/1" and d["method"] == "custom" and d["growth"] == "identity"
    assert d["stages"][0] == {"resolution": 16, "depth": 2, "blocks": [0, 5], "fraction": 0.2}
    loaded = Schedule.load(p)
    assert loaded.method == "fixed"
    assert loaded.default_growth == "identity"
    assert [st.subnet for st in loaded.stages] == [st.subnet for st in s.stages]
    assert [st.fraction for st in loaded.stages] == pytest.approx([0.2, 0.3, 0.5])


def test_fixed_replays_a_saved_schedule(tmp_path):
    p = tmp_path / "schedule.json"
    orig = build_schedule("prog", SPACE)
    orig.save(p)
    replay = build_schedule("fixed", SPACE, str(p))
    assert replay.method == "fixed"
    assert [st.subnet for st in replay.stages] == [st.subnet for st in orig.stages]
    assert [st.fraction for st in replay.stages] == pytest.approx([st.fraction for st in orig.stages])
    assert replay.boundaries(16) == orig.boundaries(16)
    assert replay.default_growth == orig.default_growth
    ps = tmp_path / "ps.json"
    progstack(SPACE).save(ps)
    assert build_schedule("fixed", SPACE, str(ps)).default_growth == "stacking"


def test_fixed_schedule_without_fractions_splits_evenly(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"stages": [{"resolution": 16, "depth": 3}, {"resolution": 28, "depth": 6}]}))
    s = build_schedule("fixed", SPACE, str(p))
    assert [st.fraction for st in s.stages] == pytest.approx([0.5, 0.5])
    assert s.default_growth == "mogrow"


def test_shrinking_schedule_raises():
    with pytest.raises(ConfigError, match="shrink"):
        Schedule("x", (Stage(SubNet(28, 6), 0.5), Stage(SubNet(28, 3), 0.5)))
    with pytest.raises(ConfigError, match="shrink"):
        Schedule("x", (Stage(SubNet(28, 3), 0.5), Stage(SubNet(16, 6), 0.5)))


def test_shrinking_schedule_file_raises(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"stages": [{"resolution": 28, "depth": 6, "fraction": 0.5},
                                        {"resolution": 16, "depth": 3, "fraction": 0.25},
                                        {"resolution": 28, "depth": 6, "fraction": 0.25}]}))
    with pytest.raises(ConfigError):
        build_schedule("fixed", SPACE, str(p))


@pytest.mark.parametrize("last", [{"resolution": 24, "depth": 6}, {"resolution": 28, "depth": 5}])
def test_last_stage_must_be_the_full_model(tmp_path, last):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"stages": [{"resolution": 16, "depth": 3, "fraction": 0.5}, {**last, "fraction": 0.5}]}))
    with pytest.raises(ConfigError, match="full model"):
        build_schedule("fixed", SPACE, str(p))


def test_schedule_that_does_not_fit_the_model_raises(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"stages": [{"resolution": 18, "depth": 3}, {"resolution": 28, "depth": 6}]}))
    with pytest.raises(ConfigError):
        build_schedule("fixed", SPACE, str(p))
    # a schedule made for a deeper model does not fit this one
    deeper = tmp_path / "deeper.json"
    prog(GrowthSpace(28, 4, 8)).save(deeper)
    with pytest.raises(ConfigError):
        build_schedule("fixed", SPACE, str(deeper))


@pytest.mark.parametrize("content", [
    "{not json",
    "[]",
    json.dumps({"stages": []}),
    json.dumps({"stages": [1, 2]}),
    json.dumps({"stages": [{"resolution": 28}]}),
    json.dumps({"stages": [{"resolution": 28, "depth": 6, "fraction": "half"}]}),
    json.dumps({"stages": [{"resolution": 16, "depth": 3, "fraction": 0}, {"resolution": 28, "depth": 6}]}),
])
def test_invalid_schedule_files_raise_config_error(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ConfigError):
        build_schedule("fixed", SPACE, str(p))


def test_missing_schedule_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_schedule("fixed", SPACE, str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError):
        build_schedule("fixed", SPACE, str(tmp_path))  # a directory is not a schedule file


@pytest.mark.parametrize("path", [None, ""])
def test_fixed_without_path_raises(path):
    with pytest.raises(ConfigError, match="--schedule"):
        build_schedule("fixed", SPACE, path)


def test_a_method_without_a_schedule_in_advance_raises():
    for method in ("autoprog-two", "autoprog-one"):
        with pytest.raises(ConfigError, match="no schedule fixed in advance"):
            build_schedule(method, SPACE)


def test_empty_or_nonpositive_schedules_raise():
    with pytest.raises(ConfigError):
        Schedule("x", ())
    with pytest.raises(ConfigError):
        Schedule("x", (Stage(SubNet(28, 6), -1.0),))


def test_inline_schedule_equal_stages_matches_prog():
    s = build_schedule("fixed", SPACE, "16x3,20x4,24x5,28x6")
    assert s.method == "fixed"
    assert [(st.subnet.resolution, st.subnet.depth) for st in s.stages] == [(16, 3), (20, 4), (24, 5), (28, 6)]
    assert [st.fraction for st in s.stages] == pytest.approx([0.25] * 4)


def test_inline_schedule_with_fractions_is_normalised():
    s = Schedule.parse("16x6@1, 28X6@3")
    assert [(st.subnet.resolution, st.subnet.depth) for st in s.stages] == [(16, 6), (28, 6)]
    assert [st.fraction for st in s.stages] == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("text, match", [
    ("16x3,28", "malformed"),
    ("16x3;28x6", "malformed"),
    ("16x3@0.5,28x6", "every stage or for none"),
    ("28x6,16x3", "shrink"),
    ("16x0,28x6", "depth"),
    ("16x3@0,28x6@1", "positive"),
])
def test_bad_inline_schedules_raise(text, match):
    with pytest.raises(ConfigError, match=match):
        Schedule.parse(text)


def test_inline_schedule_must_fit_the_model():
    with pytest.raises(ConfigError, match="full model"):
        build_schedule("fixed", SPACE, "16x3,24x6")


def test_from_arg_prefers_an_existing_file_and_names_a_missing_one(tmp_path):
    p = tmp_path / "16x3,28x6"  # a file whose name looks inline is still read as a file
    Schedule.parse("20x3,28x6").save(p)
    assert Schedule.from_arg(str(p)).stages[0].subnet.resolution == 20
    assert Schedule.from_arg(str(p), "prog").method == "prog"
    with pytest.raises(ConfigError, match="does not exist"):
        Schedule.from_arg(str(tmp_path / "missing.json"))
