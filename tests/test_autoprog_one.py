"""AutoProg-One (Sec. 3.2, Algorithm 1): the weight-nesting elastic supernet (Definition 3.1), the growth
space Λ_k of each stage (Appendix B), the L·T^α score (Eq. 9), distributed-safe candidate sampling, weight
recycling, and the command line end to end (pretrain, schedule replay, resume, compare)."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fake_cuda_events, replay_fixed, tiny_args, tiny_vit
from safetensors.torch import load_file

from autoprog.algorithms import autoprog_one
from autoprog.algorithms.autoprog_one import AutoProgOne, AutoProgOneConfig
from autoprog.algorithms.elastic import ElasticLayout, argmin_score, choose_alpha, sample_index, scores
from autoprog.algorithms.growth import Interpolation, depth_mapping
from autoprog.errors import ConfigError
from autoprog.models.vit import VisionTransformer
from autoprog.schedules import Schedule
from autoprog.space import MAX_CANDIDATES, GrowthSpace, SubNet, candidates

SPACE6 = GrowthSpace(28, 4, 6)  # Ω: resolutions 16, 20, 24, 28; depths 3, 4, 5, 6
CAND_KEYS = {"resolution", "depth", "loss", "step_time_s", "score", "chosen"}


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _rd(stages) -> list[tuple[int, int]]:
    return [(s["resolution"], s["depth"]) for s in stages]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FakeTrainer:
    """A trainer that trains nothing: the services of :class:`autoprog.controllers.GrowthServices`, recording
    what a controller asks for."""

    def __init__(self, steps_per_epoch: int = 8, space: GrowthSpace | None = None):
        self.steps_per_epoch = steps_per_epoch
        self.step = 0
        self.stage = -1
        self.space = space or GrowthSpace(28, 4, 8)
        self.applied: list[SubNet] = []
        self.logs: list[dict] = []
        self.printed: list[str] = []

    def growth_space(self):
        return GrowthSpace(self.space.full_resolution, self.space.patch_size, self.space.full_depth)

    def use_subnet(self, s):
        self.applied.append(s)

    def enter_subnet(self, s):
        return {"growth": self.grow_to(s) if self.stage >= 0 else self.use_subnet(s)}

    def describe(self, s):
        return str(s)

    def grow_to(self, dst, block_map=None, inserted=None):
        self.applied.append(dst)
        return None

    def relayout(self, block_map, dst):
        self.applied.append(dst)

    def snapshot(self):
        return {}

    def restore(self, snap):
        pass

    def candidate_loss(self, subnet, samples, part=0, parts=1, momentum=False):
        return 1.0 / (subnet.resolution * subnet.depth)

    def measure_step_time(self, subnet, repeats=3):
        return 1e-3 * subnet.resolution * subnet.depth

    def elapsed(self):
        return 0.0

    def broadcast(self, obj):
        return obj

    def log_stage(self, info):
        self.logs.append(info)

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def test_fake_trainer_offers_the_protocol():
    """The fake drives controllers through the written protocol, not through private trainer attributes."""
    from autoprog.controllers import GrowthServices, TrainerServices, check_services

    assert isinstance(FakeTrainer(), GrowthServices) and isinstance(FakeTrainer(), TrainerServices)
    check_services(FakeTrainer(), GrowthServices)

    class Partial:
        step = stage = steps_per_epoch = 0

    with pytest.raises(ConfigError, match="does not offer .*grow_to"):
        check_services(Partial(), GrowthServices)


# ============================================================================ 1. weight nesting
def _roots(layout: ElasticLayout, blocks) -> list[int]:
    """The original block (0..base-1) each physical block descends from."""
    src = layout.source_map()

    def root(p):
        while p >= layout.base_depth:
            p = src[p]
        return p

    return [root(b) for b in blocks]


def test_layout_examples_from_the_issue():
    lay = ElasticLayout(4, 6)
    assert lay.blocks(4) == (0, 1, 2, 3)
    assert lay.blocks(5) == (0, 1, 2, 3, 4)  # the first copy is of the final block, right after it
    assert lay.blocks(6) == (0, 1, 2, 5, 3, 4)  # the second copies block 2, right after it
    assert lay.inserted() == [(4, 3), (5, 2)]
    assert lay.source_map() == {4: 3, 5: 2}


def test_layout_more_than_doubling():
    lay = ElasticLayout(2, 6)
    assert lay.blocks(2) == (0, 1)
    assert lay.blocks(3) == (0, 1, 2)
    assert lay.blocks(4) == (0, 3, 1, 2)
    assert lay.blocks(5) == (0, 3, 1, 2, 4)  # the second round starts again from the end, copying a copy
    assert lay.blocks(6) == (0, 3, 5, 1, 2, 4)
    assert _roots(lay, lay.blocks(6)) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("base", range(1, 8))
def test_layout_is_weight_nesting(base):
    for max_depth in range(base, 3 * base + 3):
        lay = ElasticLayout(base, max_depth)
        assert lay.blocks(base) == tuple(range(base))
        assert sorted(lay.blocks(max_depth)) == list(range(max_depth)), "the largest uses every block once"
        assert [p for p, _ in lay.inserted()] == list(range(base, max_depth))
        if max_depth > base:
            assert lay.inserted()[0] == (base, base - 1), "insertion starts from the final layer"
        for d in range(base, max_depth + 1):
            blocks = lay.blocks(d)
            assert len(blocks) == len(set(blocks)) == d
            # Definition 3.1: a smaller candidate's weights are a subset of every larger one's, and
            # (inserting *in between*) its blocks keep their order
            for d2 in range(d, max_depth + 1):
                bigger = lay.blocks(d2)
                assert set(blocks) <= set(bigger)
                assert [b for b in bigger if b in set(blocks)] == list(blocks)
            # every copy runs right after its source lineage: lineages are contiguous and in order,
            # and the extra copies (one per block per round) go to the final blocks first
            roots = _roots(lay, blocks)
            assert roots == sorted(roots)
            q, rem = divmod(d, base)
            counts = collections.Counter(roots)
            assert [counts[j] for j in range(base)] == [q + (j >= base - rem) for j in range(base)]


def test_layout_rejects_bad_depths():
    with pytest.raises(ConfigError):
        ElasticLayout(0, 3)
    with pytest.raises(ConfigError):
        ElasticLayout(4, 3)
    lay = ElasticLayout(3, 5)
    for d in (2, 6):
        with pytest.raises(ConfigError):
            lay.blocks(d)


def _standalone_vit(net, blocks, img_size=28) -> VisionTransformer:
    """A separately built VisionTransformer of depth len(blocks) with ``net``'s stem/norm/head and, in order,
    the weights of ``net``'s physical ``blocks``."""
    ref = VisionTransformer(img_size=img_size, patch_size=4, in_chans=1, num_classes=10, embed_dim=16,
                            depth=len(blocks), num_heads=2)
    sd = {k: v for k, v in net.model.state_dict().items() if not k.startswith("blocks.")}
    for j, b in enumerate(blocks):
        sd.update({f"blocks.{j}.{k}": v for k, v in net.model.blocks[b].state_dict().items()})
    ref.load_state_dict(sd)  # strict: exactly the same parameters
    return ref.eval()


