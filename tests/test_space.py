"""The growth space Ω (ratios, rounding) and sub-network validation."""

from __future__ import annotations

import pytest

from autoprog.errors import ConfigError
from autoprog.space import GrowthSpace, SubNet, round_half_up


def test_round_half_up_rounds_halves_upward():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 4.5, 2.49, 2.51)] == [1, 2, 3, 5, 2, 3]


@pytest.mark.parametrize(
    "start, expected",
    [
        (0.5, [0.5, 2 / 3, 5 / 6, 1.0]),
        (0.25, [0.25, 0.5, 0.75, 1.0]),
        (0.4, [0.4, 0.6, 0.8, 1.0]),
    ],
)
def test_ratios_are_equispaced_up_to_one(start, expected):
    space = GrowthSpace(28, 4, 6, num_stages=4, start_ratio=start)
    assert space.ratios() == pytest.approx(expected)


def test_ratios_for_other_stage_counts():
    assert GrowthSpace(28, 4, 6, num_stages=1).ratios() == [1.0]
    assert GrowthSpace(28, 4, 6, num_stages=2, start_ratio=0.5).ratios() == pytest.approx([0.5, 1.0])
    assert GrowthSpace(28, 4, 6, num_stages=3, start_ratio=0.5).ratios() == pytest.approx([0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    "start, resolutions, depths",
    [
        # 7 patches/side: 3.5→4, 4.67→5, 5.83→6, 7; depth 6: 3, 4, 5, 6
        (0.5, [16, 20, 24, 28], [3, 4, 5, 6]),
        # 1.75→2, 3.5→4, 5.25→5, 7; depth 1.5→2, 3, 4.5→5 (not 4: halves round up), 6
        (0.25, [8, 16, 20, 28], [2, 3, 5, 6]),
        # 2.8→3, 4.2→4, 5.6→6, 7; depth 2.4→2, 3.6→4, 4.8→5, 6
        (0.4, [12, 16, 24, 28], [2, 4, 5, 6]),
    ],
)
def test_resolutions_and_depths_are_rounded_to_valid_values(start, resolutions, depths):
    space = GrowthSpace(28, 4, 6, start_ratio=start)
    assert space.resolutions() == resolutions
    assert space.depths() == depths
    assert all(r % 4 == 0 for r in space.resolutions())
    subnets = [space.subnet(r) for r in space.ratios()]
    assert [s.resolution for s in subnets] == resolutions
    assert [s.depth for s in subnets] == depths


def test_deit_sized_space():
    space = GrowthSpace(224, 16, 12, start_ratio=0.5)
    assert space.resolutions() == [112, 144, 192, 224]
    assert space.depths() == [6, 8, 10, 12]
    assert space.full == SubNet(224, 12)


def test_tiny_ratios_are_clamped_to_at_least_one_patch_and_block():
    space = GrowthSpace(28, 4, 2, start_ratio=0.05)
    first = space.subnet(space.ratios()[0])
    assert first == SubNet(4, 1)
    assert space.resolution_for(1.0) == 28 and space.depth_for(1.0) == 2


def test_resolution_set_deduplicates():
    # 2 patches per side cannot take 4 distinct values
    space = GrowthSpace(8, 4, 2, num_stages=4, start_ratio=0.5)
    assert space.resolutions() == [4, 8]
    assert space.depths() == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(full_resolution=30, patch_size=4, full_depth=6),  # not divisible
        dict(full_resolution=28, patch_size=0, full_depth=6),
        dict(full_resolution=28, patch_size=4, full_depth=0),
        dict(full_resolution=28, patch_size=4, full_depth=6, num_stages=0),
        dict(full_resolution=28, patch_size=4, full_depth=6, start_ratio=0.0),
        dict(full_resolution=28, patch_size=4, full_depth=6, start_ratio=1.5),
    ],
)
def test_invalid_growth_space_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        GrowthSpace(**kwargs)


def test_image_size_not_divisible_by_patch_size_message():
    with pytest.raises(ConfigError, match="not divisible"):
        GrowthSpace(30, 4, 6)


def test_subnet_defaults_to_first_blocks_and_roundtrips():
    s = SubNet(16, 3)
    assert s.active_blocks == (0, 1, 2)
    assert s.num_patches(4) == 16
    assert SubNet.from_dict(s.to_dict()) == s
    t = SubNet(20, 3, blocks=[0, 2, 5])
    assert t.blocks == (0, 2, 5) and t.active_blocks == (0, 2, 5)
    assert t.to_dict() == {"resolution": 20, "depth": 3, "blocks": [0, 2, 5]}
    assert SubNet.from_dict(t.to_dict()) == t


@pytest.mark.parametrize(
    "args",
    [
        (0, 2),  # resolution must be positive
        (16, 0),  # depth at least 1
        (16, 2, (0, 1, 2)),  # 3 blocks listed, depth 2
        (16, 2, (1, 1)),  # block listed twice
    ],
)
def test_invalid_subnet_raises_config_error(args):
    with pytest.raises(ConfigError):
        SubNet(*args)


@pytest.mark.parametrize("d", [{"depth": 2}, {"resolution": "x", "depth": 2}, {"resolution": 16, "depth": None}])
def test_malformed_subnet_dict_raises_config_error(d):
    with pytest.raises(ConfigError):
        SubNet.from_dict(d)


@pytest.mark.parametrize(
    "subnet",
    [
        SubNet(18, 2),  # not a multiple of the patch size
        SubNet(32, 2),  # larger than the model's resolution
        SubNet(28, 7),  # deeper than the model
        SubNet(28, 2, blocks=(0, 6)),  # block index out of range
        SubNet(28, 2, blocks=(-1, 0)),
    ],
)
def test_validate_rejects_subnets_that_do_not_fit(subnet):
    with pytest.raises(ConfigError):
        GrowthSpace(28, 4, 6).validate(subnet)


def test_validate_accepts_fitting_subnets():
    space = GrowthSpace(28, 4, 6)
    for s in (SubNet(4, 1), SubNet(28, 6), SubNet(16, 3, blocks=(5, 0, 2))):
        space.validate(s)  # no error


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        SubNet(16, 0)
