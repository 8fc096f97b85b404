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


# ----------------------------------------------------------------------------------- Stable Diffusion 1.x / 2.x
def sd_pipeline_dir(path, version: int = 1, prediction_type: str = "epsilon"):
    """A tiny pipeline directory laid out as Stable Diffusion 1.x or 2.x is (2.x: linear projections in the
    transformers, per-level head widths), with SD's scaled-linear PNDM scheduler; random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from autoprog.models.text_unet import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer("a photo of sks dog".split(), max_length=12)
    vocab = tok.get_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=vocab[tok.bos_token], eos_token_id=vocab[tok.eos_token],
                                        pad_token_id=vocab[tok.pad_token]))
    extra = dict(use_linear_projection=True, attention_head_dim=(2, 4)) if version == 2 else dict(attention_head_dim=8)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, **extra)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(path))
    return path, sched


@pytest.mark.parametrize("version", [1, 2])
def test_stable_diffusion_pipeline_directories_load_with_their_own_noise_schedule(tmp_path, version):
    from autoprog.adapters.unfreezer import Unfreezer
    from autoprog.models.text_unet import TextUNet
    from autoprog.space import SubNet

    path, sched = sd_pipeline_dir(tmp_path / "sd", version)
    model, meta = load_backbone(path)
    assert isinstance(model, TextUNet) and meta["vae"] == str(path)
    noise = training_scheduler(model.noise_config)
    torch.testing.assert_close(noise.betas, sched.betas)  # scaled linear, not DiT's linear schedule
    model.add_stage_identifier(2)
    Unfreezer(model).apply(SubNet(2, 2))
    y = model.tokenize(["a photo of sks dog"] * 2)
    x0 = torch.randn(2, 4, 4, 4)
    diffusion_loss(model, x0, y, noise, model.null_condition(y)).backward()
    assert model.sid.embedding.weight.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_a_v_prediction_pipeline_is_refused_rather_than_trained_wrongly(tmp_path):
    path, _ = sd_pipeline_dir(tmp_path / "sd2v", 2, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="predicts 'v_prediction'; autoprog trains ε-prediction models only"):
        load_backbone(path)