def _grow_supernet(base: int, full: int, block_map: dict | None = None):
    """A tiny ViT with distinct random blocks, grown by ``block_map`` (default: the layout's source map)
    into an elastic supernet of ``full`` blocks; also returns the blocks' weights before growing."""
    torch.manual_seed(0)
    net = tiny_vit(depth=full).eval()
    before = [{k: v.clone() for k, v in blk.state_dict().items()} for blk in net.blocks]
    lay = ElasticLayout(base, full)
    block_map = lay.source_map() if block_map is None else block_map
    result = Interpolation().apply(net, None, block_map, [p for p, _ in lay.inserted()])
    assert result.gated == []
    return net, lay, before



@pytest.mark.parametrize("base, full", [
    (3, 6), (4, 6), (2, 4),
    (2, 6), (2, 5),
])
def test_inserted_blocks_start_as_copies_of_their_lineage(base, full):
    net, lay, before = _grow_supernet(base, full)
    roots = _roots(lay, range(full))
    for pos in range(full):
        copied = _same(net.blocks[pos].state_dict(), before[roots[pos]])
        assert copied, f"block {pos} should copy block {roots[pos]}"


def test_controller_grows_the_supernet_from_the_previous_choice():
    """Stage 2 after choosing 2 blocks: candidates of 2..6 blocks, so depth more than doubles."""
    space = GrowthSpace(28, 4, 6, 4, 0.25)
    ctrl = AutoProgOne(space, AutoProgOneConfig(search_epochs=1, search_min_updates=1), seed=0)
    tr = FakeTrainer()
    calls = []
    tr.grow_to = lambda dst, block_map=None, inserted=None: calls.append((dst, block_map, inserted))
    ctrl.setup(tr, 64)
    ctrl.chosen = [SubNet(16, 2)]
    ctrl.enter_stage(tr, 1)
    (top, block_map, inserted), = calls
    assert top == SubNet(20, 6, (0, 3, 5, 1, 2, 4)) and sorted(inserted) == [2, 3, 4, 5]  # Ω's depths 2, 3, 5, 6
    net, lay, before = _grow_supernet(2, 6, block_map)
    for pos, root in zip(range(6), _roots(lay, range(6))):
        copied = _same(net.blocks[pos].state_dict(), before[root])
        assert copied, f"block {pos} should copy block {root}"


