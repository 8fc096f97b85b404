"""Text SID: stage-tagged captions (Sec. 4.1.2)."""

import pytest

from autoprog.diffusion.prompts import DEFAULT_IDENTIFIERS, StagePrompts
from autoprog.errors import ConfigError


def test_each_stage_has_its_own_identifier_and_sampling_uses_the_last():
    p = StagePrompts(4)
    caps = [p.prompt("flower", k) for k in range(4)]
    assert caps[0] == f"a flower, {DEFAULT_IDENTIFIERS[0]} stage"
    assert len(set(caps)) == 4
    assert p.prompt("flower") == caps[3]
    assert p.prompts(["bird", "car"], 1) == [f"a bird, {DEFAULT_IDENTIFIERS[1]} stage",
                                             f"a car, {DEFAULT_IDENTIFIERS[1]} stage"]


def test_without_sid_the_caption_is_the_plain_class_prompt():
    assert StagePrompts(4, enabled=False).prompt(" bird ", 2) == "a bird"


@pytest.mark.parametrize("kwargs, msg", [
    ({"num_stages": 0}, "at least one stage"),
    ({"num_stages": 3, "identifiers": ("a", "b")}, "need as many"),
    ({"num_stages": 2, "identifiers": ("a", "a")}, "distinct"),
    ({"num_stages": 2, "identifiers": ("a", "b c")}, "one non-empty word"),
])
def test_bad_identifiers_are_refused(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        StagePrompts(**kwargs)


def test_unknown_stage_and_empty_noun_are_refused():
    p = StagePrompts(2, identifiers=("x1", "y2"))
    with pytest.raises(ConfigError, match="stage 3 does not exist"):
        p.prompt("dog", 2)
    with pytest.raises(ConfigError, match="class noun"):
        p.prompt("  ")
