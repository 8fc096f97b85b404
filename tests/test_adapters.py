"""The elastic ViT adapter really runs the chosen resolution and blocks, on the built-in ViT and on timm."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from autoprog.adapters.factory import ModelOverrides, build_model
from autoprog.adapters.vit import ElasticViT
from autoprog.errors import ConfigError
from autoprog.space import GrowthSpace, SubNet


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    model = build_model("timm:deit_tiny_patch16_224", num_classes=10, in_chans=1,
                        overrides=ModelOverrides(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3))
    return ElasticViT(model)


@pytest.fixture
def builtin_vit():
    torch.manual_seed(0)
    return tiny_vit(img_size=32, patch_size=8, depth=4, embed_dim=16, num_heads=2)


@pytest.fixture(params=["builtin", "timm"])
def net(request, builtin_vit, timm_vit):
    net = builtin_vit if request.param == "builtin" else timm_vit
    yield net
    net.apply_subnet(net.full_subnet)
    net.zero_grad(set_to_none=True)


class Recorder:
    """Forward hooks on the patch embedding (input size) and on every block (which ran, in order)."""

    def __init__(self, net: ElasticViT):
        self.sizes, self.ran, self.handles = [], [], []
        self.handles.append(net.model.patch_embed.register_forward_pre_hook(
            lambda m, args: self.sizes.append(tuple(args[0].shape[-2:]))))
        for i, blk in enumerate(net.blocks):
            self.handles.append(blk.register_forward_hook(lambda m, a, o, i=i: self.ran.append(i)))

    def close(self):
        for h in self.handles:
            h.remove()


def _run(net, subnet, batch=3, size=32):
    net.apply_subnet(subnet)
    rec = Recorder(net)
    try:
        torch.manual_seed(0)
        out = net(torch.randn(batch, 1, size, size))
    finally:
        rec.close()
    return out, rec


def test_full_model_geometry(net):
    assert net.patch_size == 8 and net.full_resolution == 32 and net.full_depth == 4
    assert net.full_subnet == SubNet(32, 4)
    out, rec = _run(net, net.full_subnet)
    assert out.shape == (3, 10)
    assert rec.sizes == [(32, 32)]
    assert rec.ran == [0, 1, 2, 3]


def test_small_subnet_runs_lower_resolution_and_first_blocks(net):
    out, rec = _run(net, SubNet(16, 2))
    assert out.shape == (3, 10)
    assert rec.sizes == [(16, 16)], "the input must be resized to the sub-network's resolution"
    assert rec.ran == [0, 1]


def test_chosen_blocks_run_in_the_given_order(net):
    out, rec = _run(net, SubNet(32, 3, blocks=(0, 2, 3)))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert rec.sizes == [(32, 32)]
    assert rec.ran == [0, 2, 3]
    _, rec = _run(net, SubNet(24, 2, blocks=(3, 1)))
    assert rec.sizes == [(24, 24)] and rec.ran == [3, 1]


def test_inputs_already_at_subnet_resolution_are_not_resized(net):
    _, rec = _run(net, SubNet(16, 2), size=16)
    assert rec.sizes == [(16, 16)]


def test_subnets_compute_different_functions(net):
    net.eval()
    full, _ = _run(net, net.full_subnet)
    small, _ = _run(net, SubNet(16, 2))
    skip, _ = _run(net, SubNet(32, 3, blocks=(0, 2, 3)))
    net.train()
    assert not torch.allclose(full, small) and not torch.allclose(full, skip)


def test_inactive_blocks_are_frozen_and_get_no_gradient(net):
    out, _ = _run(net, SubNet(16, 3, blocks=(0, 2, 3)))
    for p in net.blocks[1].parameters():
        assert not p.requires_grad
    for i in (0, 2, 3):
        assert all(p.requires_grad for p in net.blocks[i].parameters())
    assert all(p.requires_grad for p in net.model.patch_embed.parameters())
    assert all(p.requires_grad for p in net.model.head.parameters())
    out.sum().backward()
    assert all(p.grad is None for p in net.blocks[1].parameters())
    for i in (0, 2, 3):
        grads = [p.grad for p in net.blocks[i].parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    # back to the full model: everything trains again
    net.apply_subnet(net.full_subnet)
    assert all(p.requires_grad for p in net.parameters())


def test_apply_subnet_rejects_subnets_that_do_not_fit(net):
    for bad in (SubNet(20, 2), SubNet(40, 2), SubNet(32, 5), SubNet(32, 2, blocks=(0, 4))):
        with pytest.raises(ConfigError):
            net.apply_subnet(bad)
    assert net.subnet == net.full_subnet, "a rejected sub-network must not be applied"


def test_growth_space_of_the_model(net):
    space = net.growth_space(4, 0.5)
    assert space.full == net.full_subnet
    assert space.resolutions() == [16, 24, 32]  # 4 patches/side: 2, 2.67→3, 3.33→3, 4
    assert space.depths() == [2, 3, 4]


def test_gates_are_installed_and_removed(net):
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
        net.set_gate(2, 0.0)
        assert net.gated(2) and net.gated_blocks() == [2]
        gated = net(x)
        net.set_gate(2, None)
        assert net.gated_blocks() == []
        back = net(x)
    net.train()
    assert not torch.allclose(gated, ref, atol=1e-5), "a zero gate turns the block into an identity map"
    torch.testing.assert_close(back, ref)


def test_reset_block_changes_weights(net):
    before = net.blocks[1].attn.qkv.weight.detach().clone()
    torch.manual_seed(123)
    net.reset_block(1)
    assert not torch.equal(net.blocks[1].attn.qkv.weight, before)


# ----------------------------------------------------------------------------------- the factory
def test_builtin_model_defaults_and_overrides():
    m = build_model("vit", num_classes=7, in_chans=3)
    assert m.patch_embed.img_size == (28, 28) and m.patch_embed.patch_size == (4, 4) and len(m.blocks) == 6
    from autoprog.adapters.factory import builtin_patch_size

    # the largest patch that divides the image and leaves at least a 7x7 grid
    assert [builtin_patch_size(s) for s in (8, 28, 64, 224, 30)] == [1, 4, 8, 32, 3]
    m = build_model("vit", 5, 1, ModelOverrides(img_size=64))
    assert m.patch_embed.patch_size == (8, 8), "64 px: an 8x8 grid, not a patch of 9 that does not divide 64"
    m = build_model("vit", 5, 1, ModelOverrides(img_size=16, patch_size=4, depth=2, embed_dim=8, num_heads=2))
    net = ElasticViT(m)
    assert (net.full_resolution, net.patch_size, net.full_depth) == (16, 4, 2)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_timm_model_is_built_without_download_and_as_asked(timm_vit):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    assert isinstance(timm_vit.model, TimmViT)
    assert timm_vit.model.embed_dim == 48 and timm_vit.model.patch_embed.proj.in_channels == 1


@pytest.mark.parametrize("name", ["nope", "timm:not_a_model", "deit_tiny_patch16_224"])
def test_unknown_model_names_raise_config_error(name):
    with pytest.raises(ConfigError):
        build_model(name, 10, 1)


def test_non_vit_timm_model_raises_config_error():
    with pytest.raises(ConfigError):
        build_model("timm:resnet18", 10, 1)


@pytest.mark.parametrize("name, overrides", [
    ("vit", ModelOverrides(img_size=30, patch_size=4)),
    ("vit", ModelOverrides(img_size=28, patch_size=3)),
    ("timm:deit_tiny_patch16_224", ModelOverrides(img_size=36, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    ("timm:deit_tiny_patch16_224", ModelOverrides(img_size=40, depth=2, embed_dim=32, num_heads=2)),  # patch 16
])
def test_image_size_not_divisible_by_patch_size_raises_config_error(name, overrides):
    with pytest.raises(ConfigError, match="divisible"):
        build_model(name, 10, 1, overrides)


def test_embed_dim_not_divisible_by_heads_raises_config_error():
    with pytest.raises(ConfigError):
        build_model("vit", 10, 1, ModelOverrides(embed_dim=10, num_heads=4))


def test_adapter_rejects_modules_that_are_not_vits():
    with pytest.raises(ConfigError):
        ElasticViT(nn.Linear(3, 3))


def test_adapter_rejects_timm_vit_without_dynamic_img_size():
    import timm

    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, img_size=32,
                          patch_size=8, depth=1, embed_dim=16, num_heads=2)
    with pytest.raises(ConfigError, match="dynamic_img_size"):
        ElasticViT(m)


# ------------------------------------------------------------------------------------------------ VOLO
def _tiny_volo():
    """Two outlookers on the fine grid, then 1 + 2 + 1 transformers: block segments (2, 4)."""
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    return VOLO(layers=(2, 1, 2, 1), img_size=32, in_chans=1, num_classes=10, embed_dims=(16, 32, 32, 32),
                num_heads=(1, 2, 2, 2), stem_hidden_dim=8)


def test_volo_is_one_adapter_that_grows_resolution_and_both_its_block_kinds():
    from autoprog.adapters import elastic
    from autoprog.adapters.volo import ElasticVOLO

    net = elastic(_tiny_volo())
    assert isinstance(net, ElasticVOLO)
    assert (net.patch_size, net.full_resolution, net.full_depth) == (16, 32, 6), "2 outlookers + 4 transformers"
    assert net.segments.sizes == (2, 4)
    x = torch.randn(2, 1, 32, 32)
    for sub, blocks in [(SubNet(16, 2), (0, 2)), (SubNet(32, 3), (0, 1, 2)), (SubNet(32, 5), (0, 1, 2, 3, 4)),
                        (SubNet(32, 6), tuple(range(6)))]:
        net.apply_subnet(sub)
        assert net.blocks_of(sub) == blocks, "each segment runs its first blocks, as the official split says"
        out = net(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.sum().backward()
        for i, blk in enumerate(net.blocks):
            got = [p.grad is not None for p in blk.parameters()]
            assert all(got) if i in blocks else not any(got), (sub, i)
        net.zero_grad(set_to_none=True)


def test_volo_depth_splits_as_the_official_code_does():
    """``models/volo.py: set_sample_config``: make_divisible(0.23·l, 2) outlookers, the rest transformers; VOLO-D1's
    0.5Ω and 0.4Ω depths (9, 12, 15 and 7, 11, 14) are nested, so every stage grows both kinds of block."""
    from autoprog.space import Segments

    d1 = Segments((4, 14), first_share=0.23)
    want = {2: (1, 1), 3: (2, 1), 7: (2, 5), 9: (2, 7), 10: (4, 6), 11: (4, 7), 12: (4, 8), 14: (4, 10),
            15: (4, 11), 18: (4, 14)}
    assert {d: d1.split(d) for d in want} == want
    for ratio in (0.5, 0.4, 0.25):
        GrowthSpace(224, 16, 18, 4, ratio, d1)  # nested: accepted
    with pytest.raises(ConfigError, match="would remove blocks") as e:  # 9 = 2 + 7 but 10 = 4 + 6
        GrowthSpace(224, 16, 18, 10, 0.5, d1)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="each segment runs at least one"):
        GrowthSpace(224, 16, 18, 1, 1.0, d1).validate(SubNet(224, 1))
    with pytest.raises(ConfigError, match="after a later segment"):
        GrowthSpace(224, 16, 18, 1, 1.0, d1).validate(SubNet(224, 2, (5, 0)))


def test_volo_growth_maps_depth_inside_each_block_segment():
    from autoprog.adapters import elastic
    from autoprog.algorithms.growth import MomentumNetwork, get_growth_operator

    net = elastic(_tiny_volo())
    net.eval()
    net.apply_subnet(SubNet(32, 2))  # outlooker 0, transformer 2
    x = torch.randn(2, 1, 32, 32)
    before = net(x)
    ema = MomentumNetwork(net, 0.9)
    result = get_growth_operator("identity").grow(net, ema.module, SubNet(32, 2), SubNet(32, 6))
    assert result.block_map == {0: 0, 1: 0, 2: 2, 3: 2, 4: 2, 5: 2}, "no block is copied across the downsampling"
    net.apply_subnet(SubNet(32, 6))
    assert net.gated_blocks() == [1, 3, 4, 5], "the new outlooker and the new transformers start as identities"
    assert torch.allclose(net(x), before, atol=1e-5), "zero-gated new blocks leave the function unchanged"
    net.set_gate(1, None)
    assert net.gated_blocks() == [3, 4, 5]
    with pytest.raises(ConfigError, match="remove blocks"):
        get_growth_operator("interpolation").grow(net, None, SubNet(32, 4, (0, 1, 2, 3)), SubNet(32, 5, (0, 2, 3, 4, 5)))


def test_volo_supernet_layout_nests_each_segment_and_recycles_into_it():
    from autoprog.algorithms.elastic import ElasticLayout, elastic_layout
    from autoprog.space import Segments

    space = GrowthSpace(224, 16, 18, 4, 0.5, Segments((4, 14), first_share=0.23))
    lay = elastic_layout(space, 9, 15)  # a stage after choosing 9 = 2 + 7: candidates 9, 12, 15
    seen = set()
    for d in (9, 12, 15):
        blocks = lay.blocks(d)
        outl = [b for b in blocks if b < 4]
        assert len(blocks) == d and len(outl) == space.segments.split(d)[0] and blocks[:len(outl)] == tuple(outl)
        assert seen <= set(blocks), "weight-nesting: a deeper candidate holds every block of a shallower one"
        seen = set(blocks)
    assert lay.blocks(12)[:4] == ElasticLayout(2, 4).blocks(4), "the outlookers' own layout"
    assert all((dst < 4) == (src < 4) for dst, src in lay.source_map().items()), "copies stay in their segment"
    assert sorted(lay.source_map()) == [2, 3, 11, 12, 13, 14]
    moved = space.segments.compaction(lay.blocks(12))
    assert sorted(moved) == [0, 1, 2, 3, *range(4, 12)], "recycled into each segment's first positions"
    assert all((dst < 4) == (src < 4) for dst, src in moved.items())


def test_autoprog_one_searches_a_volo_in_your_own_loop():
    import torch.nn.functional as F

    from autoprog.adapters import elastic
    from autoprog.algorithms.autoprog_one import AutoProgOne, AutoProgOneConfig
    from autoprog.loop import ProgressiveLoop, ProxyData

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    net = elastic(_tiny_volo())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    space = net.growth_space(3, 0.34)  # depths 2 (1 + 1), 4 (2 + 2), 6 (2 + 4)
    ctrl = AutoProgOne(space, AutoProgOneConfig(search_epochs=1, search_samples=8, search_min_updates=1))
    loop = ProgressiveLoop.growing(net, opt, 24, schedule=ctrl, steps_per_epoch=4, log=lambda s: None,
                                   proxy=ProxyData(data, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1])))
    supernets = []
    for i in range(loop.total_steps):
        x, y = data[i % 2]
        loop.before_step()
        if ctrl.searching and ctrl.cands not in supernets:
            supernets.append(ctrl.cands)
            for c in ctrl.cands:  # every candidate runs its own segments' blocks, outlookers first
                parts = space.segments.partition(c.active_blocks)
                assert [len(p) for p in parts] == list(space.segments.split(c.depth))
        loss = F.cross_entropy(net(loop.resize(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loop.after_step(loss)
    assert supernets, "no supernet phase ran"
    stages = loop.schedule().stages
    assert stages[-1].subnet == space.full and net.blocks_of(net.subnet) == tuple(range(6))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_volo_from_the_command_line_and_refusals(cli, fake_fmnist, tmp_path):
    from conftest import tiny_args

    args = [a for a in tiny_args(fake_fmnist, epochs="1", subset="64")]
    for flag in ("--embed-dim", "--depth", "--num-heads", "--patch-size"):  # VOLO takes its architecture from its name
        i = args.index(flag)
        del args[i:i + 2]
    rc, _, err = cli("pretrain", "--model", "timm:volo_d1_224", "--img-size", "32", "--method", "prog",
                     "--out", tmp_path / "v", *args)
    assert rc == 0, err
    sched = json.loads((tmp_path / "v" / "schedule.json").read_text())["stages"]
    assert (sched[-1]["resolution"], sched[-1]["depth"]) == (32, 18), "4 outlookers + 14 transformers"
    assert [s["depth"] for s in sched] == [9, 12, 15, 18]
    rc, _, err = cli("pretrain", "--model", "timm:volo_d1_224", "--img-size", "32", "--method", "prog",
                     "--num-stages", "10", "--out", tmp_path / "n", *args)
    assert rc == 2 and "would remove blocks" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli("pretrain", "--model", "timm:volo_d1_224", "--depth", "4", "--out", tmp_path / "w", *args)
    assert rc == 2 and "--depth" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli("pretrain", "--model", "timm:resnet18", "--img-size", "32", "--out", tmp_path / "r", *args)
    assert rc == 2 and "cannot grow" in err and "VOLO" in err and "ViT" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, adapter", [("timm:eva02_tiny_patch14_224", "ElasticEva"),
                                           ("timm:deit3_small_patch16_224", "ElasticViT")])
def test_eva_and_deit3_grow_and_their_gates_preserve_the_function(name, adapter):
    from autoprog.adapters.factory import ModelOverrides, build_elastic
    from autoprog.algorithms.growth import MomentumNetwork, get_growth_operator

    torch.manual_seed(0)
    net = build_elastic(name, 10, 1, ModelOverrides(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2))
    assert type(net).__name__ == adapter
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    net.apply_subnet(SubNet(32, 2))
    before = net(x)
    ema = MomentumNetwork(net, 0.9)
    get_growth_operator("identity").grow(net, ema.module, SubNet(32, 2), SubNet(32, 4))
    net.apply_subnet(SubNet(32, 4))
    assert net.gated_blocks() == [1, 3]
    assert torch.allclose(net(x), before, rtol=1e-4, atol=1e-9), "zero-gated new blocks leave the function unchanged"
    net.set_gated_blocks([])
    assert not torch.allclose(net(x), before, rtol=1e-4, atol=1e-9), "ungated, the new blocks change it"


def test_eva_from_the_command_line(cli, fake_fmnist, tmp_path):
    from conftest import tiny_args

    rc, _, err = cli("pretrain", "--model", "timm:eva02_tiny_patch14_224", "--img-size", "28", "--method", "prog",
                     "--out", tmp_path / "e", *tiny_args(fake_fmnist, epochs="1", subset="64"))
    assert rc == 0, err
    sched = json.loads((tmp_path / "e" / "schedule.json").read_text())["stages"]
    assert (sched[-1]["resolution"], sched[-1]["depth"]) == (28, 4)


def test_volo_adareg_ramps_drop_path_over_the_blocks_that_run():
    from timm.layers import DropPath

    from autoprog.adapters import elastic
    from autoprog.classification.adareg import AdaptiveRegularization, AdaRegRanges

    net = elastic(_tiny_volo())
    space = net.growth_space(3, 0.34)
    reg = AdaptiveRegularization(space, AdaRegRanges(drop_path=(0.2, 0.2)))
    reg.set_subnet(net, SubNet(32, 2))  # outlooker 0 and transformer 2 run
    rate = lambda i: getattr(net.blocks[i].drop_path1, "drop_prob", 0.0)  # noqa: E731
    assert rate(0) == 0.0 and rate(2) == pytest.approx(0.2), "the ramp spans the running blocks, outlookers first"
    assert not isinstance(net.blocks[1].drop_path1, DropPath) or rate(1) == 0.0, "an idle outlooker gets no rate"


def test_a_volo_state_from_before_outlookers_grew_is_refused_in_one_line():
    from autoprog.adapters import elastic
    from autoprog.adapters.base import check_segments, segment_sizes

    net = elastic(_tiny_volo())
    assert segment_sizes(net) == [2, 4] and segment_sizes(elastic(tiny_vit())) is None
    check_segments(net, [2, 4], "state")
    with pytest.raises(ConfigError, match="before VOLO's depth counted its outlookers") as e:
        check_segments(net, None, "this run's checkpoint")
    assert len(str(e.value).splitlines()) == 1
