"""Growth operators (Appendix A, layer index i counted from the classifier side) and optimizer remapping."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from autoprog.algorithms.growth import (
    GROWTH_OPERATORS,
    MomentumNetwork,
    depth_mapping,
    get_growth_operator,
    inserted_positions,
)
from autoprog.errors import ConfigError
from autoprog.optim import build_optimizer, remap_block_state, sync_params
from autoprog.space import SubNet

RES = 28


# --------------------------------------------------------------------------------- depth mapping
@pytest.mark.parametrize(
    "kind, n_src, n_dst, expected",
    [
        ("interpolation", 2, 4, [0, 0, 1, 1]),
        ("interpolation", 3, 4, [0, 1, 2, 2]),
        ("interpolation", 3, 5, [0, 1, 1, 2, 2]),
        ("interpolation", 2, 3, [0, 1, 1]),
        ("interpolation", 3, 6, [0, 0, 1, 1, 2, 2]),
        ("stacking", 2, 4, [0, 1, 0, 1]),
        ("stacking", 2, 5, [1, 0, 1, 0, 1]),
        ("stacking", 3, 6, [0, 1, 2, 0, 1, 2]),
        ("randinit", 2, 4, [None, None, 0, 1]),
        ("randinit", 3, 4, [None, 0, 1, 2]),
    ],
)
def test_depth_mapping_matches_appendix_a(kind, n_src, n_dst, expected):
    assert depth_mapping(kind, n_src, n_dst) == expected
    assert depth_mapping(kind, n_src, n_dst, "spread") == expected  # (the two copy orders agree on these)


@pytest.mark.parametrize("n_src, n_dst, last, spread", [
    (9, 12, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8], [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8]),
    (4, 6, [0, 1, 2, 2, 3, 3], [0, 1, 1, 2, 3, 3]),
    (6, 8, [0, 1, 2, 3, 4, 4, 5, 5], [0, 1, 2, 2, 3, 4, 5, 5]),
    (4, 12, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]),
    (3, 8, [0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 2]),
])
def test_interpolation_copies_the_last_blocks_as_the_official_code_or_spreads_them(n_src, n_dst, last, spread):
    """The official code's growth (``new_idx``) gives each of the last ``n_dst mod n_src`` blocks one more copy:
    9 -> 12 copies blocks 6, 7 and 8, as the elastic supernet's layout does; ``spread`` copies 2, 5 and 8."""
    assert depth_mapping("interpolation", n_src, n_dst) == last
    assert depth_mapping("interpolation", n_src, n_dst, "spread") == spread
    with pytest.raises(ConfigError, match="unknown copy order 'middle'"):
        depth_mapping("interpolation", n_src, n_dst, "middle")


def test_the_default_copies_are_the_elastic_supernets():
    """Growing ψ*_{k-1} straight to a depth copies the same source blocks as the supernet holding that depth."""
    from autoprog.algorithms.elastic import ElasticLayout

    for base in range(1, 9):
        for top in range(base, 3 * base + 1):
            lay = ElasticLayout(base, top)
            sources = sorted([*range(base), *lay.source_map().values()])
            assert depth_mapping("interpolation", base, top) == sources, (base, top)


def _appendix_a(kind, l_s, l_l):
    """Eq. 20-22 literally, with i = 0 the last (classifier-side) layer; returns forward-order sources."""
    out = []
    for j in range(l_l):
        i = l_l - 1 - j
        if kind == "randinit":
            src = i if i < l_s else None
        elif kind == "stacking":
            src = i % l_s
        else:
            src = (i * l_s) // l_l
        out.append(None if src is None else l_s - 1 - src)
    return out