@pytest.mark.parametrize("base, full", [(3, 6), (2, 6), (4, 6)])
def test_supernet_subnets_are_standalone_networks(base, full):
    net, lay, _ = _grow_supernet(base, full)
    with torch.no_grad():  # supernet training: the copies drift apart from their sources
        for p in net.blocks.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for d in range(base, full + 1):
        for res in (16, 28):
            x = torch.randn(3, 1, res, res)
            net.apply_subnet(SubNet(res, d, lay.blocks(d)))
            with torch.no_grad():
                out, ref = net(x), _standalone_vit(net, lay.blocks(d))(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the comparison is sensitive to the block order
    net.apply_subnet(SubNet(28, full, tuple(range(full))))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(net(x), _standalone_vit(net, lay.blocks(full))(x), atol=1e-4)


# ======================================================================= 2. candidate sets Λ_k
@pytest.mark.parametrize("space", [SPACE6, GrowthSpace(224, 16, 12), GrowthSpace(32, 4, 8, 4, 0.25),
                                   GrowthSpace(28, 4, 4)])
def test_first_stage_takes_min_medium_max(space):
    res, dep = space.resolutions(), space.depths()
    cands = candidates(space, None)
    rs = sorted({c.resolution for c in cands})
    ds = sorted({c.depth for c in cands})
    assert len(cands) == len(set(cands)) == len(rs) * len(ds) <= MAX_CANDIDATES
    for chosen, omega in ((rs, res), (ds, dep)):
        assert len(chosen) == min(3, len(omega))
        assert chosen[0] == omega[0] and chosen[-1] == omega[-1], "smallest and largest of Ω"
        if len(chosen) == 3:  # the medium one
            assert chosen[1] in omega and omega.index(chosen[1]) in ((len(omega) - 1) // 2, len(omega) // 2)
    assert all(c.blocks is None for c in cands)
    assert space.full in cands, "the whole network is reachable from the first stage"


def test_first_stage_examples():
    assert {(c.resolution, c.depth) for c in candidates(SPACE6, None)} == {
        (r, d) for r in (16, 24, 28) for d in (3, 5, 6)}  # Ω's medium: 24 px (upper median), 5 blocks
    big = candidates(GrowthSpace(224, 16, 12), None)
    assert len(big) == 9
    assert {c.resolution for c in big} >= {112, 224} and {c.depth for c in big} >= {6, 12}


@pytest.mark.parametrize("space, prev, expected_res, expected_depths", [
    (SPACE6, SubNet(16, 3), [16, 20], [3, 4, 5, 6]),
    (SPACE6, SubNet(20, 4), [20, 24], [4, 5, 6]),  # clipped at the full depth
    (SPACE6, SubNet(24, 6), [24, 28], [6]),
    (SPACE6, SubNet(28, 5), [28], [5, 6]),  # clipped at the full resolution
    (SPACE6, SubNet(28, 6), [28], [6]),
    (GrowthSpace(224, 16, 12), SubNet(112, 6), [112, 144], [6, 8, 10, 12]),  # depths of Ω {6, 8, 10, 12} only
    (GrowthSpace(224, 16, 12), SubNet(144, 8), [144, 192], [8, 10, 12]),
])
def test_later_stages_grow_from_the_previous_choice(space, prev, expected_res, expected_depths):
    cands = candidates(space, prev)
    assert [(c.resolution, c.depth) for c in cands] == [(r, d) for r in expected_res for d in expected_depths]
    assert len(cands) <= 8
    assert SubNet(prev.resolution, prev.depth) in cands, "staying put is a candidate"
    for c in cands:
        assert c.resolution >= prev.resolution and c.depth >= prev.depth, "never smaller than ψ*_{k-1}"
        space.validate(c)
        assert c.depth in space.depths() and c.resolution in space.resolutions(), "Λ_k is drawn from Ω"


@pytest.mark.parametrize("space, prev, expected_depths", [
    (SPACE6, SubNet(16, 3), [4, 5, 6]),
    (SPACE6, SubNet(20, 5), [6]),
    (SPACE6, SubNet(24, 6), [6]),  # at the full depth the depth stays
    (GrowthSpace(224, 16, 12), SubNet(112, 6), [8, 10, 12]),
])
def test_forced_growth_takes_the_next_depths_only(space, prev, expected_depths):
    cands = candidates(space, prev, forced_growth=True)
    assert sorted({c.depth for c in cands}) == expected_depths
    assert sorted({c.resolution for c in cands}) == sorted({c.resolution for c in candidates(space, prev)})


# ================================================================================ 3. scoring
def test_scores_are_loss_times_time_to_the_alpha():
    assert scores([2.0, 3.0], [4.0, 9.0], 0.5) == pytest.approx([4.0, 9.0])
    assert scores([2.0, 3.0], [4.0, 9.0], 0.0) == pytest.approx([2.0, 3.0])


def test_argmin_trades_loss_against_runtime():
    losses, times = [1.0, 1.5, 3.0], [4.0, 2.0, 1.0]
    assert argmin_score(losses, times, 0.0) == 0, "α = 0: the lowest loss"
    assert argmin_score(losses, times, 10.0) == 2, "large α: the fastest"
    assert argmin_score(losses, times, 0.5) == 0  # 2, 2.12, 3
    assert argmin_score([1.0, 1.5, 1.6], times, 1.0) == 2  # 4, 3, 1.6


def test_the_choice_does_not_turn_on_the_time_scale():
    """The winner must not depend on how fast the machine was (the --time-source flops calibration)."""
    from autoprog.algorithms.elastic import choose

    losses, times = [2.25759, 2.25732, 2.31, 2.2], [0.004416, 0.006754, 0.003, 0.01]
    for rule in ("fit", "balanced"):
        picks = {choose(losses, [t * (0.5 + i / 100) for t in times], rule=rule)[0] for i in range(150)}
        assert len(picks) == 1, rule


def test_a_tie_goes_to_the_lower_loss_never_the_faster():
    """The issue's case: under the balanced α (and the fitted one, which passes through both points) two
    candidates always tie exactly; the one with four times the loss must not win because it is 1 % faster."""
    from autoprog.algorithms.elastic import choose

    for rule in ("fit", "balanced"):
        assert choose([0.5, 2.0], [1.01, 1.0], rule=rule)[0] == 0, rule
        assert choose([2.0, 0.5], [1.0, 1.01], rule=rule)[0] == 1, rule
    assert argmin_score([2.0, 1.0, 1.0], [1.0, 2.0, 1.5], 0.0) == 1, "equal score: the lower loss, then the earlier"
    assert argmin_score([1.0, 1.0, 1.0], [3.0, 2.0, 2.0], 0.0) == 0, "equal score and loss: the earlier one"
    assert argmin_score([2.0, 1.0], [1.0, 4.0], 0.5) == 1  # 2.0 == 2.0: candidate 1 has the lower loss


def test_fit_alpha_is_the_official_power_law_exponent():
    from autoprog.algorithms.elastic import fit_alpha

    times = [0.01, 0.02, 0.03, 0.05]
    losses = [3.0 * t ** -0.25 for t in times]  # an exact power law L = a·T^-0.25
    assert fit_alpha(losses, times) == pytest.approx(0.25, rel=1e-4)
    assert fit_alpha(losses, [1000 * t for t in times]) == pytest.approx(0.25, rel=1e-4), "units do not matter"
    assert fit_alpha([1.0, 1.1, 1.2], times[:3]) == 0.0, "loss rising with time: α = max(-b, 0) = 0"
    assert fit_alpha([1.0, 2.0], [0.5, 0.5]) == 0.0, "equal times: pick by loss"
    noisy = [3.0 * t ** -0.25 * (1 + e) for t, e in zip(times, (0.01, -0.02, 0.015, -0.01))]
    a = fit_alpha(noisy, times)
    assert 0.15 < a < 0.35
    # the least-squares fit on L: with α the candidates above the trend score worse than those below it
    from autoprog.algorithms.elastic import choose

    idx, alpha, _ = choose(noisy, times)
    assert alpha == pytest.approx(a) and idx == 1, "the candidate furthest below the fitted trend"


def test_choose_alpha_balances_the_log_ranges():
    losses, times = [1.0, math.e, 2.0], [math.e ** 2, 1.0, math.e]
    alpha = choose_alpha(losses, times)
    assert alpha == pytest.approx(0.5)
    log_l = [math.log(v) for v in losses]
    log_t = [alpha * math.log(v) for v in times]
    assert max(log_t) - min(log_t) == pytest.approx(max(log_l) - min(log_l))
    # the unit of time does not matter
    assert choose_alpha(losses, [1000 * t for t in times]) == pytest.approx(alpha)
    assert choose_alpha([2.0, 4.0], [0.01, 0.1]) == pytest.approx(math.log(2) / math.log(10))


def test_choose_alpha_fallbacks():
    assert choose_alpha([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == 0.0, "equal times: pick by loss"
    assert choose_alpha([2.0], [0.1]) == 0.0
    times = [0.3, 0.1, 0.2]
    alpha = choose_alpha([2.0, 2.0, 2.0], times)
    assert 0.0 < alpha <= 0.01, "equal losses: a small positive α"
    assert argmin_score([2.0, 2.0, 2.0], times, alpha) == 1, "... which picks the fastest"


@pytest.mark.parametrize("losses, times", [
    ([1.0, 0.0], [1.0, 2.0]), ([1.0, -2.0], [1.0, 2.0]), ([1.0, 2.0], [0.0, 2.0]), ([1.0, 2.0], [1.0, -1.0]),
    ([], []), ([1.0, 2.0], [1.0]),
])
def test_choose_alpha_rejects_bad_inputs(losses, times):
    with pytest.raises(ValueError):
        choose_alpha(losses, times)


def test_scoring_rejects_bad_inputs():
    with pytest.raises(ValueError):
        argmin_score([1.0, 5.0], [1.0, 0.0], 1.0)
    with pytest.raises(ValueError):
        scores([1.0, -2.0], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError):
        argmin_score([1.0, 2.0, 0.5], [1.0, 2.0], 0.0)


# ============================================================================== 4. sampling
def test_sample_index_is_a_pure_function():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = [sample_index(7, s, 9) for s in range(300)]
    assert torch.equal(torch.get_rng_state(), state), "sampling must not consume the global random state"
    torch.manual_seed(12345)  # another "process", with another global random state
    torch.rand(17)
    assert [sample_index(7, s, 9) for s in range(300)] == a
    assert [sample_index(7, s, 9) for s in reversed(range(300))] == a[::-1], "no hidden state between calls"
    assert a != [sample_index(8, s, 9) for s in range(300)], "the seed matters"
    assert all(0 <= i < 9 for i in a)


@pytest.mark.parametrize("n", [1, 4, 8, 9])
def test_sample_index_is_uniform(n):
    for seed in (0, 1, 2):
        counts = collections.Counter(sample_index(seed, s, n) for s in range(200 * n))
        assert set(counts) == set(range(n)), "every candidate is trained"
        assert all(130 <= c <= 270 for c in counts.values()), counts


def test_controllers_sample_the_same_candidates():
    def controller():
        ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_epochs=4), seed=3)
        tr = FakeTrainer()
        ctrl.setup(tr, 256)
        ctrl.enter_stage(tr, 0)
        return ctrl, tr

    (a, ta), (b, tb) = controller(), controller()
    assert a.searching and len(a.cands) == 9
    torch.manual_seed(0)
    seq_a = [a.step_subnet(ta, s) for s in range(300)]
    torch.manual_seed(99)
    seq_b = [b.step_subnet(tb, s) for s in range(300)]
    assert seq_a == seq_b
    assert set(seq_a) == set(a.cands), "each candidate is sampled during the search"
    assert all(c.blocks is not None for c in seq_a), "the supernet assigns each candidate its blocks"
    assert ta.applied[0] == SubNet(28, 6, ElasticLayout(3, 6).blocks(6)), "the supernet is the largest candidate"
    a.searching = False
    assert a.step_subnet(ta, 0) is None, "outside the search the chosen sub-network trains"


def test_setup_timeline():
    one = dict(search_epochs=1, search_min_updates=1)
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(**one), seed=0)
    assert ctrl.setup(FakeTrainer(8), 64) == 64, "with recycling the search epochs are training epochs"
    assert ctrl.search_steps == 9 and ctrl.starts == [0, 16, 32, 48], "8 steps raised to one per candidate"
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(**one, recycle=False), seed=0)
    assert ctrl.setup(FakeTrainer(8), 64) == 64 + 3 * 9, "without recycling they are extra"
    assert ctrl.starts == [0, 25, 50, 75]
    assert [ctrl.stage_at(s) for s in (0, 24, 25, 74, 75, 90)] == [0, 0, 1, 2, 3, 3]
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_epochs=10, search_min_updates=1), seed=0)
    ctrl.setup(FakeTrainer(8), 64)
    assert ctrl.search_steps == 15, "the search leaves at least one step of the stage to the choice"


