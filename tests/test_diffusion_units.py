"""Unit tests of the diffusion package: backbones, SID, save/load, fine-tuning methods, data, sampling.

Every model here is tiny (8-px images, patch 2, 16 wide, 3 blocks) and float32 on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import saved_tensors_and_grads
from safetensors.torch import load_file, save_file

from autoprog.adapters.unfreezer import Unfreezer, interleaved_blocks, spread_blocks, tail_blocks
from autoprog.diffusion.data import DiffusionData, load_diffusion_data, parse_classes
from autoprog.diffusion.methods import (
    ScaleFactors,
    export_backbone,
    prepare_bitfit,
    prepare_difffit,
    prepare_lora,
)
from autoprog.diffusion.sampling import (
    balanced_labels,
    diffusion_loss,
    sample,
    shard_bounds,
    shard_indices,
    training_scheduler,
)
from autoprog.errors import ConfigError, DataError
from autoprog.models.dit import (
    DiffusersDiT,
    DiT,
    build_backbone,
    load_backbone,
    save_backbone,
)
from autoprog.models.sid import StageIdentifier
from autoprog.optim import build_optimizer
from autoprog.space import SubNet

KINDS = ("dit", "diffusers-dit")
TINY = dict(image_size=8, patch_size=2, in_chans=1, num_classes=4, hidden_size=16, depth=3, num_heads=2)


def tiny(kind: str = "dit", **kw):
    return build_backbone(kind, **{**TINY, **kw}).float()


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.1) -> None:
    """Add noise to every parameter so that zero-initialised layers (adaLN-Zero, final layer) pass signal."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)


def perturbed(kind: str):
    """A tiny model of ``kind`` in eval mode whose every parameter carries signal (seeded)."""
    torch.manual_seed(0)
    m = tiny(kind).eval()
    perturb(m)
    return m