@pytest.mark.parametrize("kind", ["randinit", "stacking", "interpolation"])
def test_depth_mapping_properties(kind):
    for n_src in range(1, 7):
        for n_dst in range(n_src, 13):
            m = depth_mapping(kind, n_src, n_dst, "spread")
            assert len(m) == n_dst
            assert m == _appendix_a(kind, n_src, n_dst)
            last = depth_mapping(kind, n_src, n_dst)
            if kind != "interpolation":
                assert last == m, "the copy order is interpolation's only"
            else:
                counts = [last.count(b) for b in range(n_src)]
                assert last == sorted(last) and counts == sorted(counts) and max(counts) - min(counts) <= 1
            # the classifier-side block is always the source's last block
            assert m[-1] == n_src - 1
            if n_dst == n_src:
                assert m == list(range(n_src))
            if kind == "interpolation":
                assert m == sorted(m), "interpolation keeps the forward order"
                assert set(m) == set(range(n_src)), "every source block is used"


def test_depth_mapping_rejects_shrinking_and_unknown_kinds():
    with pytest.raises(ConfigError):
        depth_mapping("interpolation", 4, 2)
    with pytest.raises(ConfigError):
        depth_mapping("stacking", 3, 1)
    with pytest.raises(ConfigError):
        depth_mapping("magic", 2, 4)


def test_inserted_positions():
    assert inserted_positions([0, 0, 1, 1]) == [1, 3]
    assert inserted_positions([0, 1, 2, 2]) == [3]
    assert inserted_positions([0, 1, 2]) == []


def test_operator_registry():
    assert set(GROWTH_OPERATORS) == {"randinit", "stacking", "interpolation", "identity", "mogrow"}
    for name in GROWTH_OPERATORS:
        assert get_growth_operator(name).name == name
    with pytest.raises(ConfigError):
        get_growth_operator("nope")


# ------------------------------------------------------------------------------------- helpers
def _snap(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _blocks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _net(seed=0, depth=4):
    torch.manual_seed(seed)
    net = tiny_vit(depth=depth)
    # make every block (incl. LayerNorms and biases) distinct so copies can be told apart
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _non_block_state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items() if ".blocks." not in f".{k}"}


# ------------------------------------------------------------------------------- the operators
@pytest.mark.parametrize("op", ["randinit", "stacking", "interpolation", "identity", "mogrow"])
def test_grow_2_to_4_copies_the_mapped_blocks(op):
    net = _net()
    ema = MomentumNetwork(net, 0.9)
    src, dst = SubNet(RES, 2), SubNet(RES, 4)
    net.apply_subnet(src)
    ema.module.apply_subnet(src)
    source = ema.module if op == "mogrow" else net
    before = [_snap(b) for b in source.blocks]
    result = get_growth_operator(op).grow(net, ema.module, src, dst)
    mapping = depth_mapping({"randinit": "randinit", "stacking": "stacking"}.get(op, "interpolation"), 2, 4)
    assert result.block_map == {j: m for j, m in enumerate(mapping)}
    for j, m in enumerate(mapping):
        if m is None:
            continue
        grown = {k: v for k, v in _snap(net.blocks[j]).items() if not k.endswith(".gate")}
        grown = {k.replace(".inner", ""): v for k, v in grown.items()}
        assert _blocks_equal(grown, before[m]), f"{op}: block {j} should equal source block {m}"


def test_randinit_reinitialises_new_blocks():
    net = _net()
    old = [_snap(b) for b in net.blocks]
    src, dst = SubNet(RES, 2), SubNet(RES, 4)
    net.apply_subnet(src)
    result = get_growth_operator("randinit").grow(net, None, src, dst)
    assert result.block_map == {0: None, 1: None, 2: 0, 3: 1}
    new0, new1 = _snap(net.blocks[0]), _snap(net.blocks[1])
    key = "attn.qkv.weight"
    for new in (new0, new1):
        for o in old:
            assert not torch.equal(new[key], o[key])
    assert not torch.equal(new0[key], new1[key])
    # the fresh blocks look like an initialisation: zero biases, unit LayerNorm scale
    assert torch.count_nonzero(new0["attn.qkv.bias"]) == 0
    assert torch.equal(new0["norm1.weight"], torch.ones_like(new0["norm1.weight"]))
    # the old blocks now sit on the classifier side
    assert _blocks_equal(_snap(net.blocks[2]), old[0]) and _blocks_equal(_snap(net.blocks[3]), old[1])