def test_search_fraction_sizes_the_search_by_the_stage():
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.25, search_min_updates=1), seed=0)
    ctrl.setup(FakeTrainer(8), 200)  # stages of 50 steps
    assert ctrl.search_steps == 12, "a quarter of the stage (more than one update for each of 9 candidates)"
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_epochs=1, search_fraction=0.25, search_min_updates=1))
    ctrl.setup(FakeTrainer(10), 200)
    assert ctrl.search_steps == 10, "--search-epochs, when given, instead"
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(), seed=0)
    assert ctrl.cfg.search_fraction == 0.08 and ctrl.cfg.search_epochs is None, "the paper's 2 of 25 epochs"


def test_the_supernet_phase_keeps_its_floor_of_updates_per_candidate():
    tr = FakeTrainer(8)
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=4), seed=0)
    ctrl.setup(tr, 400)  # stages of 100 steps: 5 steps wanted, 36 needed for 9 candidates
    ctrl.enter_stage(tr, 0)
    assert len(ctrl.cands) == 9 and ctrl.search_end == 36
    assert any("36 steps instead of 5" in line and "--search-min-updates" in line for line in tr.printed)
    tr = FakeTrainer(8)
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_min_updates=4), seed=0)
    ctrl.setup(tr, 68)  # stages of 17 steps: 9 × 4 = 36 does not fit in 16
    ctrl.enter_stage(tr, 0)
    kept = {(c.resolution, c.depth) for c in ctrl.cands}
    assert kept == {(16, 3), (16, 6), (28, 3), (28, 6)}, "the medium values go first: the extremes stay reachable"
    assert ctrl.search_end == 16 and any("do not fit" in line for line in tr.printed)
    ctrl.chosen, tr.step = [SubNet(16, 3)], 17
    ctrl.searching = False
    ctrl.enter_stage(tr, 1)  # 8 candidates, 16 steps: 4 kept, the nearest growth
    assert {(c.resolution, c.depth) for c in ctrl.cands} == {(16, 3), (16, 4), (20, 3), (20, 4)}


def test_scoring_points_spread_over_the_second_half():
    from autoprog.algorithms.autoprog_one import score_steps

    assert score_steps(100, 40, 5) == [120, 125, 130, 135, 140]
    assert score_steps(0, 8, 1) == [8]
    assert score_steps(0, 2, 5) == [1, 2], "points on one step count once"


@pytest.mark.parametrize("kw", [{"search_epochs": 0}, {"alpha": -0.5}, {"search_samples": 0}, {"gain_samples": 1},
                                {"gain_folds": 0}, {"search_fraction": 0.0}, {"search_fraction": 1.0},
                                {"search_min_updates": -1}, {"score_points": 0}, {"alpha_rule": "x"},
                                {"supernet_sampling": "x"}, {"search_step_time": "x"}])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        AutoProgOne(SPACE6, AutoProgOneConfig(**kw))


# ====================================================================== 5. weight recycling
# forced choices (res, depth) per searched stage of a 6-block model: stage 2's choice, 5 blocks out of a
# supernet grown from 3, runs the physical blocks (0, 1, 4, 2, 3), so recycling has to move blocks
FORCED = {0: (16, 3), 1: (20, 5), 2: (24, 6)}
_ORIG_SEARCH = AutoProgOne._search


def _blk(sd: dict, i: int) -> dict:
    pre = f"model.blocks.{i}."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def _non_blocks(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("model.blocks.")}