def inputs(b: int = 4, res: int = 8, chans: int = 1, num_classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, chans, res, res, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    return x, t, y


def run(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def condition_names(model) -> set[str]:
    ids = {id(p) for p in model.condition_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("res", [8, 4])
def test_forward_keeps_input_shape(kind, res):
    torch.manual_seed(0)
    m = tiny(kind)
    perturb(m)
    x, t, y = inputs(b=3, res=res)
    out = run(m, x, t, y)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_dit_rejects_input_not_divisible_by_patch():
    torch.manual_seed(0)
    m = tiny("dit")
    x, t, y = inputs(res=5)
    with pytest.raises(ConfigError):
        run(m, x, t, y)


def test_dit_adaln_zero_output_is_zero_at_init_then_nonzero():
    torch.manual_seed(0)
    m = tiny("dit")
    assert isinstance(m, DiT)
    x, t, y = inputs()
    assert torch.equal(run(m, x, t, y), torch.zeros_like(x))
    perturb(m)
    assert (run(m, x, t, y) != 0).any()


def test_lower_resolution_changes_output_per_position():
    """The position embedding is computed for the input grid: a 4-px input is not the 8-px output cropped."""
    torch.manual_seed(0)
    m = tiny("dit")
    perturb(m)
    x, t, y = inputs(res=8)
    small = torch.nn.functional.interpolate(x, size=4, mode="bilinear", antialias=True)
    out = run(m, small, t, y)
    assert out.shape == (4, 1, 4, 4)
    assert m._pos_embed(2, 2, x.device, x.dtype).shape == (1, 4, 16)
    assert m._pos_embed(4, 4, x.device, x.dtype).shape == (1, 16, 16)


# ----------------------------------------------------------------------------------- block_index
def test_block_index_dit_matches_whole_components():
    torch.manual_seed(0)
    m = tiny("dit", depth=12)
    names = dict(m.named_parameters())
    assert "blocks.1.attn.qkv.weight" in names and "blocks.10.mlp.fc1.weight" in names
    assert m.block_index("blocks.1.attn.qkv.weight") == 1
    assert m.block_index("blocks.10.mlp.fc1.weight") == 10
    assert m.block_index("blocks.11.adaLN_modulation.1.bias") == 11
    assert m.block_index("y_embedder.weight") is None
    assert m.block_index("final_layer.linear.weight") is None
    assert m.block_index("x_embedder.weight") is None
    assert m.block_index("xblocks.1.weight") is None
    assert m.block_index("difffit.gamma.3_attn") is None
    assert m.block_index("base_model.blocks.3.attn.qkv.lora_A.default.weight") == 3
    for name in names:
        parts = name.split(".")
        expect = int(parts[1]) if parts[0] == "blocks" else None
        assert m.block_index(name) == expect, name
    counts = [sum(m.block_index(n) == i for n in names) for i in range(12)]
    assert len(set(counts)) == 1 and counts[0] > 0  # every block owns the same number of parameters


def test_block_index_diffusers_matches_whole_components():
    torch.manual_seed(0)
    m = tiny("diffusers-dit", depth=12)
    names = dict(m.named_parameters())
    assert "model.transformer_blocks.11.attn1.to_q.weight" in names
    assert m.block_index("model.transformer_blocks.11.attn1.to_q.weight") == 11
    assert m.block_index("model.transformer_blocks.1.ff.net.2.bias") == 1
    assert m.block_index("model.transformer_blocks.10.norm1.linear.weight") == 10
    assert m.block_index("model.proj_out_1.weight") is None
    assert m.block_index("model.pos_embed.proj.weight") is None
    assert m.block_index("transformer_blocks.1.ff.net.2.bias") is None  # the prefix is two components
    for name in names:
        parts = name.split(".")
        expect = int(parts[2]) if parts[:2] == ["model", "transformer_blocks"] else None
        assert m.block_index(name) == expect, name


# -------------------------------------------------------------------------------------------- SID
def test_stage_identifier_needs_a_stage():
    with pytest.raises(ConfigError):
        StageIdentifier(0, 16)
    sid = StageIdentifier(3, 16, init="zero")
    assert sid.stage == 2 and sid.num_stages == 3 and not sid.null_row
    assert torch.equal(sid.embedding.weight, torch.zeros(3, 16))
    # the official init by default: N(0, 0.02) rows (apz_models.py), plus a null-stage row with dropout
    torch.manual_seed(0)
    sid = StageIdentifier(4, 256, dropout=0.1)
    assert sid.num_stages == 4 and sid.null_row and sid.embedding.weight.shape == (5, 256)
    assert abs(float(sid.embedding.weight.detach().std()) - 0.02) < 0.002
    assert not torch.equal(sid.embedding.weight[0], torch.zeros(256))
    with pytest.raises(ConfigError):
        StageIdentifier(3, 16, init="ones")
    with pytest.raises(ConfigError):
        StageIdentifier(3, 16, dropout=0.1, null_row=False)


@pytest.mark.parametrize("kind", KINDS)
def test_sid_dropout_uses_the_null_row_only_in_training_within_dropping(kind):
    """Stage-id dropout (the official StageEmbedder.token_drop): in training, the samples of the mask get the
    null-stage row; sampling (eval), proxies and plain forwards always get the stage's own row."""
    m = perturbed(kind)
    sid = m.add_stage_identifier(2, dropout=0.5)
    m.set_stage(1)
    with torch.no_grad():
        sid.embedding.weight[2] = 3.0  # a null row far from the stage's
    x, t, y = inputs(b=6)
    mask = sid.dropout_mask(6, torch.Generator().manual_seed(0))
    assert torch.equal(mask, sid.dropout_mask(6, torch.Generator().manual_seed(0)))  # the caller's seeded draw
    mask = torch.tensor([True, False, True, False, False, True])
    m.train()
    plain = m(x, t, y)
    with sid.dropping(mask):
        dropped = m(x, t, y)
    assert torch.equal(m(x, t, y), plain)  # outside dropping: no dropout
    assert torch.allclose(dropped[~mask], plain[~mask], atol=1e-6)
    assert all(not torch.allclose(dropped[i], plain[i], atol=1e-4) for i in mask.nonzero().flatten())
    m.eval()
    with sid.dropping(mask):
        assert torch.equal(m(x, t, y), plain)  # sampling never uses the null row
    assert StageIdentifier(2, 8).dropout_mask(4) is None  # no dropout: nothing to draw


@pytest.mark.parametrize("kind", KINDS)
def test_sid_zero_init_stage_switching_and_range(kind):
    m = perturbed(kind)
    x, t, y = inputs()
    ref = run(m, x, t, y)
    sid = m.add_stage_identifier(3, init="zero")
    assert m.sid is sid
    assert torch.equal(run(m, x, t, y), ref)  # zero rows: the function is unchanged
    with torch.no_grad():
        sid.embedding.weight[1] = torch.randn(m.hidden_size)
    m.set_stage(1)
    changed = run(m, x, t, y)
    assert not torch.allclose(changed, ref, atol=1e-4)
    m.set_stage(0)
    assert torch.equal(run(m, x, t, y), ref)
    m.set_stage(1)
    assert torch.equal(run(m, x, t, y), changed)
    for bad in (3, -1, 10):
        with pytest.raises(ConfigError):
            m.set_stage(bad)
    assert sid.stage == 1  # a refused stage leaves the current one


@pytest.mark.parametrize("kind", KINDS)
def test_sid_gradient_only_in_active_row(kind):
    torch.manual_seed(0)
    m = tiny(kind).train()
    perturb(m)
    m.add_stage_identifier(3)
    m.set_stage(1)
    x0, _, y = inputs(b=8)
    loss = diffusion_loss(m, x0, y, training_scheduler(), m.null_class, generator=torch.Generator().manual_seed(0))
    loss.backward()
    g = m.sid.embedding.weight.grad
    assert g is not None
    assert g[1].abs().sum() > 0
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.equal(g[2], torch.zeros_like(g[2]))


def test_diffusers_sid_reaches_every_block_class_embedder():
    torch.manual_seed(0)
    m = tiny("diffusers-dit").eval()
    perturb(m)
    m.add_stage_identifier(2, init="zero")
    m.set_stage(1)
    records: dict[int, list[torch.Tensor]] = {i: [] for i in range(m.depth)}
    handles = [blk.norm1.emb.class_embedder.register_forward_hook(
        lambda mod, args, out, i=i: records[i].append(out.detach().clone()))
        for i, blk in enumerate(m.blocks)]
    x, t, y = inputs()
    base_out = run(m, x, t, y)
    base = {i: list(r) for i, r in records.items()}
    for r in records.values():
        r.clear()
    vec = torch.randn(m.hidden_size)
    with torch.no_grad():
        m.sid.embedding.weight[1] = vec
    sid_out = run(m, x, t, y)
    for h in handles:
        h.remove()
    assert not torch.allclose(sid_out, base_out, atol=1e-4)
    for i in range(m.depth):
        assert len(records[i]) >= 1 and len(records[i]) == len(base[i]), f"block {i}"
        for before, after in zip(base[i], records[i]):
            torch.testing.assert_close(after - before, vec.expand_as(before), rtol=0, atol=1e-6)


def test_diffusers_sid_hook_follows_deepcopy():
    """EMA (timm ModelEmaV3) and export deep-copy the model: the copy's hooks must use the copy's SID."""
    import copy

    torch.manual_seed(0)
    m = tiny("diffusers-dit").eval()
    perturb(m)
    m.add_stage_identifier(2)
    c = copy.deepcopy(m)
    x, t, y = inputs()
    ref = run(c, x, t, y)
    with torch.no_grad():
        m.sid.embedding.weight[1] = 5.0
    assert torch.equal(run(c, x, t, y), ref)  # the original's SID does not reach the copy
    with torch.no_grad():
        c.sid.embedding.weight[1] = 1.0
    assert not torch.allclose(run(c, x, t, y), ref, atol=1e-4)


def test_diffusers_class_dropout_disabled():
    torch.manual_seed(0)
    m = tiny("diffusers-dit").train()
    perturb(m)
    for blk in m.blocks:
        assert blk.norm1.emb.class_embedder.dropout_prob == 0.0
    x, t, y = inputs(b=64)
    a = run(m, x, t, y)
    b = run(m, x, t, y)
    assert torch.equal(a, b)
    # the check is sensitive: with diffusers' own dropout (0.1) back on, train-mode outputs differ
    for blk in m.blocks:
        blk.norm1.emb.class_embedder.dropout_prob = 0.1
    torch.manual_seed(1)
    assert not torch.equal(run(m, x, t, y), run(m, x, t, y))


# --------------------------------------------------------------------------------- resize_classes
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [6, 2])
def test_resize_classes_keeps_rows_and_moves_null(kind, n):
    m = perturbed(kind)
    old = [e.weight.detach().clone() for e in m.class_embedding_modules()]
    x, t, _ = inputs()
    null_before = run(m, x, t, torch.full((4,), m.null_class))
    m.resize_classes(n)
    assert m.num_classes == n and m.null_class == n and m.config["num_classes"] == n
    embs = m.class_embedding_modules()
    assert len(embs) == len(old) == (1 if kind == "dit" else m.depth)
    keep = min(n, 4)
    for e, w in zip(embs, old):
        assert e.weight.shape == (n + 1, m.hidden_size) and e.num_embeddings == n + 1
        assert torch.equal(e.weight[:keep], w[:keep])
        assert torch.equal(e.weight[n], w[4])
        assert e.weight.requires_grad
    if kind == "diffusers-dit":
        assert m.model.config.num_embeds_ada_norm == n
        assert all(blk.norm1.emb.class_embedder.num_classes == n for blk in m.blocks)
    # the null class is still the null class: same output; every new id embeds
    assert torch.equal(run(m, x, t, torch.full((4,), n)), null_before)
    run(m, x, t, torch.arange(4) % n)
    if kind == "dit":
        with pytest.raises(IndexError):
            run(m, x, t, torch.full((4,), n + 1))


# ------------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_keeps_the_null_stage_row(kind, tmp_path):
    """A model trained with SID dropout exports its null-stage row; it loads back (shape from the weights) and
    samples with the stage's own row, exactly as before export."""
    m = perturbed(kind)
    m.add_stage_identifier(3, dropout=0.1)
    x, t, y = inputs()
    ref = run(m, x, t, y)
    save_backbone(m, tmp_path / "m")
    loaded, meta = load_backbone(tmp_path / "m")
    assert meta["sid_stages"] == 3 and loaded.sid.num_stages == 3 and loaded.sid.null_row
    assert loaded.sid.embedding.weight.shape == (4, m.hidden_size) and loaded.sid.stage == 2
    assert torch.equal(run(loaded.eval(), x, t, y), ref)
    loaded.set_stage(0)
    with pytest.raises(ConfigError):
        loaded.set_stage(3)  # the null row is no stage


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_sid", [False, True])
def test_save_load_round_trip(kind, with_sid, tmp_path):
    m = perturbed(kind)
    if with_sid:
        m.add_stage_identifier(3)
        with torch.no_grad():
            m.sid.embedding.weight.normal_()
    x, t, y = inputs()
    ref = run(m, x, t, y)
    save_backbone(m, tmp_path / "m", extra={"note": "hi"})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["kind"] == kind and meta["sid_stages"] == (3 if with_sid else 0) and meta["note"] == "hi"
    loaded, meta2 = load_backbone(tmp_path / "m")
    assert type(loaded) is type(m) and meta2["kind"] == kind
    assert (loaded.sid is not None) == with_sid
    torch.testing.assert_close(run(loaded.eval(), x, t, y), ref, rtol=0, atol=0)
    if with_sid:
        assert loaded.sid.num_stages == 3 and loaded.sid.stage == 2
        plain, _ = load_backbone(tmp_path / "m", with_sid=False)
        assert plain.sid is None
        m.sid = None
        torch.testing.assert_close(run(plain.eval(), x, t, y), run(m, x, t, y), rtol=0, atol=0)


def test_save_load_after_resize_diffusers(tmp_path):
    torch.manual_seed(0)
    m = tiny("diffusers-dit").eval()
    perturb(m)
    m.resize_classes(7)
    x, t, _ = inputs()
    y = torch.tensor([0, 5, 6, 7])
    save_backbone(m, tmp_path / "m")
    loaded, _ = load_backbone(tmp_path / "m")
    assert loaded.num_classes == 7
    torch.testing.assert_close(run(loaded.eval(), x, t, y), run(m, x, t, y), rtol=0, atol=0)


def test_load_diffusers_save_pretrained_directory(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    inner = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4)
    ref_model = DiffusersDiT(model=inner).eval()
    perturb(ref_model)
    x, t, y = inputs()
    ref = run(ref_model, x, t, y)
    inner.save_pretrained(tmp_path / "hf")
    loaded, meta = load_backbone(tmp_path / "hf")
    assert isinstance(loaded, DiffusersDiT) and meta["kind"] == "diffusers-dit"
    assert loaded.num_classes == 4 and loaded.depth == 2 and loaded.hidden_size == 16
    torch.testing.assert_close(run(loaded.eval(), x, t, y), ref, rtol=0, atol=0)


def test_load_rejects_bad_directories(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_backbone(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ConfigError):
        load_backbone(tmp_path / "other")


def test_load_rejects_weights_with_missing_or_extra_keys(tmp_path):
    torch.manual_seed(0)
    m = tiny("dit")
    d = save_backbone(m, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state.pop("final_layer.linear.weight")
    save_file(state, d / "model.safetensors")
    with pytest.raises(ConfigError):
        load_backbone(d)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    state["bogus.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ConfigError):
        load_backbone(d)


def test_load_rejects_weights_with_wrong_shapes(tmp_path):
    torch.manual_seed(0)
    d = save_backbone(tiny("dit"), tmp_path / "m")
    wider = tiny("dit", hidden_size=32)
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, d / "model.safetensors")
    with pytest.raises(ConfigError):
        load_backbone(d)


# ----------------------------------------------------------------------------------- spread_blocks
def test_spread_blocks_values():
    assert spread_blocks(8, 2) == (3, 7)
    assert spread_blocks(8, 4) == (1, 3, 5, 7)
    assert spread_blocks(6, 6) == (0, 1, 2, 3, 4, 5)
    assert spread_blocks(8, 1) == (7,)
    assert spread_blocks(1, 1) == (0,)


def test_spread_blocks_properties():
    for depth in range(1, 17):
        for k in range(1, depth + 1):
            s = spread_blocks(depth, k)
            assert len(s) == k, (depth, k)
            assert s == tuple(sorted(set(s)))
            assert depth - 1 in s
            assert all(0 <= i < depth for i in s)


@pytest.mark.parametrize("depth,k", [(8, 0), (8, 9), (0, 0), (4, -1)])
def test_spread_blocks_invalid(depth, k):
    with pytest.raises(ConfigError):
        spread_blocks(depth, k)


# -------------------------------------------------------------------------------------- Unfreezer
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_step(model, seed=0):
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)  # AdamW over *all* parameters, as the trainer
    x0, _, y = inputs(b=8, seed=seed)
    loss = diffusion_loss(model, x0, y, training_scheduler(), model.null_class,
                          generator=torch.Generator().manual_seed(seed))
    loss.backward()
    opt.step()
    return opt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth_learnable", [1, 2])
def test_unfreezer_partial_subnet(kind, depth_learnable):
    torch.manual_seed(0)
    m = tiny(kind).train()
    perturb(m)
    m.add_stage_identifier(2)
    u = Unfreezer(m)
    sub = SubNet(4, depth_learnable)
    u.apply(sub)
    assert u.subnet == sub
    blocks = spread_blocks(m.depth, depth_learnable)
    assert u.blocks_for(sub) == blocks
    cond = condition_names(m)
    assert "sid.embedding.weight" in cond
    expect = {n for n, _ in m.named_parameters() if m.block_index(n) in blocks} | cond
    assert trainable(m) == expect
    before = _snapshot(m)
    opt = _one_step(m)
    for n, p in m.named_parameters():
        if n in expect:
            assert p.grad is not None and n in before and not torch.equal(p, before[n]), n
            assert p in opt.state, n
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n
            assert p not in opt.state, n


@pytest.mark.parametrize("kind", KINDS)
def test_unfreezer_full_and_explicit_blocks(kind):
    torch.manual_seed(0)
    m = tiny(kind)
    perturb(m)
    u = Unfreezer(m)
    u.apply(SubNet(4, 1))
    assert len(trainable(m)) < len(list(m.parameters()))
    u.apply(SubNet(8, 3))
    assert all(p.requires_grad for p in m.parameters())
    u.apply(SubNet(4, 1, blocks=(0,)))
    assert {m.block_index(n) for n in trainable(m) - condition_names(m)} == {0}
    assert trainable(m) == {n for n, _ in m.named_parameters() if m.block_index(n) == 0} | condition_names(m)
    u.apply(SubNet(8, 3))
    before = _snapshot(m)
    _one_step(m)
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_interleaved_blocks_take_whole_groups_from_the_input_side():
    assert interleaved_blocks(28, 7, 4) == tuple(range(0, 28, 4))  # the official l = 1 of DiT-XL/2
    assert interleaved_blocks(28, 14, 4) == tuple(i for i in range(28) if i % 4 < 2)
    assert interleaved_blocks(28, 21, 4) == tuple(i for i in range(28) if i % 4 < 3)
    assert interleaved_blocks(28, 28, 4) == tuple(range(28))
    assert interleaved_blocks(4, 1, 4) == (0,) and interleaved_blocks(6, 3, 4) == (0, 1, 4)
    for k in range(1, 12):  # nested: a larger sub-network keeps every block of a smaller one
        assert set(interleaved_blocks(12, k, 4)) <= set(interleaved_blocks(12, k + 1, 4))
    with pytest.raises(ConfigError):
        interleaved_blocks(4, 5, 4)
    with pytest.raises(ConfigError):
        Unfreezer(tiny("dit"), "interleaved")


@pytest.mark.parametrize("kind", KINDS)
def test_official_layout_trains_everything_outside_the_unlearnable_blocks(kind):
    torch.manual_seed(0)
    m = tiny(kind).train()
    perturb(m)
    m.add_stage_identifier(2)
    u = Unfreezer(m, "official", groups=4)
    sub = SubNet(4, 1)
    u.apply(sub)
    blocks = interleaved_blocks(m.depth, 1, 4)
    assert u.blocks_for(sub) == blocks == (0,)
    outside = {n for n, p in m.named_parameters() if m.block_index(n) is None}
    expect = {n for n, _ in m.named_parameters() if m.block_index(n) in blocks} | outside | condition_names(m)
    assert trainable(m) == expect and "sid.embedding.weight" in expect
    assert any(m.block_index(n) is None and n not in condition_names(m) for n in expect)  # e.g. the embedders
    before = _snapshot(m)
    _one_step(m)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == (n not in expect), n
    u.apply(SubNet(8, m.depth))
    assert all(p.requires_grad for p in m.parameters())


def test_tail_blocks_are_the_last_ones():
    assert tail_blocks(28, 7) == tuple(range(21, 28)) and tail_blocks(4, 4) == (0, 1, 2, 3)
    for k in range(1, 12):  # nested
        assert set(tail_blocks(12, k)) <= set(tail_blocks(12, k + 1))
    with pytest.raises(ConfigError):
        tail_blocks(4, 0)


def _saved_tensors(model, seed=0) -> tuple[int, dict]:
    """How many tensors autograd saves for the backward pass of one loss, and the gradients it gives."""
    x0, _, y = inputs(b=4, seed=seed)
    return saved_tensors_and_grads(model, lambda m: diffusion_loss(m, x0, y, training_scheduler(), m.null_class,
                                                                    generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_no_grad_prefix_keeps_no_activation_below_the_first_learnable_block(kind):
    """--frozen-prefix no-grad: the same forward and the same gradients of the learnable blocks, far fewer
    tensors kept for the backward pass; the condition embeddings learn through the learnable blocks only."""
    import copy

    torch.manual_seed(0)
    m = tiny(kind).train()
    perturb(m)
    m.add_stage_identifier(2)
    sub = SubNet(4, 1)
    Unfreezer(m, "tail").apply(sub)
    saved_full, grads_full = _saved_tensors(m)
    u = Unfreezer(m, "tail", frozen_prefix="no-grad")
    u.apply(sub)
    assert m.no_grad_prefix == m.depth - 1
    saved, grads = _saved_tensors(m)
    assert saved < saved_full / 2, (saved, saved_full)
    assert grads.keys() <= grads_full.keys()
    assert all(m.block_index(n) < m.depth - 1 for n in grads_full.keys() - grads.keys()), "only prefix tables"
    assert {n for n, p in m.named_parameters() if p.requires_grad} == grads.keys()
    last = {n for n in grads if m.block_index(n) == m.depth - 1}
    assert last and all(torch.allclose(grads[n], grads_full[n], atol=1e-6) for n in last)
    cond = condition_names(m) & grads.keys()
    assert cond and any(not torch.allclose(grads[n], grads_full[n]) for n in cond), "fewer paths to the conditions"
    x0, t, y = inputs(b=2)
    with torch.no_grad():
        out = m(x0, t, y)
        clone = copy.deepcopy(m)  # a momentum network: runs its own weights
        for p in clone.parameters():
            p.add_(1.0)
        assert not torch.allclose(clone(x0, t, y), out)
        assert torch.equal(m(x0, t, y), out)
    u.apply(SubNet(8, m.depth))  # the full model: every block recorded again
    assert m.no_grad_prefix == 0 and all("forward" not in vars(b) for b in m.blocks)
    with pytest.raises(ConfigError, match="no-grad"):
        Unfreezer(m, "official", frozen_prefix="no-grad")


# ---------------------------------------------------------------------------------- static methods
@pytest.mark.parametrize("kind", KINDS)
def test_bitfit_trains_biases_and_conditions(kind):
    torch.manual_seed(0)
    m = tiny(kind)
    m.add_stage_identifier(2)
    prepare_bitfit(m)
    names = {n for n, _ in m.named_parameters()}
    expect = {n for n in names if n.endswith("bias")} | condition_names(m)
    assert trainable(m) == expect
    assert "sid.embedding.weight" in expect and any(n.endswith("bias") for n in expect)
    assert not any(n.endswith("weight") and "embed" not in n and "sid" not in n for n in trainable(m))


def _difffit_expect(m) -> set[str]:
    names = {n for n, _ in m.named_parameters()}
    return {n for n in names if n.endswith("bias") or n.startswith("difffit.")} | condition_names(m)


@pytest.mark.parametrize("kind", KINDS)
def test_difffit_trains_scales_biases_conditions(kind):
    m = perturbed(kind)
    x, t, y = inputs()
    ref = run(m, x, t, y)
    prepare_difffit(m)
    assert isinstance(m.difffit, ScaleFactors)
    assert len(m.difffit.gamma) == 2 * m.depth
    assert all(torch.equal(g, torch.ones(())) for g in m.difffit.gamma.values())
    assert torch.equal(run(m, x, t, y), ref), "scale factors start at 1: the function is unchanged"
    assert trainable(m) == _difffit_expect(m)


@pytest.mark.parametrize("kind", KINDS)
def test_difffit_export_folds_scale_factors(kind):
    m = perturbed(kind)
    x, t, y = inputs()
    plain = run(m, x, t, y)
    prepare_difffit(m)
    with torch.no_grad():
        for g in m.difffit.gamma.values():
            g.copy_(torch.rand(()) * 2 + 0.25)
    scaled = run(m, x, t, y)
    assert not torch.allclose(scaled, plain, atol=1e-4)  # the gammas matter
    out = export_backbone(m)
    assert out is m
    assert not hasattr(m, "difffit")
    assert not any(n.startswith("difffit") for n, _ in m.named_parameters())
    for i in range(m.depth):
        for mod in m.branch_modules(i).values():
            assert len(mod._forward_hooks) == 0
    torch.testing.assert_close(run(m, x, t, y), scaled, rtol=1e-5, atol=1e-5)
    assert set(m.state_dict()) == set(tiny(kind).state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_adapters_and_exports(kind, tmp_path):
    from peft.tuners.lora import LoraLayer

    m = perturbed(kind)
    m.add_stage_identifier(2)
    x, t, y = inputs()
    plain = run(m, x, t, y)
    prepare_lora(m, rank=2)
    lora_layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}
    assert len(lora_layers) == m.depth * len(m.lora_targets)
    assert set(lora_layers) == {f"{m.block_prefix}.{i}.{tg}" for i in range(m.depth) for tg in m.lora_targets}
    assert all(mod.r["default"] == 2 for mod in lora_layers.values())
    assert torch.equal(run(m, x, t, y), plain)  # lora_B starts at zero
    names = {n for n, _ in m.named_parameters()}
    assert trainable(m) == {n for n in names if "lora_" in n} | condition_names(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    adapted = run(m, x, t, y)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    export_backbone(m)
    assert not any(isinstance(mod, LoraLayer) for mod in m.modules())
    assert not any("lora_" in n for n in m.state_dict())
    torch.testing.assert_close(run(m, x, t, y), adapted, rtol=1e-5, atol=1e-5)
    # the exported model is a plain backbone again: it saves and loads
    save_backbone(m, tmp_path / "m")
    loaded, _ = load_backbone(tmp_path / "m")
    torch.testing.assert_close(run(loaded.eval(), x, t, y), adapted, rtol=1e-5, atol=1e-5)


def test_lora_rank_must_be_positive():
    torch.manual_seed(0)
    with pytest.raises(ConfigError):
        prepare_lora(tiny("dit"), rank=0)


# ------------------------------------------------------------------------------------------- data
def test_parse_classes():
    assert parse_classes("5-9") == (5, 6, 7, 8, 9)
    assert parse_classes("0,2") == (0, 2)
    assert parse_classes("2,0,2") == (0, 2)
    assert parse_classes("0-1,7") == (0, 1, 7)
    assert parse_classes("all") is None
    assert parse_classes(None) is None
    for bad in ("x", "5-", "1-2-3", "", ",", "9-5", "a,b"):
        with pytest.raises(DataError):
            parse_classes(bad)


def test_load_diffusion_data_selects_classes(fake_fmnist):
    d = load_diffusion_data("fashion-mnist", data_root=str(fake_fmnist), classes=(5, 6, 7, 8, 9))
    assert isinstance(d, DiffusionData)
    assert d.classes == (5, 6, 7, 8, 9) and d.num_classes == 10
    assert set(d.train_labels.tolist()) == {5, 6, 7, 8, 9}
    assert set(d.test_labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(d.train_labels) == 150 and len(d.test_labels) == 50  # half of the balanced fake set
    assert d.train_images.dtype == torch.uint8 and d.train_images.shape[1:] == (1, 28, 28)
    assert d.in_chans == 1 and d.image_size == 28
    with pytest.raises(DataError):
        load_diffusion_data("fashion-mnist", data_root=str(fake_fmnist), classes=(3, 10))


def _count_reads(monkeypatch, log):
    """Make every image read (in this process or a loader worker) append its process id to ``log``."""
    import os

    import autoprog.data as data_mod

    real = data_mod.read_image

    def read(path, *a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(path, *a, **k)

    monkeypatch.setattr(data_mod, "read_image", read)
    return lambda: log.read_text().split() if log.exists() else []


def test_an_image_folder_is_decoded_by_loader_workers_in_the_folders_order(image_folder, tmp_path, monkeypatch):
    """A fine-tuning ImageFolder is read into memory by loader workers, one per core the process may use (it only
    waits), not image by image in the process: the same tensors, in the folder's order."""
    import os

    import autoprog.data as data_mod
    import autoprog.diffusion.data as ddata

    reads = _count_reads(monkeypatch, tmp_path / "reads")
    serial = ddata._image_folder(image_folder, 16, workers=0)
    assert set(reads()) == {str(os.getpid())}
    ddata._DECODED.clear()
    (tmp_path / "reads").unlink()
    monkeypatch.setattr(data_mod, "default_workers", lambda reserve=1: 2 if reserve == 0 else 1)  # 2 cores
    d = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    assert len(reads()) == 14 and str(os.getpid()) not in reads()  # every file once, none in this process
    for a, b in zip(serial[:4], (d.train_images, d.train_labels, d.test_images, d.test_labels)):
        assert torch.equal(a, b)
    assert d.train_labels.tolist() == [0] * 5 + [1] * 5 and d.class_names == ("circle", "square")


def test_a_share_of_an_image_folder_is_its_rows_in_order_and_may_be_empty(image_folder):
    """What each process decodes of a split under several processes (``_decode``'s rows): its rows of the whole
    read, in order; a share of none (more processes than images) is an empty batch of the right shape."""
    from torchvision import transforms

    import autoprog.diffusion.data as ddata
    from autoprog.data import image_folder as folder_of

    tf = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.PILToTensor()])
    ds = folder_of(image_folder, image_folder / "train", tf)
    whole = ddata._decode(ds, 0, 16)
    assert whole.shape == (10, 3, 16, 16) and whole.dtype == torch.uint8
    assert torch.equal(torch.cat([ddata._decode(ds, 0, 16, (lo, hi)) for lo, hi in ((0, 3), (3, 3), (3, 10))]), whole)
    assert ddata._decode(ds, 0, 16, (3, 3)).shape == (0, 3, 16, 16)


def test_the_fine_tuning_read_takes_the_workers_shared_memory_serves(image_folder, monkeypatch, capsys):
    from collections import namedtuple

    import autoprog.data as data_mod
    import autoprog.diffusion.data as ddata

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(data_mod, "default_workers", lambda reserve=1: 4)
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: usage(10**5, 0, 10**5))  # 100 kB: no batch of 64 fits
    taken = []
    real = ddata.DataLoader
    monkeypatch.setattr(ddata, "DataLoader", lambda *a, num_workers=0, **k: taken.append(num_workers) or
                        real(*a, num_workers=num_workers, **k))
    ddata._image_folder(image_folder, 16)
    err = capsys.readouterr().err
    assert taken == [0, 0] and "too little for 4 loader workers" in err and "--batch-size" not in err


def test_an_image_folder_read_twice_in_a_process_is_decoded_once_while_held(image_folder, tmp_path, monkeypatch):
    """The evaluator's feature classifier reads the whole folder after the training data did: while the first
    tensors are alive and the files unchanged it gets them again instead of decoding every image a second time."""
    import gc
    import os

    reads = _count_reads(monkeypatch, tmp_path / "reads")
    first = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    assert len(reads()) == 14
    again = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    assert len(reads()) == 14 and again.train_images is first.train_images
    first = again = None
    gc.collect()
    load_diffusion_data(str(image_folder), classes=None, image_size=16)  # nothing held it: decoded again
    assert len(reads()) == 28
    load_diffusion_data(str(image_folder), classes=None, image_size=12)  # another size is another decode
    assert len(reads()) == 42
    held = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    f = image_folder / "train" / "circle" / "1.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a file changed since: decoded again
    changed = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    assert len(reads()) == 70 and changed.train_images is not held.train_images


@pytest.mark.parametrize("res", [None, 16, 8])
def test_diffusion_batch_range_and_resolution(fake_fmnist, res):
    d = load_diffusion_data("fashion-mnist", data_root=str(fake_fmnist), classes=(5, 6, 7, 8, 9))
    idx = torch.arange(12)
    x, y = d.batch(idx, resolution=res, generator=torch.Generator().manual_seed(0))
    size = res or 28
    assert x.shape == (12, 1, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, d.train_labels[idx])
    d.hflip = False
    x, _ = d.batch(idx)
    assert torch.equal(x, d.train_images[idx].float() / 127.5 - 1)


# --------------------------------------------------------------------------------------- sampling
class LabelRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.labels: list[torch.Tensor] = []

    def forward(self, x, t, y):
        self.labels.append(y.clone())
        return torch.zeros_like(x)


def test_diffusion_loss_class_dropout():
    torch.manual_seed(0)
    rec = LabelRecorder()
    x0 = torch.zeros(16, 1, 8, 8)
    y = torch.arange(16) % 4
    sched = training_scheduler()
    diffusion_loss(rec, x0, y, sched, null_class=4, generator=torch.Generator().manual_seed(0), class_dropout=1.0)
    assert torch.equal(rec.labels[-1], torch.full((16,), 4))
    loss = diffusion_loss(rec, x0, y, sched, null_class=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rec.labels[-1], y)
    assert loss.item() > 0.5  # zero prediction against unit-variance noise


def _counting(model):
    calls: list[tuple[int, bool, torch.Tensor]] = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append((args[0].shape[0], mod.training,
                                                                             args[2].clone())))
    return calls, handle


@pytest.mark.parametrize("training", [True, False])
def test_sample_deterministic_range_shape_mode(training):
    torch.manual_seed(0)
    m = tiny("dit")
    perturb(m, std=0.3)
    m.train(training)
    labels = balanced_labels((0, 1, 2), 5)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    a = sample(m, labels, steps=3, cfg_scale=2.0, seed=7)
    assert m.training == training
    b = sample(m, labels, steps=3, cfg_scale=2.0, seed=7)
    c = sample(m, labels, steps=3, cfg_scale=2.0, seed=8)
    assert a.shape == (5, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    small = sample(m, labels, steps=2, cfg_scale=1.0, resolution=4, seed=0)
    assert small.shape == (5, 1, 4, 4)
    assert m.training == training


def test_sample_copies_the_timesteps_to_the_device_once_not_at_every_step(monkeypatch):
    """On a GPU each ``t.to(device)`` of a host timestep is a blocking copy: one per call, not one per step."""
    import autoprog.diffusion.sampling as sampling

    m = tiny("dit")
    copies = []
    real = sampling.to_device
    monkeypatch.setattr(sampling, "to_device", lambda t, d: copies.append(tuple(t.shape)) or real(t, d))
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(("to", t.dim())) or real_to(t, *a, **k))
    sample(m, torch.tensor([0, 1]), steps=5, cfg_scale=2.0, eta=0.0)
    assert copies.count((5,)) == 1 and ("to", 0) not in copies, copies


def test_sample_restores_mode_after_error():
    torch.manual_seed(0)
    m = tiny("dit").train()
    h = m.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        sample(m, torch.tensor([0]), steps=2)
    h.remove()
    assert m.training


def test_sample_model_calls_and_cfg_batching():
    torch.manual_seed(0)
    m = tiny("dit").train()
    perturb(m)
    labels = torch.tensor([0, 1, 2])
    calls, handle = _counting(m)
    sample(m, labels, steps=4, cfg_scale=1.0)
    assert len(calls) == 4
    assert all(bs == 3 and not tr and torch.equal(y, labels) for bs, tr, y in calls)
    calls.clear()
    sample(m, labels, steps=4, cfg_scale=3.0)
    assert len(calls) == 4
    for bs, tr, y in calls:
        assert bs == 6 and not tr
        assert torch.equal(y[:3], labels) and torch.equal(y[3:], torch.full((3,), m.null_class))
    calls.clear()
    out = sample(m, torch.arange(5) % 4, steps=2, cfg_scale=1.0, batch_size=2)
    assert out.shape == (5, 1, 8, 8)
    assert [bs for bs, _, _ in calls] == [2, 2, 2, 2, 1, 1]
    handle.remove()
    assert sample(m, torch.tensor([], dtype=torch.long), steps=2).shape == (0, 1, 8, 8)


def test_shard_bounds_split_each_batch_evenly_and_cover_every_sample_once():
    assert shard_bounds(7, 0, 2, batch_size=5) == [(0, 2), (5, 6)]
    assert shard_bounds(7, 1, 2, batch_size=5) == [(2, 5), (6, 7)]
    assert shard_bounds(2, 2, 3, batch_size=5) == [(1, 2)] and shard_bounds(2, 0, 3, batch_size=5) == [(0, 0)]
    for n, world in [(0, 2), (1, 4), (13, 3), (1000, 8), (501, 8)]:
        got = torch.cat([shard_indices(n, r, world) for r in range(world)])
        assert sorted(got.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(4, 2, 2)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sharded_samples_are_one_process_samples_whatever_the_process_count(eta):
    """Each process draws the whole batch's noise from the one stream and keeps its part: reassembled, the shards
    are the samples of one process, even where a batch has fewer samples than processes (empty shards)."""
    torch.manual_seed(0)
    m = tiny("dit")
    perturb(m, std=0.3)
    labels = torch.arange(7) % 4
    alone = sample(m, labels, steps=3, cfg_scale=2.0, seed=5, batch_size=5, eta=eta)
    for world in (2, 3, 8):
        calls, handle = _counting(m)
        together = torch.empty_like(alone)
        for r in range(world):
            part = sample(m, labels, steps=3, cfg_scale=2.0, seed=5, batch_size=5, eta=eta, shard=(r, world))
            idx = shard_indices(7, r, world, batch_size=5)
            assert len(part) == len(idx)
            together[idx] = part
        handle.remove()
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)  # a smaller batch rounds apart
        # the model ran on each sample once per step (twice under guidance): the work is split, not repeated
        assert sum(bs for bs, _, _ in calls) == 2 * 3 * 7


def test_cfg_scale_one_equals_conditional_prediction():
    """cfg_scale=1 must give the same samples whether or not the null branch is computed."""
    torch.manual_seed(0)
    m = tiny("dit")
    perturb(m, std=0.3)
    labels = torch.tensor([0, 3])
    one = sample(m, labels, steps=3, cfg_scale=1.0, seed=3)
    near_one = sample(m, labels, steps=3, cfg_scale=1.0 + 1e-7, seed=3)
    torch.testing.assert_close(one, near_one, rtol=0, atol=1e-4)


def test_batch_indices_draw_each_epochs_order_once_and_the_same_order(monkeypatch):
    """A fine-tuning step's batch is a slice of its epoch's permutation: drawn once per epoch (not per step:
    a permutation of the whole set, 20 ms a step for a million images), the same slices as drawing it afresh."""
    n, batch, seed = 50, 8, 3
    data = DiffusionData("x", torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                         torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.tensor([0]), 1, (0,))
    drawn = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: drawn.append(a[0]) or randperm(*a, **k))
    steps = 2 * (n // batch) + 1  # two whole epochs and a step of the third
    got = [data.batch_indices(s, batch, seed) for s in range(steps)]
    assert drawn == [n, n, n]
    for s, idx in enumerate(got):
        epoch, pos = divmod(s, n // batch)
        fresh = randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        assert torch.equal(idx, fresh[pos * batch:(pos + 1) * batch])


def test_a_training_batch_is_built_on_the_device_from_the_stored_rows(monkeypatch):
    """Only the stored rows (uint8 pixels: a quarter of float32's bytes, at full size), the flip mask and the
    conditions cross to the training device; scaling, flipping and the stage's resize run there, giving the
    numbers a host-built batch gives."""
    import autoprog.diffusion.data as ddata
    from autoprog.diffusion.data import resize, to_float

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = DiffusionData("x", imgs, torch.arange(20) % 2, imgs[:1], torch.tensor([0]), 2, (0, 1))
    crossed = []
    real = ddata.to_device
    monkeypatch.setattr(ddata, "to_device", lambda t, d: crossed.append((t.dtype, tuple(t.shape))) or real(t, d))
    idx = torch.tensor([3, 7, 1, 12])
    x, y = data.batch(idx, 8, generator=torch.Generator().manual_seed(5), device="cpu")
    flip = torch.rand(4, generator=torch.Generator().manual_seed(5)) < 0.5
    ref = to_float(imgs[idx])
    assert torch.equal(x, resize(torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref), 8))
    assert torch.equal(y, torch.tensor([1, 1, 1, 0]))
    assert crossed[0] == (torch.uint8, (4, 3, 16, 16)) and all(dt != torch.float32 for dt, _ in crossed)


def test_a_finetuning_step_sends_no_float_images_to_the_device(cli, fake_fmnist, tmp_path, monkeypatch):
    """The trainer asks for its batches on its device (see the test above): no float32 image batch is made on
    the host and copied (for 256 images of 3 x 256 x 256 px, 200 MB a step instead of 50)."""
    import autoprog.diffusion.data as ddata
    import autoprog.diffusion.trainer as dtrainer

    crossed = []
    for module in (ddata, dtrainer):
        real = module.to_device
        monkeypatch.setattr(module, "to_device",
                            lambda t, d, _real=real: crossed.append((t.dtype, t.ndim)) or _real(t, d))
    rc, _, err = cli("finetune", "--method", "full", "--steps", "3", "--batch-size", "4", "--eval-points", "1",
                     "--fd-samples", "4", "--curve-samples", "4", "--sample-steps", "2", "--feature-epochs", "1",
                     "--checkpoint-every", "0", "--cache-dir", tmp_path / "cache", "--data-root",
                     fake_fmnist, "--out", tmp_path / "ft", "--cpu")
    assert rc == 0, err
    images = [dt for dt, ndim in crossed if ndim == 4]
    assert len(images) >= 3 and set(images) == {torch.uint8}, crossed