def test_randinit_new_blocks_are_the_same_in_the_ema():
    net = _net()
    ema = MomentumNetwork(net, 0.9)
    src, dst = SubNet(RES, 2), SubNet(RES, 4)
    get_growth_operator("randinit").grow(net, ema.module, src, dst)
    for i in range(4):
        assert _blocks_equal(_snap(net.blocks[i]), _snap(ema.module.blocks[i]))


def test_growth_follows_the_physical_blocks_of_the_source():
    net = _net()
    old = [_snap(b) for b in net.blocks]
    src, dst = SubNet(RES, 2, blocks=(0, 3)), SubNet(RES, 4)
    result = get_growth_operator("interpolation").grow(net, None, src, dst)
    assert result.block_map == {0: 0, 1: 0, 2: 3, 3: 3}
    expected = [old[0], old[0], old[3], old[3]]
    for i in range(4):
        assert _blocks_equal(_snap(net.blocks[i]), expected[i])


def test_growth_in_resolution_only_keeps_blocks():
    net = _net()
    old = [_snap(b) for b in net.blocks]
    result = get_growth_operator("mogrow").grow(net, MomentumNetwork(net, 0.9).module, SubNet(16, 4), SubNet(28, 4))
    assert result.block_map == {0: 0, 1: 1, 2: 2, 3: 3}
    assert not result.changed()
    for i in range(4):
        assert _blocks_equal(_snap(net.blocks[i]), old[i])


@pytest.mark.parametrize("op", ["interpolation", "identity", "mogrow"])
def test_growth_never_shrinks(op):
    net = _net()
    ema = MomentumNetwork(net, 0.9)
    with pytest.raises(ConfigError):
        get_growth_operator(op).grow(net, ema.module, SubNet(RES, 4), SubNet(RES, 2))
    with pytest.raises(ConfigError):
        get_growth_operator(op).grow(net, ema.module, SubNet(24, 2), SubNet(16, 4))


def test_mogrow_needs_the_momentum_network():
    with pytest.raises(ConfigError):
        get_growth_operator("mogrow").grow(_net(), None, SubNet(RES, 2), SubNet(RES, 4))


# ------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("src_res, n_src, n_dst", [(28, 2, 4), (16, 3, 4), (20, 2, 3)])
def test_identity_growth_preserves_the_function(src_res, n_src, n_dst):
    net = _net()
    net.eval()
    ema = MomentumNetwork(net, 0.9)
    src, dst = SubNet(src_res, n_src), SubNet(28, n_dst)
    torch.manual_seed(1)
    x = torch.randn(5, 1, 28, 28)
    # growth in depth only: compare at the same resolution (the input is what the smaller ψ saw)
    net.apply_subnet(SubNet(28, n_src))
    with torch.no_grad():
        before = net(x)
    result = get_growth_operator("identity").grow(net, ema.module, src, dst)
    net.apply_subnet(dst)
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    inserted = inserted_positions(depth_mapping("interpolation", n_src, n_dst))
    assert result.gated == inserted and inserted
    assert net.gated_blocks() == inserted
    assert ema.module.gated_blocks() == inserted
    for i in inserted:
        assert net.blocks[i].ls1.gate.item() == 0.0 and net.blocks[i].ls2.gate.item() == 0.0
        assert net.blocks[i].ls1.gate.requires_grad
    # the grown network is a genuinely different function once the gates open
    with torch.no_grad():
        for i in inserted:
            net.blocks[i].ls1.gate.fill_(1.0)
            net.blocks[i].ls2.gate.fill_(1.0)
        assert not torch.allclose(net(x), before, atol=1e-4)