def _clone(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _opt_blocks(trainer) -> dict:
    out = {}
    for i, blk in enumerate(trainer.net.blocks):
        for n, p in blk.named_parameters():
            if p in trainer.optimizer.state:
                out[(i, n)] = {k: v.clone() for k, v in trainer.optimizer.state[p].items() if k != "step"}
    return out


def _recorded_run(out: Path, data_root: Path, recycle: bool):
    """A tiny autoprog-one run (16 steps, search 2 steps per stage) with forced choices; records the state
    just before and after each search."""
    from accelerate import Accelerator

    from autoprog.classification.runner import RunSpec, pretrain
    from autoprog.classification.trainer import TrainConfig

    records, cur = [], {}
    orig_search = _ORIG_SEARCH

    def forced_choose(losses, times, alpha, rule="fit"):
        ctrl, trainer = cur["ctrl"], cur["trainer"]
        want = FORCED[trainer.stage]
        return [(c.resolution, c.depth) for c in ctrl.cands].index(want), 1.0, [1.0] * len(losses)

    def search(self, trainer):
        cur.update(ctrl=self, trainer=trainer)
        rec = {"stage": trainer.stage, "cands": list(self.cands), "prev": self.chosen[-1] if self.chosen else None,
               "model": _clone(trainer.net.state_dict()), "ema": _clone(trainer.ema.module.state_dict()),
               "opt": _opt_blocks(trainer), "snapshot": self._snapshot, "lr_step": trainer.lr_step}
        orig_search(self, trainer)
        rec.update(chosen=self.chosen[-1], subnet=trainer.net.subnet, ema_subnet=trainer.ema.module.subnet,
                   model_after=_clone(trainer.net.state_dict()), ema_after=_clone(trainer.ema.module.state_dict()),
                   opt_after=_opt_blocks(trainer), lr_step_after=trainer.lr_step, search_steps=self.search_steps,
                   starts=list(self.starts))
        records.append(rec)

    spec = RunSpec(method="autoprog-one", growth="mogrow", patch_size=4, depth=6, embed_dim=16, num_heads=2,
                   data_root=str(data_root), subset=256, search_epochs=0.25, search_min_updates=0, search_samples=64,
                   recycle=recycle,  # (moments carried, as by default, so that the test can follow them)
                   train=TrainConfig(epochs=2, batch_size=32, eval_samples=64, count_flops=False,
                                     optimizer_at_growth="carry"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoProgOne, "_search", search)
        mp.setattr(autoprog_one, "choose", forced_choose)
        res = pretrain(spec, out, Accelerator(cpu=True))
    return res, records


@pytest.fixture(scope="module")
def recycle_runs(tmp_path_factory, fake_fmnist):
    out = tmp_path_factory.mktemp("recycle")
    return (_recorded_run(out / "recycle", fake_fmnist, recycle=True),
            _recorded_run(out / "no-recycle", fake_fmnist, recycle=False))


@pytest.mark.slow
def test_recycling_keeps_the_supernet_weights(recycle_runs):
    (res, records), _ = recycle_runs
    assert res["done"] and len(records) == 3
    assert _rd(res["summary"]["schedule"]["stages"]) == [FORCED[0], FORCED[1], FORCED[2], (28, 6)]
    for rec in records:
        best = next(c for c in rec["cands"] if (c.resolution, c.depth) == FORCED[rec["stage"]])
        d = best.depth
        assert rec["chosen"] == SubNet(best.resolution, d) and rec["chosen"].blocks is None, "compacted to 0..d-1"
        assert rec["subnet"] == rec["ema_subnet"] == rec["chosen"]
        for i, b in enumerate(best.blocks):
            assert _same(_blk(rec["model_after"], i), _blk(rec["model"], b)), (rec["stage"], i, b)
            assert _same(_blk(rec["ema_after"], i), _blk(rec["ema"], b)), (rec["stage"], i, b)
            for n in [n for (j, n) in rec["opt"] if j == b]:
                assert _same(rec["opt_after"][(i, n)], rec["opt"][(b, n)]), "optimizer moments follow the weights"
        assert _same(_non_blocks(rec["model_after"]), _non_blocks(rec["model"]))
        assert _same(_non_blocks(rec["ema_after"]), _non_blocks(rec["ema"]))
        assert rec["lr_step_after"] == rec["lr_step"], "no steps are discarded"
    # the stage-2 choice really was a non-trivial layout: 5 of a supernet grown from 3 blocks
    assert next(c for c in records[1]["cands"] if (c.resolution, c.depth) == (20, 5)).blocks == (0, 1, 4, 2, 3)
    s = res["summary"]
    assert s["steps"] == s["total_steps"] == 16 and s["recycle"] is True
    assert records[0]["search_steps"] == 2 and records[0]["starts"] == [0, 4, 8, 12]
    assert [st["step"] for st in res["stages"] if "chosen" in st] == [2, 6, 10]


@pytest.mark.slow
def test_without_recycling_the_stage_restarts_from_its_starting_weights(recycle_runs):
    (ref, _), (res, records) = recycle_runs
    assert res["done"] and len(records) == 3
    assert _rd(res["summary"]["schedule"]["stages"]) == _rd(ref["summary"]["schedule"]["stages"])
    for rec in records:
        snap, chosen, prev = rec["snapshot"], rec["chosen"], rec["prev"]
        assert snap is not None and rec["subnet"] == chosen == SubNet(*FORCED[rec["stage"]])
        assert rec["lr_step_after"] == snap["lr_step"] == rec["lr_step"] - rec["search_steps"], \
            "the search steps are rewound in the learning-rate schedule"
        if prev is None:  # the first stage starts from the initial weights
            src_model, src_ema, mapping = snap["model"], snap["ema"], list(range(chosen.depth))
        else:  # MoGrow: interpolation of the momentum network's stage-start weights
            src_model, src_ema = snap["ema"], snap["ema"]
            mapping = depth_mapping("interpolation", prev.depth, chosen.depth)
        for j, m in enumerate(mapping):
            assert _same(_blk(rec["model_after"], j), _blk(src_model, m)), (rec["stage"], j, m)
            assert _same(_blk(rec["ema_after"], j), _blk(src_ema, m)), (rec["stage"], j, m)
        assert _same(_non_blocks(rec["model_after"]), _non_blocks(src_model))
        # ... and not the supernet's weights
        best = next(c for c in rec["cands"] if (c.resolution, c.depth) == FORCED[rec["stage"]])
        assert not all(_same(_blk(rec["model_after"], i), _blk(rec["model"], b)) for i, b in enumerate(best.blocks))
    s, k = res["summary"], 4
    search_steps = records[0]["search_steps"]
    assert search_steps == 2
    assert s["recycle"] is False
    assert s["steps"] == s["total_steps"] == ref["summary"]["total_steps"] + (k - 1) * search_steps
    assert records[0]["starts"] == [0, 6, 12, 18]
    # both runs end with the same learning rate: the discarded steps do not advance the LR schedule
    assert res["epochs"][-1]["lr"] == pytest.approx(ref["epochs"][-1]["lr"], rel=1e-6)


# ============================================================================= 6. end to end
AP_ARGS = ("--method", "autoprog-one", "--depth", "6", "--alpha", "0", "--search-epochs", "0.5", "--search-min-updates", "0",
           "--search-samples", "64")


@pytest.fixture(scope="module")
def ap_run(tmp_path_factory, fake_fmnist) -> Path:
    """`pretrain --method autoprog-one`: 3 epochs of 8 steps, 4 stages of 6 steps, each (but the last)
    searching for its first 4 steps; α = 0 makes the choices loss-only and reproducible."""
    from autoprog.cli import main

    out = tmp_path_factory.mktemp("ap") / "ap"
    assert main(["pretrain", "--out", str(out), *tiny_args(fake_fmnist, epochs="3"), *AP_ARGS]) == 0
    return out


@pytest.mark.slow
def test_pretrain_autoprog_one_writes_its_search(ap_run):
    res = _results(ap_run)
    s = res["summary"]
    assert res["done"] is True and s["method"] == "autoprog-one"
    assert s["steps"] == s["total_steps"] == 24
    stages = s["schedule"]["stages"]
    assert len(stages) == 4 and _rd(stages)[-1] == (28, 6), "the last stage is the full model"
    assert sum(st["fraction"] for st in stages) == pytest.approx(1.0)
    for a, b in zip(stages, stages[1:]):
        assert b["resolution"] >= a["resolution"] and b["depth"] >= a["depth"]
    search = s["search"]
    assert len(search) == 3, "one search per stage but the last"
    prev = None
    for k, entry in enumerate(search):
        table = entry["candidates"]
        assert all(CAND_KEYS <= row.keys() for row in table)
        assert {(r["resolution"], r["depth"]) for r in table} == {
            (c.resolution, c.depth) for c in candidates(SPACE6, prev)}
        assert sum(r["chosen"] for r in table) == 1
        row = next(r for r in table if r["chosen"])
        assert (row["resolution"], row["depth"]) == _rd([entry["chosen"]])[0] == _rd(stages)[k]
        assert entry["alpha"] == 0.0
        for r in table:
            assert r["loss"] > 0 and r["step_time_s"] > 0 and r["score"] == pytest.approx(r["loss"], abs=1e-5)
        assert row["score"] == min(r["score"] for r in table)
        prev = SubNet(row["resolution"], row["depth"])
    assert s["search_epoch_s"] > 0 and s["search_scoring_s"] > 0
    assert s["search_epoch_s"] <= s["wall_time_s"]
    starts = [st["step"] for st in res["stages"] if "supernet" in st or "subnet" in st]
    assert starts == [0, 6, 12, 18]
    assert [st["step"] for st in res["stages"] if "chosen" in st] == [4, 10, 16]
    assert (res["epochs"][-1]["resolution"], res["epochs"][-1]["depth"]) == (28, 6)
    state = json.loads((ap_run / "checkpoint" / "state.json").read_text())
    assert state["subnet"] == {"resolution": 28, "depth": 6} and state["controller"]["searching"] is False

    sched = Schedule.load(ap_run / "schedule.json")
    sched.validate_for(SPACE6)
    assert sched.to_dict()["stages"] == stages


@pytest.mark.slow
def test_fixed_replays_an_autoprog_one_schedule(ap_run, cli, fake_fmnist, tmp_path):
    a, b = replay_fixed(cli, ap_run, tmp_path / "fixed", *tiny_args(fake_fmnist, epochs="3"), "--depth", "6")
    assert b["summary"]["schedule"]["stages"] == a["summary"]["schedule"]["stages"]
    assert [(st["step"], st["subnet"]["resolution"], st["subnet"]["depth"]) for st in b["stages"]] == [
        (step, r, d) for step, (r, d) in zip([0, 6, 12, 18], _rd(a["summary"]["schedule"]["stages"]))]


@pytest.mark.slow
def test_resume_in_the_middle_of_a_search(ap_run, cli, fake_fmnist, tmp_path):
    out = tmp_path / "stopped"
    rc, _, err = cli("pretrain", "--out", out, "--stop-after-epochs", "1", *tiny_args(fake_fmnist, epochs="3"),
                     *AP_ARGS)
    assert rc == 0, err
    part = _results(out)
    assert part["done"] is False and len(part["summary"]["search"]) == 1
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["controller"]["searching"] is True, "stopped during stage 2's search"

    rc, _, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 0, err
    res, ref = _results(out), _results(ap_run)
    assert res["done"] is True and res["summary"]["steps"] == 24
    assert res["summary"]["search"][0] == part["summary"]["search"][0], "the choice made before the stop is kept"
    assert res["summary"]["schedule"] == ref["summary"]["schedule"]
    for got, want in zip(res["summary"]["search"], ref["summary"]["search"]):
        assert got["chosen"] == want["chosen"]
        assert [r["loss"] for r in got["candidates"]] == pytest.approx([r["loss"] for r in want["candidates"]],
                                                                       abs=1e-4)
    wa, wb = load_file(ap_run / "checkpoint" / "model.safetensors"), load_file(out / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_of_a_no_recycle_search_is_refused(cli, fake_fmnist, tmp_path):
    out = tmp_path / "nr"
    # 16 steps + 3 × 3 search steps: stage 2 starts at step 7 and searches until step 10
    rc, _, err = cli("pretrain", "--out", out, "--stop-after-epochs", "1", *tiny_args(fake_fmnist, epochs="2"),
                     "--method", "autoprog-one", "--no-recycle", "--search-epochs", "1", "--search-samples", "32")
    assert rc == 0, err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["controller"]["searching"] is True
    rc, _, err = cli("pretrain", "--resume", out, "--cpu")
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autoprog: error:") and "no-recycle" in lines[0]


@pytest.mark.slow
def test_a_tiny_autoprog_one_run_still_ends_on_the_full_model(cli, fake_fmnist, tmp_path):
    out = tmp_path / "tiny"
    rc, _, err = cli("pretrain", "--method", "autoprog-one", "--out", out,
                     *tiny_args(fake_fmnist, epochs="1", subset="64"))  # 2 steps, 4 stages
    assert rc == 0, err
    res = _results(out)
    assert res["done"] and res["summary"]["steps"] == 2
    assert (res["epochs"][-1]["resolution"], res["epochs"][-1]["depth"]) == (28, 4)
    assert _rd(res["summary"]["schedule"]["stages"])[-1] == (28, 4)
    Schedule.load(out / "schedule.json").validate_for(GrowthSpace(28, 4, 4))


# =============================================================================== 7. compare
@pytest.mark.slow
def test_compare_reports_the_search_cost_and_schedule(cli, fake_fmnist, tmp_path):
    out = tmp_path / "cmp"
    rc, _, err = cli("compare", "--methods", "autoprog-one", "--out", out, "--no-budget-baseline", "--front", "1",
                     "--search-samples", "32", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["original", "autoprog-one"]
    orig, ap = rows
    assert ap["search_epoch_s"] > 0 and ap["search_scoring_s"] > 0
    assert orig["search_epoch_s"] == 0.0 and orig["search_scoring_s"] == 0.0
    stages = ap["schedule"]["stages"]
    assert len(stages) == 4 and _rd(stages)[-1] == (28, 4)
    assert _rd(orig["schedule"]["stages"]) == [(28, 4)]
    assert ap["growth"] == "mogrow" and ap["schedule_str"].count("→") == 3
    assert ap["steps"] == 8
    assert _results(out / "autoprog-one")["summary"]["schedule"] == ap["schedule"]
    assert "| autoprog-one |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_search_time_is_inside_the_runtime_under_flops_time(cli, fake_fmnist, tmp_path):
    """With --time-source flops the search counts FLOPs of every candidate; that counting is search time, so it
    must be inside the run's training time (a run once reported 79.5 s of search in a 70.3 s runtime)."""
    out = tmp_path / "flops"
    rc, _, err = cli("pretrain", "--out", out, *tiny_args(fake_fmnist, epochs="2"), *AP_ARGS, "--time-source", "flops")
    assert rc == 0, err
    s = _results(out)["summary"]
    assert s["search_scoring_s"] > 0
    assert s["search_scoring_s"] + s["search_epoch_s"] <= s["wall_time_s"] + 1e-3


def test_cycle_sampling_gives_every_candidate_its_share():
    from autoprog.algorithms.elastic import cycle_index

    a = [cycle_index(3, s, 9, start=40) for s in range(40, 40 + 45)]
    for block in range(5):
        assert sorted(a[block * 9:(block + 1) * 9]) == list(range(9)), "each block of 9 steps is a permutation"
    assert a == [cycle_index(3, s, 9, start=40) for s in range(40, 40 + 45)], "a pure function"
    assert a != [cycle_index(4, s, 9, start=40) for s in range(40, 40 + 45)], "the seed matters"
    assert a[:9] != a[9:18], "a fresh permutation each block"


def test_step_time_is_the_median_of_each_candidates_own_supernet_steps():
    tr = FakeTrainer(8)
    clock = [0.0]
    tr.elapsed = lambda: clock[0]
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=3, alpha=0.0), seed=0)
    ctrl.setup(tr, 400)
    ctrl.enter_stage(tr, 0)
    cost = {c: 0.01 * c.resolution * c.depth for c in ctrl.cands}
    for s in range(ctrl.search_end):
        sub = ctrl.step_subnet(tr, s)
        clock[0] += cost[sub] * (3.0 if s == 0 else 1.0)  # the first step pays a one-off cost
        tr.step = s + 1
        ctrl.after_step(tr)
    log = ctrl.search_log[-1]
    assert log["step_time_from"] == "supernet steps"
    for row in log["candidates"]:
        want = 0.01 * row["resolution"] * row["depth"]
        assert row["step_time_s"] == pytest.approx(want, rel=1e-4), "the median ignores the one-off first step"
    probe = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=3, search_step_time="probe"))
    tr2 = FakeTrainer(8)
    probe.setup(tr2, 400)
    probe.enter_stage(tr2, 0)
    for s in range(probe.search_end):
        probe.step_subnet(tr2, s)
        tr2.step = s + 1
        probe.after_step(tr2)
    assert probe.search_log[-1]["step_time_from"] == "probe"
    assert [r["step_time_s"] for r in probe.search_log[-1]["candidates"]] == pytest.approx(
        [1e-3 * r["resolution"] * r["depth"] for r in probe.search_log[-1]["candidates"]])


