"""Real checkpoints' layouts load (#13 item 9): learned-sigma DiTs (out_channels = 2 × in_channels, as the
official DiT-XL/2) and configs named ``Transformer2DModel``, each built from a tiny config here."""

from __future__ import annotations

import json

import pytest
import torch

from autoprog.diffusion.methods import prepare_static
from autoprog.diffusion.sampling import diffusion_loss, sample, training_scheduler
from autoprog.errors import ConfigError
from autoprog.models.dit import DiffusersDiT, load_backbone, save_backbone


def official_layout(path, learned_sigma=True, norm_type="ada_norm_zero"):
    """A tiny DiT saved as the official DiT-XL/2 checkpoint is: class name Transformer2DModel, 2C outputs."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    m = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                           out_channels=2 if learned_sigma else 1, num_layers=2, sample_size=8, patch_size=2,
                           norm_type=norm_type, num_embeds_ada_norm=4, activation_fn="gelu-approximate",
                           norm_elementwise_affine=False)
    m.save_pretrained(str(path))
    assert json.loads((path / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    return m


def test_an_official_learned_sigma_checkpoint_loads_and_predicts_epsilon(tmp_path):
    ref = official_layout(tmp_path / "dit").eval()
    model, meta = load_backbone(tmp_path / "dit")
    assert isinstance(model, DiffusersDiT) and model.learned_sigma and meta["kind"] == "diffusers-dit"
    model.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), torch.tensor([0, 3])
    eps = model(x, t, y)
    assert eps.shape == (2, 1, 8, 8)
    torch.testing.assert_close(eps, ref(x, timestep=t, class_labels=y).sample[:, :1])
    assert torch.isfinite(sample(model, y, steps=2, cfg_scale=2.0)).all()


def test_finetuning_trains_the_epsilon_half_and_leaves_the_variance_head_alone(tmp_path):
    official_layout(tmp_path / "dit")
    model, _ = load_backbone(tmp_path / "dit")
    prepare_static(model, "full")
    head = model.model.proj_out_2
    before_w, before_b = head.weight.detach().clone(), head.bias.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        diffusion_loss(model, x0, y, training_scheduler(), model.null_condition(y)).backward()
        opt.step()
        opt.zero_grad()
    variance = torch.arange(head.out_features) % 2 == 1  # channel fastest: odd rows are the variance channel
    assert torch.equal(head.weight[variance], before_w[variance]) and torch.equal(head.bias[variance],
                                                                                 before_b[variance])
    assert not torch.equal(head.weight[~variance], before_w[~variance])
    save_backbone(model, tmp_path / "tuned")
    back, meta = load_backbone(tmp_path / "tuned")
    assert back.learned_sigma and meta["config"]["learned_sigma"] is True
    back.eval()
    model.eval()
    t = torch.tensor([3, 300, 600, 900])
    torch.testing.assert_close(back(x0, t, y), model(x0, t, y))


def test_a_transformer2d_that_is_not_a_dit_is_refused_in_one_line(tmp_path):
    official_layout(tmp_path / "t2d", learned_sigma=False, norm_type="ada_norm_single")
    with pytest.raises(ConfigError, match="norm_type 'ada_norm_single'.*only as a DiT"):
        load_backbone(tmp_path / "t2d")


def test_a_dit_with_another_output_width_is_refused():
    from diffusers import DiTTransformer2DModel

    inner = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=3,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=4)
    with pytest.raises(ConfigError, match="2 in and 3 out"):
        DiffusersDiT(model=inner)