def test_identity_2_to_4_gates_only_inserted_blocks():
    net = _net()
    result = get_growth_operator("identity").grow(net, None, SubNet(RES, 2), SubNet(RES, 4))
    assert result.gated == [1, 3]
    assert [net.gated(i) for i in range(4)] == [False, True, False, True]


def test_non_identity_growth_removes_gates_from_overwritten_blocks():
    net = _net()
    get_growth_operator("identity").grow(net, None, SubNet(RES, 2), SubNet(RES, 3))
    assert net.gated_blocks() == [2]
    # randinit maps 0→new, 1←0, 2←1, 3←2: the gate moves with gated block 2 to position 3, and block 2
    # (now a copy of the ungated block 1) loses its gate
    get_growth_operator("randinit").grow(net, None, SubNet(RES, 3), SubNet(RES, 4))
    assert net.gated_blocks() == [3]


# ------------------------------------------------------------------------------------- mogrow
def test_mogrow_copies_the_momentum_network():
    net = _net()
    ema = MomentumNetwork(net, 0.5)
    src, dst = SubNet(RES, 2), SubNet(RES, 4)
    net.apply_subnet(src)
    ema.module.apply_subnet(src)
    # online weights move away from the EMA
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ema_blocks = [_snap(b) for b in ema.module.blocks]
    online_blocks = [_snap(b) for b in net.blocks]
    ema_rest = _non_block_state(ema.module)
    online_rest = _non_block_state(net)
    assert not _blocks_equal(ema_blocks[0], online_blocks[0])

    result = get_growth_operator("mogrow").grow(net, ema.module, src, dst)
    assert result.from_momentum
    for j, m in enumerate([0, 0, 1, 1]):
        assert _blocks_equal(_snap(net.blocks[j]), ema_blocks[m]), f"online block {j} != EMA block {m}"
        assert not _blocks_equal(_snap(net.blocks[j]), online_blocks[m])
        assert _blocks_equal(_snap(ema.module.blocks[j]), ema_blocks[m])
    rest = _non_block_state(net)
    assert rest.keys() == ema_rest.keys()
    for k in rest:  # patch embedding, tokens, position embedding, norm and head come from the EMA too
        assert torch.equal(rest[k], ema_rest[k]), k
    assert not torch.equal(rest["model.head.weight"], online_rest["model.head.weight"])


def test_interpolation_copies_the_online_network_not_the_ema():
    net = _net()
    ema = MomentumNetwork(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    online = [_snap(b) for b in net.blocks]
    head = net.model.head.weight.detach().clone()
    get_growth_operator("interpolation").grow(net, ema.module, SubNet(RES, 2), SubNet(RES, 4))
    for j, m in enumerate([0, 0, 1, 1]):
        assert _blocks_equal(_snap(net.blocks[j]), online[m])
    assert torch.equal(net.model.head.weight, head)


def test_momentum_network_update():
    net = _net()
    ema = MomentumNetwork(net, 0.75)
    start = net.model.head.weight.detach().clone()
    with torch.no_grad():
        net.model.head.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.model.head.weight, start + 0.25)
    assert all(not p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ConfigError):
        MomentumNetwork(net, 1.0)


# ------------------------------------------------------------------------------- optimizer state
def _train_one_step(net, opt):
    torch.manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _block_state(opt, net, i):
    return {n: {k: v.clone() for k, v in opt.state[p].items()}
            for n, p in net.blocks[i].named_parameters() if p in opt.state}