def test_a_checkpoint_from_before_scoring_points_resumes_mid_search():
    """A checkpoint written inside a supernet phase before 2026-12-05 has no scoring points or step times: the
    search it resumes scores once, at its end, and times its candidates by probes."""
    tr = FakeTrainer(8)
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=1, alpha=0.0), seed=0)
    ctrl.setup(tr, 400)
    ctrl.enter_stage(tr, 0)
    state = ctrl.state_dict()
    for key in ("score_at", "partial", "stage_scoring", "search_start", "step_times"):
        del state[key]
    again = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=1, alpha=0.0), seed=0)
    again.setup(tr, 400)
    again.load_state_dict(state)
    assert again.score_at == [again.search_end]
    tr.step = again.search_end
    again.after_step(tr)
    log = again.search_log[-1]
    assert log["step_time_from"] == "probe" and len(log["candidates"]) == len(again.cands)


def test_scoring_points_share_a_small_training_set_equally(fake_fmnist, tmp_path):
    """With fewer training images than points × --search-samples, every point gets an equal, non-empty part."""
    from accelerate import Accelerator

    from autoprog.classification.runner import RunSpec, build_run
    from autoprog.classification.trainer import TrainConfig, Trainer

    spec = RunSpec(method="prog", patch_size=4, depth=2, embed_dim=16, num_heads=2, data_root=str(fake_fmnist),
                   subset=100, train=TrainConfig(epochs=1, batch_size=20, eval_samples=20, count_flops=False))
    data, net, schedule, growth = build_run(spec)
    tr = Trainer(net, schedule, growth, data, spec.train, tmp_path, Accelerator(cpu=True))
    sub = net.full_subnet
    losses = [tr.candidate_loss(sub, 64, part, 5) for part in range(5)]  # 100 images for 5 × 64 wanted
    assert all(0.5 < lo < 10 for lo in losses), losses
    assert len(set(losses)) == 5, "each point scores its own images"
    with pytest.raises(ConfigError, match="too small"):
        tr.candidate_loss(sub, 64, 0, 200)


