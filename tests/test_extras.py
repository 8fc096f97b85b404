"""Table 6's Adapter (parallel, sequential) and VPT-Deep baselines: what trains, what they change in the forward
pass, a deep copy (the EMA) using its own parameters, and saving and loading a model that keeps them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_diffusion_units import KINDS, condition_names, inputs, perturbed, run, trainable

from autoprog.diffusion.methods import export_backbone, prepare_static
from autoprog.errors import ConfigError
from autoprog.models.dit import load_backbone, save_backbone
from autoprog.models.extras import BottleneckAdapters, DeepPrompts, install_extras, token_blocks


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=std)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("parallel", [True, False])
def test_adapters_start_as_the_base_model_and_train_alone(kind, parallel):
    m = perturbed(kind)
    m.add_stage_identifier(2)
    x, t, y = inputs()
    plain = run(m, x, t, y)
    prepare_static(m, "adapter", adapter_dim=3, parallel=parallel)
    assert isinstance(m.extras, BottleneckAdapters) and m.extras.parallel is parallel
    assert len(m.extras.down) == 2 * m.depth and all(d.out_features == 3 for d in m.extras.down.values())
    assert torch.equal(run(m, x, t, y), plain), "the up-projections start at zero"
    assert trainable(m) == {n for n, _ in m.named_parameters() if n.startswith("extras.")} | condition_names(m)
    _randomise(m.extras)
    assert not torch.allclose(run(m, x, t, y), plain, atol=1e-4)


def test_parallel_reads_the_branch_input_and_sequential_its_output():
    m = perturbed("dit")
    for parallel in (True, False):
        mm = copy.deepcopy(m)
        ad = install_extras(mm, {"kind": "adapter", "dim": 2, "parallel": parallel})
        _randomise(ad)
        got = {}
        mm.blocks[0].mlp.register_forward_hook(lambda mod, a, out, got=got: got.update(out=out))
        mm.blocks[0].mlp.register_forward_hook(lambda mod, a, out, got=got: got.update(inp=a[0]), prepend=True)
        run(mm, *inputs())
        base = mm.blocks[0].mlp.forward(got["inp"])  # the branch alone (forward bypasses the hooks)
        src = got["inp"] if parallel else base
        want = base + ad.up["blocks_0__mlp"](F.gelu(ad.down["blocks_0__mlp"](src)))
        torch.testing.assert_close(got["out"], want)


@pytest.mark.parametrize("kind", KINDS)
def test_vpt_deep_prepends_prompt_tokens_to_every_block_and_drops_them(kind):
    m = perturbed(kind)
    x, t, y = inputs()
    plain = run(m, x, t, y)
    prepare_static(m, "vpt", vpt_tokens=3)
    widths = []
    for block in token_blocks(m).values():  # after the prompts' own hook
        block.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    assert isinstance(m.extras, DeepPrompts) and len(m.extras.prompts) == m.depth
    out = run(m, x, t, y)
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-4)
    assert widths == [16 + 3] * m.depth, "each block sees the 4x4 patch tokens and 3 prompts"
    assert trainable(m) == {f"extras.prompts.{k}" for k in token_blocks(m)} | condition_names(m)
    m.train()
    F.mse_loss(m(x, t, y), torch.zeros_like(plain)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.extras.prompts.values())


@pytest.mark.parametrize("method", ["adapter", "vpt", "difffit"])
def test_a_deep_copy_uses_its_own_added_parameters(method):
    """The EMA model is a deep copy: its hooks must read its own parameters, not the online model's."""
    m = perturbed("dit")
    prepare_static(m, method)
    ema = copy.deepcopy(m)
    x, t, y = inputs()
    added = m.extras if method != "difffit" else m.difffit
    _randomise(added)
    assert not torch.allclose(run(m, x, t, y), run(ema, x, t, y), atol=1e-4)
    _randomise(ema.extras if method != "difffit" else ema.difffit)
    ema.load_state_dict(m.state_dict())
    torch.testing.assert_close(run(m, x, t, y), run(ema, x, t, y))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [{"kind": "adapter", "dim": 2, "parallel": False}, {"kind": "vpt", "tokens": 2}])
def test_a_model_with_extras_saves_and_loads_them(kind, settings, tmp_path):
    m = perturbed(kind)
    install_extras(m, settings)
    _randomise(m.extras)
    x, t, y = inputs()
    want = run(m, x, t, y)
    export_backbone(m)
    save_backbone(m, tmp_path / "m", extra={"extras": m.extras.settings()})
    loaded, meta = load_backbone(tmp_path / "m")
    assert meta["extras"] == settings
    torch.testing.assert_close(run(loaded.eval(), x, t, y), want)


def test_a_text_to_image_unet_takes_both_and_its_pipeline_keeps_them(tmp_path):
    from test_text_to_image import step_inputs, tiny

    from autoprog.models.text_unet import load_text_unet, save_text_unet

    for settings in ({"kind": "adapter", "dim": 2, "parallel": True}, {"kind": "vpt", "tokens": 2}):
        m = tiny().eval()
        x, t, ids = step_inputs(m)
        plain = run(m, x, t, ids)
        install_extras(m, settings)
        assert len(token_blocks(m.unet)) >= 2
        _randomise(m.extras, std=0.5)
        want = run(m, x, t, ids)
        assert not torch.allclose(want, plain, atol=1e-5)
        out = tmp_path / settings["kind"]
        save_text_unet(copy.deepcopy(m), out, extra={"extras": m.extras.settings()})
        loaded, meta = load_text_unet(out)
        torch.testing.assert_close(run(loaded.eval(), x, t, ids), want)
        (out / "extras.safetensors").unlink()
        with pytest.raises(ConfigError, match="extras.safetensors is missing"):
            load_text_unet(out)


def test_bad_extras_settings_are_one_line():
    m = perturbed("dit")
    with pytest.raises(ConfigError, match="unknown kind"):
        install_extras(m, {"kind": "prefix"})
    with pytest.raises(ConfigError, match="unknown key"):
        install_extras(m, {"kind": "vpt", "length": 3})
    with pytest.raises(ConfigError, match="--adapter-dim"):
        install_extras(m, {"kind": "adapter", "dim": 0})


def test_their_options_are_refused_for_other_methods(cli, tmp_path):
    rc, _, err = cli("finetune", "--method", "full", "--adapter-dim", "4", "--cpu", "--out", tmp_path / "a")
    assert rc == 2 and "--adapter-dim is read only by adapter-parallel, adapter-sequential" in err
    rc, _, err = cli("finetune", "--method", "adapter-parallel", "--vpt-tokens", "4", "--cpu", "--out", tmp_path / "b")
    assert rc == 2 and "--vpt-tokens is read only by vpt-deep" in err


def test_a_model_carrying_extras_takes_no_second_set_nor_diffFit(tmp_path):
    from autoprog.diffusion.methods import prepare_difffit

    m = perturbed("dit")
    install_extras(m, {"kind": "vpt", "tokens": 2})
    with pytest.raises(ConfigError, match="already carries vpt"):
        prepare_static(m, "adapter")
    with pytest.raises(ConfigError, match="DiffFit's scale factors cannot fold"):
        prepare_difffit(m)