@pytest.mark.parametrize("op, expected", [
    ("interpolation", {0: 0, 1: 0, 2: 1, 3: 1}),
    ("stacking", {0: 0, 1: 1, 2: 0, 3: 1}),
    ("randinit", {0: None, 1: None, 2: 0, 3: 1}),
])
def test_remap_block_state_moves_adam_moments_with_the_weights(op, expected):
    net = _net()
    opt = build_optimizer(net, 1e-3, 0.05)
    net.apply_subnet(SubNet(RES, 2))
    _train_one_step(net, opt)
    old = {i: _block_state(opt, net, i) for i in range(4)}
    assert old[0] and old[1] and not old[2] and not old[3], "only active blocks have state"
    assert not torch.equal(old[0]["attn.qkv.weight"]["exp_avg"], old[1]["attn.qkv.weight"]["exp_avg"])

    result = get_growth_operator(op).grow(net, None, SubNet(RES, 2), SubNet(RES, 4))
    assert result.block_map == expected
    remap_block_state(opt, net, result.block_map)
    for d, s in expected.items():
        new = _block_state(opt, net, d)
        if s is None:
            assert new == {}, f"re-initialised block {d} must start without optimizer state"
            continue
        assert new.keys() == old[s].keys()
        for name in new:
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[name][k], old[s][name][k]), (d, s, name, k)

    # training continues with the remapped state on the grown network
    net.apply_subnet(SubNet(RES, 4))
    sync_params(opt, net, 0.05)
    _train_one_step(net, opt)
    assert all(_block_state(opt, net, i) for i in range(4))


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_a_growth_starts_a_fresh_optimizer_as_the_official_code_or_carries_its_moments(mode, tmp_path, fake_fmnist,
                                                                                         monkeypatch):
    """prog 3 -> 4 -> 5 -> 6 blocks: ``reset`` clears AdamW's state at every growth that adds blocks (the official
    code builds a new optimizer for each grown model), so the next step counts from 1; ``carry`` (the default)
    keeps the moments."""
    from accelerate import Accelerator

    from autoprog.classification import trainer as tr
    from autoprog.classification.runner import RunSpec, pretrain
    from autoprog.classification.trainer import TrainConfig

    seen, copy = [], tr.Trainer._after_block_copy

    def spy(self, block_map):
        copy(self, block_map)
        steps = [int(s["step"]) for s in self.optimizer.state.values()]
        seen.append((self.step, any(s != d for d, s in block_map.items()), steps))

    monkeypatch.setattr(tr.Trainer, "_after_block_copy", spy)
    spec = RunSpec(method="prog", patch_size=4, depth=6, embed_dim=16, num_heads=2, data_root=str(fake_fmnist),
                   subset=128, train=TrainConfig(epochs=2, batch_size=32, eval_samples=64, count_flops=False,
                                                 optimizer_at_growth=mode))
    assert pretrain(spec, tmp_path / "run", Accelerator(cpu=True))["done"]
    grown = [(step, steps) for step, changed, steps in seen if changed]
    assert len(grown) == 3 and all(step > 0 for step, _ in grown)
    for step, steps in grown:
        assert steps == [] if mode == "reset" else (steps and max(steps) == step), (step, steps)


def test_remapped_state_is_a_copy():
    net = _net()
    opt = build_optimizer(net, 1e-3, 0.05)
    net.apply_subnet(SubNet(RES, 2))
    _train_one_step(net, opt)
    remap_block_state(opt, net, {0: 0, 1: 0, 2: 1, 3: 1})
    p0 = net.blocks[0].attn.qkv.weight
    p1 = net.blocks[1].attn.qkv.weight
    opt.state[p1]["exp_avg"].add_(1.0)
    assert not torch.equal(opt.state[p0]["exp_avg"], opt.state[p1]["exp_avg"])


def test_sync_params_tracks_new_gates():
    net = _net()
    opt = build_optimizer(net, 1e-3, 0.05)
    get_growth_operator("identity").grow(net, None, SubNet(RES, 2), SubNet(RES, 4))
    sync_params(opt, net, 0.05)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    gate = net.blocks[1].ls1.gate
    assert id(gate) in in_opt
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(gate) in no_decay
    assert {id(p) for p in net.parameters()} == in_opt