def test_the_searches_read_their_training_subset_once_per_run(fake_fmnist, tmp_path):
    """Scoring points and gain gradients share one host copy of the plain subset, read once for the largest size
    asked; every later search, at any step, reuses it and sees the same images."""
    from accelerate import Accelerator

    from autoprog.classification.runner import RunSpec, build_run
    from autoprog.classification.trainer import TrainConfig, Trainer

    spec = RunSpec(method="prog", patch_size=4, depth=2, embed_dim=16, num_heads=2, data_root=str(fake_fmnist),
                   subset=200, train=TrainConfig(epochs=1, batch_size=20, eval_samples=20, count_flops=False))
    data, net, schedule, growth = build_run(spec)
    tr = Trainer(net, schedule, growth, data, spec.train, tmp_path, Accelerator(cpu=True))
    reads, real = [], data.loader
    data.loader = lambda split, *a, **k: reads.append((split, k.get("limit"))) or real(split, *a, **k)
    sub = net.full_subnet
    first = [tr.candidate_loss(sub, 16, part, 4) for part in range(4)]  # 64 images
    grads = tr.candidate_gradients(sub, 48)
    tr.step += 10  # a later search
    assert [tr.candidate_loss(sub, 16, part, 4) for part in range(4)] == first
    again = tr.candidate_gradients(sub, 48)
    assert again.loss == grads.loss and all(torch.equal(grads.mean[k], again.mean[k]) for k in grads.mean)
    assert reads == [("train_plain", 64)], "one read for every search"
    tr.candidate_gradients(sub, 100)  # a larger subset is read once more; its first 64 are the same images
    assert reads[-1] == ("train_plain", 100)
    assert [tr.candidate_loss(sub, 16, part, 4) for part in range(4)] == first and len(reads) == 2
    tr.candidate_gradients(sub, 500)  # more than the 200 training images: all of them, in the same order
    tr.candidate_gradients(sub, 500)
    assert len(reads) == 3, "a request beyond the training set is read once, not at every search"
    assert [tr.candidate_loss(sub, 16, part, 4) for part in range(4)] == first


def test_the_supernet_phase_times_its_steps_by_device_events_and_waits_only_at_its_end(monkeypatch):
    """On a GPU each supernet step is timed by CUDA events marked between steps, read when the search ends: no
    wait for the device during the phase, and each candidate's T is the device's time (7 ms a step here), not the
    host clock's (which says 0)."""
    import itertools

    from autoprog.steptime import StepMarks

    log = []
    fake_cuda_events(monkeypatch, log, itertools.count(0.0, 7.0))
    tr = FakeTrainer(8)
    tr.sync = lambda: log.append("device sync")
    tr.step_marks = StepMarks(tr.elapsed, "cuda:0")
    ctrl = AutoProgOne(SPACE6, AutoProgOneConfig(search_fraction=0.05, search_min_updates=3, alpha=0.0,
                                                 score_points=1), seed=0)
    ctrl.setup(tr, 400)
    ctrl.enter_stage(tr, 0)
    end = ctrl.search_end
    for s in range(end + 20):
        ctrl.step_subnet(tr, s)
        tr.step = s + 1
        if tr.step == end:
            assert "event sync" not in log and "device sync" not in log, "no wait during the supernet phase"
        ctrl.after_step(tr)
    assert log.count("device sync") == 1, "once, when the search scores its candidates at its end"
    (search,) = ctrl.search_log
    assert search["step_time_from"] == "supernet steps"
    assert [c["step_time_s"] for c in search["candidates"]] == [0.007] * len(ctrl.cands)
    assert log.count("record") == end + 1, "one mark per supernet step and the phase's start; none after"


def test_step_marks_compare_device_events_within_one_stretch_of_the_clock(monkeypatch):
    """The seconds between two marks: on a GPU the events' gap, or None where the training clock stopped or
    measured between them (the events would count that); on the CPU the clock's seconds, as before."""
    from autoprog.steptime import StepMarks

    host = iter([1.0, 1.5, 2.5, 4.0])
    cpu = StepMarks(lambda: next(host))
    a, b = cpu.mark(), cpu.mark()
    assert a.seconds_to(b) == 0.5 and a.event is None

    log, stretch = [], [0]
    fake_cuda_events(monkeypatch, log, iter([10.0, 14.0, 20.0]))
    gpu = StepMarks(lambda: 0.0, "cuda:0", stretch=lambda: stretch[0])
    a, b = gpu.mark(), gpu.mark()
    stretch[0] += 1  # an evaluation, a checkpoint or a FLOP count
    c = gpu.mark()
    assert log == ["record"] * 3, "marking never waits"
    assert a.seconds_to(b) == 0.004
    assert b.seconds_to(c) is None
    assert log[3:] == ["event sync"], "reading waits for the later mark"


@pytest.mark.slow
@pytest.mark.parametrize("first", ["copies", "random"])
def test_the_first_supernet_grows_from_its_smallest_candidate_as_the_official_code(first, tmp_path, fake_fmnist,
                                                                                   monkeypatch):
    """The official code starts from its smallest model and grows it into the first supernet, so the inserted
    blocks are copies of that model's; ``random`` keeps the full model's own initial blocks there."""
    from accelerate import Accelerator

    from autoprog.classification.runner import RunSpec, pretrain
    from autoprog.classification.trainer import TrainConfig

    seen, enter = [], AutoProgOne.enter_stage

    def spy(self, trainer, k):
        enter(self, trainer, k)
        if k == 0:
            lay = ElasticLayout(min(c.depth for c in self.cands), max(c.depth for c in self.cands))
            blocks = trainer.net.blocks
            seen.extend(all(torch.equal(a, b) for a, b in zip(blocks[p].state_dict().values(),
                                                              blocks[s].state_dict().values()))
                        for p, s in lay.source_map().items())

    monkeypatch.setattr(AutoProgOne, "enter_stage", spy)
    spec = RunSpec(method="autoprog-one", patch_size=4, depth=6, embed_dim=16, num_heads=2, data_root=str(fake_fmnist),
                   subset=128, search_epochs=0.25, search_min_updates=0, search_samples=32, first_supernet=first,
                   train=TrainConfig(epochs=1, batch_size=32, eval_samples=32, count_flops=False))
    assert pretrain(spec, tmp_path / "run", Accelerator(cpu=True))["done"]
    assert seen and (all(seen) if first == "copies" else not any(seen)), seen
