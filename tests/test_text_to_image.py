"""Text-to-image fine-tuning: the UNet + CLIP backbone, the text SID, unfreezing units, the static methods,
export as a pipeline directory, LoRA in diffusers' format, and the commands end to end. Every model here is
built from a tiny config inside the test; nothing is downloaded."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import saved_tensors_and_grads

from autoprog.adapters.unfreezer import Unfreezer
from autoprog.diffusion.data import DiffusionData, load_diffusion_data
from autoprog.diffusion.methods import export_backbone, prepare_static
from autoprog.diffusion.sampling import diffusion_loss, sample, training_scheduler
from autoprog.diffusion.trainer import DiffusionConfig
from autoprog.errors import ConfigError
from autoprog.models.dit import load_backbone, num_parameters, save_backbone
from autoprog.models.text_unet import TextUNet, build_text_unet, load_text_unet, word_tokenizer
from autoprog.space import SubNet

WORDS = "a photo of t-shirt trouser pullover dress coat sandal shirt sneaker bag ankle boot stage".split()
CAPTIONS = ["a photo of a t-shirt", "a photo of a trouser", "a photo of a sandal"]


def tiny(size: int = 8, sid: int = 0, seed: int = 0) -> TextUNet:
    torch.manual_seed(seed)
    m = build_text_unet(image_size=size, in_chans=1, channels=(8, 16), text_dim=32, text_layers=1,
                        vocabulary=WORDS, max_length=12)
    if sid:
        m.add_stage_identifier(sid)
    return m


def tokens(m: TextUNet, ids: torch.Tensor) -> list[str]:
    return [t for t in m.tokenizer.convert_ids_to_tokens(ids) if t != m.tokenizer.eos_token] + ["<eos>"]


def step_inputs(m: TextUNet, n: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, size, size, generator=g), torch.tensor([10, 400, 900][:n]), m.tokenize(CAPTIONS[:n])


# ------------------------------------------------------------------------------------------- tokenizer
def test_word_tokenizer_keeps_its_words_whole_and_still_spells_unknown_ones():
    tok = word_tokenizer(WORDS, max_length=12)
    assert tok.tokenize("a photo of a sandal") == ["a</w>", "photo</w>", "of</w>", "a</w>", "sandal</w>"]
    spelled = tok.tokenize("zebra")
    assert len(spelled) > 1 and tok.unk_token not in spelled
    ids = tok(["a bag"], padding="max_length", max_length=12).input_ids[0]
    assert len(ids) == 12 and ids[0] == tok.bos_token_id and ids[3] == tok.eos_token_id


# ------------------------------------------------------------------------------------------------ SID
def test_each_stage_appends_its_own_identifier_before_the_end_of_text():
    m = tiny(sid=3)
    ids = m.tokenize(["a photo of a bag", ""])
    seen = []
    for k in range(3):
        m.set_stage(k)
        out = m.with_sid(ids)
        assert tokens(m, out[0])[:8] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "bag</w>",
                                         ",</w>", f"[sid{k + 1}]"]
        assert tokens(m, out[1])[:4] == ["<|startoftext|>", ",</w>", f"[sid{k + 1}]", "stage</w>"]  # null too
        seen.append(tuple(out[0].tolist()))
    assert len(set(seen)) == 3
    assert m.sid.stage == 2 and m.prompt_suffix() == ", [SID3] stage"
    assert len(m.text_encoder.get_input_embeddings()._forward_hooks) == 1  # growing the table keeps its one hook


def test_a_prompt_too_long_is_cut_so_the_identifier_and_end_token_fit():
    m = tiny(sid=2)
    ids = m.tokenize(["a photo of a t-shirt trouser pullover dress coat sandal shirt sneaker bag"])
    assert ids[0, -1] == m.tokenizer.eos_token_id and (ids[0] == m.tokenizer.eos_token_id).sum() == 1  # full
    out = m.with_sid(ids)[0].tolist()
    assert out[-1] == m.tokenizer.eos_token_id and out[-3] == m.tokenizer.convert_tokens_to_ids("[sid2]")
    assert out[:-4] == ids[0, :-4].tolist()  # the prompt's last words made room


def test_the_identifier_is_placed_in_every_row_at_once_as_row_by_row():
    """with_sid works on the whole batch on the device; the row-by-row rule it replaced gives the same ids."""
    m = tiny(sid=3)
    eos, pad = m.tokenizer.eos_token_id, m.tokenizer.pad_token_id
    prompts = ["", "a bag", "a photo of a t-shirt trouser pullover dress coat sandal shirt sneaker bag", "a coat"]
    ids = m.tokenize(prompts)
    ids[3, -1] = 7  # a row with no end-of-text token at all
    for k in range(3):
        m.set_stage(k)
        suffix = m._sid_suffix[k]
        keep = ids.shape[1] - 1 - len(suffix)
        want = torch.full_like(ids, eos if pad is None else pad)
        for r in range(len(ids)):
            hits = (ids[r] == eos).nonzero()
            end = min(int(hits[0]) if len(hits) else ids.shape[1], keep)
            want[r, :end] = ids[r, :end]
            want[r, end:end + len(suffix)] = torch.tensor(suffix)
            want[r, end + len(suffix)] = eos
        assert torch.equal(m.with_sid(ids), want)


def test_only_the_current_stages_identifier_learns_and_the_text_encoder_stays_frozen():
    m = tiny(sid=4)
    m.train_text_encoder = False
    Unfreezer(m).apply(SubNet(8, 2))
    table = m.text_encoder.get_input_embeddings().weight.detach().clone()
    m.set_stage(1)
    x, t, y = step_inputs(m)
    diffusion_loss(m, x, y, training_scheduler(), m.null_condition(y)).backward()
    grad = m.sid.embedding.weight.grad
    assert grad[1].abs().sum() > 0 and grad[[0, 2, 3]].abs().sum() == 0
    assert all(p.grad is None for p in m.text_encoder.parameters())
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.equal(m.text_encoder.get_input_embeddings().weight, table)


def test_without_an_identifier_nothing_is_appended():
    m = tiny()
    ids = m.tokenize(CAPTIONS)
    assert torch.equal(m.with_sid(ids), ids)


# ----------------------------------------------------------------------------------------- unfreezing
def test_units_are_down_mid_and_up_blocks_and_a_stage_trains_only_its_units():
    m = tiny(sid=4)
    m.train_text_encoder = False
    u = Unfreezer(m)
    assert len(m.blocks) == 2 + 1 + 2 and m.blocks[2] is m.unet.mid_block
    assert m.patch_size == 2 and m.image_size == 8
    u.apply(SubNet(4, 2))
    learnable = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad and n.startswith("unet.")}
    chosen = {type(m.blocks[i]).__name__ for i in u.blocks_for(SubNet(4, 2))}
    assert learnable <= {"down_blocks", "mid_block", "up_blocks"} and "UpBlock2D" in chosen  # output side first
    assert m.sid.embedding.weight.requires_grad
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    u.apply(u.space(4, 0.25).full)
    assert all(p.requires_grad for p in m.unet.parameters())
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    m.train_text_encoder = True
    u.apply(SubNet(4, 2))
    assert all(p.requires_grad for p in m.text_encoder.parameters())  # --train-text-encoder: in every stage


def test_a_no_grad_prefix_of_down_blocks_keeps_fewer_activations_and_the_same_output_side_gradients():
    m = tiny(sid=4)
    m.train_text_encoder = False
    x, t, y = step_inputs(m)

    def saved_and_grads():
        return saved_tensors_and_grads(m, lambda model: diffusion_loss(
            model, x, y, training_scheduler(), model.null_condition(y), generator=torch.Generator().manual_seed(0)))

    Unfreezer(m, "tail").apply(SubNet(4, 2))  # the two up blocks
    full_count, full_grads = saved_and_grads()
    Unfreezer(m, "tail", frozen_prefix="no-grad").apply(SubNet(4, 2))
    assert m.no_grad_prefix == 3  # both down blocks and the mid block
    count, grads = saved_and_grads()
    assert count < full_count * 0.8, (count, full_count)
    ups = {n for n in grads if n.startswith("unet.up_blocks.")}
    assert ups and all(torch.allclose(grads[n], full_grads[n], atol=1e-6) for n in ups)
    assert "sid.embedding.weight" in grads, "the identifier still learns, through the up blocks' cross-attention"


# ------------------------------------------------------------------------------------- static methods
@pytest.mark.parametrize("method", ["full", "bitfit", "difffit", "lora"])
def test_static_methods_leave_the_text_encoder_frozen_and_fold_into_plain_weights(method):
    m = tiny()
    m.train_text_encoder = False
    prepare_static(m, method, lora_rank=2)
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    trainable = num_parameters(m, trainable=True)
    assert (trainable == num_parameters(m.unet)) if method == "full" else (0 < trainable < num_parameters(m.unet) / 4)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    m.eval()
    x, t, y = step_inputs(m)
    before = m(x, t, y)
    export_backbone(m)
    assert not any("lora" in n or "difffit" in n for n, _ in m.named_parameters())
    torch.testing.assert_close(m(x, t, y), before, rtol=1e-4, atol=1e-5)


def test_lora_weights_are_written_in_diffusers_format_that_load_lora_weights_reads(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    m = tiny()
    prepare_static(m, "lora", lora_rank=2)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # B starts at zero: make the adapter change the output
    layers = m.lora_layers()
    assert layers and all(k.startswith(("down_blocks", "mid_block", "up_blocks")) for k in layers)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=layers)
    m.eval()
    x, t, y = step_inputs(m)
    tuned = m(x, t, y)
    plain = tiny()  # the same seed: the base weights before LoRA
    plain.eval()
    assert not torch.allclose(plain(x, t, y), tuned, atol=1e-4)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8)
    from autoprog.diffusion.sampling import sampling_scheduler

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                                   unet=plain.unet, scheduler=sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(plain(x, t, y), tuned, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- export / load
def test_export_bakes_the_identifiers_into_the_tokenizer_and_the_table(tmp_path):
    m = tiny(sid=3)
    with torch.no_grad():
        m.sid.embedding.weight.normal_()
    m.eval()
    x, t, y = step_inputs(m)
    want = m(x, t, y)  # the last stage's identifier, as sampling uses
    save_backbone(copy.deepcopy(m), tmp_path / "model", extra={"captions": CAPTIONS})
    meta = json.loads((tmp_path / "model" / "autoprog.json").read_text())
    assert meta["sid_stages"] == 3 and meta["prompt_suffix"] == ", [SID3] stage"
    back, info = load_backbone(tmp_path / "model")
    back.eval()
    assert back.sid is not None and back.sid.stage == 2 and info["captions"] == CAPTIONS
    torch.testing.assert_close(back(x, t, y), want)
    # a plain CLIP user prompts it with the suffix: the baked row is the identifier
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "model" / "tokenizer"))
    text = CLIPTextModel.from_pretrained(str(tmp_path / "model" / "text_encoder")).eval()
    ids = tok([c + meta["prompt_suffix"] for c in CAPTIONS], padding="max_length", max_length=12,
              return_tensors="pt").input_ids
    torch.testing.assert_close(text(ids).last_hidden_state, m.encode_text(y))
    fresh, _ = load_backbone(tmp_path / "model", with_sid=False)  # fine-tuning it again starts without
    assert fresh.sid is None


def test_a_latent_model_exports_a_pipeline_that_stable_diffusion_loads(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    unet_size = 4
    m = tiny(size=unet_size, sid=2)
    m.unet.register_to_config(in_channels=1)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8)
    from autoprog.diffusion.sampling import sampling_scheduler

    save_backbone(copy.deepcopy(m), tmp_path / "pipe", vae=vae, scheduler=sampling_scheduler())
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    out = pipe("a photo of a bag, [SID2] stage", num_inference_steps=2, height=8, width=8, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    back, info = load_backbone(tmp_path / "pipe")
    assert isinstance(back, TextUNet) and info["vae"] == str(tmp_path / "pipe")


@pytest.mark.parametrize("missing", ["text_encoder", "tokenizer"])
def test_a_pipeline_directory_with_a_part_missing_is_refused_in_one_line(tmp_path, missing):
    save_backbone(tiny(), tmp_path / "model")
    import shutil

    shutil.rmtree(tmp_path / "model" / missing)
    with pytest.raises(ConfigError, match=f"not a Stable Diffusion pipeline directory: {missing}/ missing"):
        load_text_unet(tmp_path / "model")


def test_a_text_encoder_of_the_wrong_width_is_refused():
    m = tiny()
    from transformers import CLIPTextConfig, CLIPTextModel

    other = CLIPTextModel(CLIPTextConfig(vocab_size=len(m.tokenizer), hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12))
    with pytest.raises(ConfigError, match="attends to 32-dim text features"):
        TextUNet(m.unet, other, m.tokenizer)


# ------------------------------------------------------------------------------------ loss / sampling
def test_condition_dropout_replaces_whole_prompts_with_the_empty_prompt():
    m = tiny()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.zeros_like(x)

    x, _, y = step_inputs(m)
    diffusion_loss(Spy(), x, y, training_scheduler(), m.null_condition(y), class_dropout=0.999999,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], m.null_ids.expand_as(y))
    diffusion_loss(Spy(), x, y, training_scheduler(), m.null_condition(y), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[1], y)


def test_sampling_prompts_gives_finite_images_and_guidance_changes_them():
    m = tiny(sid=2).eval()
    y = m.tokenize(CAPTIONS[:2])
    a = sample(m, y, steps=2, cfg_scale=1.0, seed=0)
    b = sample(m, y, steps=2, cfg_scale=3.0, seed=0)
    assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all() and not torch.equal(a, b)


def test_captions_map_class_ids_to_their_prompts():
    data = DiffusionData("x", torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 2, 1]),
                         torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.tensor([0]), 3, (0, 1, 2),
                         class_names=("t-shirt", "trouser", "sandal"))
    m = tiny()
    data.caption(m.tokenize)
    assert data.captions == tuple(CAPTIONS)
    assert torch.equal(data.conditions(torch.tensor([2, 0])), m.tokenize([CAPTIONS[2], CAPTIONS[0]]))
    with pytest.raises(ConfigError, match="needs a {}"):
        data.caption(m.tokenize, "a photo")


def test_fashion_mnist_and_digits_know_their_class_names(fake_fmnist):
    assert load_diffusion_data("fashion-mnist", str(fake_fmnist), (9,)).class_names[9] == "ankle boot"
    assert load_diffusion_data("digits", classes=(3,)).class_names[3] == "three"


# ----------------------------------------------------------------------------------------- end to end
TINY = DiffusionConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=1, eval_points=2, curve_samples=6,
                       fd_samples=8, sample_steps=2, proxy_batches=2, proxy_batch_size=2, time_repeats=1)


@pytest.fixture(scope="module")
def text_base(fake_fmnist, cache_dir, tmp_path_factory):
    from autoprog.diffusion.runner import TextBaseSpec, pretrain_base

    out = tmp_path_factory.mktemp("t2i-base")
    pretrain_base(TextBaseSpec(data_root=str(fake_fmnist), image_size=8, channels="8,16", text_dim=32, text_layers=1,
                               max_length=12, feature_epochs=1, cache_dir=str(cache_dir),
                               train=replace(TINY, steps=4, eval_points=1, ema_decay=0.9)), out)
    return out / "model"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prog", "autoprog-zero", "lora"])
def test_text_to_image_methods_finetune_end_to_end(method, text_base, fake_fmnist, cache_dir, tmp_path):
    from autoprog.diffusion.runner import TextFinetuneSpec, finetune

    res = finetune(TextFinetuneSpec(method=method, base=str(text_base), data_root=str(fake_fmnist), image_size=8,
                                    feature_epochs=1, cache_dir=str(cache_dir), train=TINY), tmp_path / method)
    s = res["summary"]
    assert res["done"] and s["steps"] == 8 and s["fd"] is not None and s["classes"] == [5, 6, 7, 8, 9]
    model, meta = load_backbone(tmp_path / method / "model")
    assert isinstance(model, TextUNet) and meta["captions"][5] == "a photo of a sandal"
    assert (model.sid is not None) == (method != "lora")
    if method != "lora":
        assert s["mean_trainable_params"] < s["total_params"] and meta["prompt_suffix"] == ", [SID4] stage"
    else:
        assert (tmp_path / method / "model" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / method / "samples").iterdir()) == ["step4.png", "step8.png"]


def test_lora_with_a_trained_text_encoder_writes_no_adapter_that_leaves_it_out(text_base, fake_fmnist, cache_dir,
                                                                               tmp_path, capsys):
    """--train-text-encoder trains the encoder fully: model/lora (the UNet's adapter alone, for
    pipe.load_lora_weights on the base) would not be the model trained, so it is not written, and a line says so."""
    from autoprog.diffusion.runner import TextFinetuneSpec, finetune

    spec = TextFinetuneSpec(method="lora", base=str(text_base), data_root=str(fake_fmnist), image_size=8,
                            feature_epochs=1, cache_dir=str(cache_dir), train_text_encoder=True,
                            train=replace(TINY, steps=2, eval_points=1))
    finetune(spec, tmp_path / "ft")
    assert "model/lora is not written: the text encoder trained fully" in capsys.readouterr().out
    assert (tmp_path / "ft" / "model" / "unet").is_dir() and not (tmp_path / "ft" / "model" / "lora").exists()


@pytest.mark.slow
def test_the_commands_pretrain_finetune_resume_and_sample(cli, fake_fmnist, cache_dir, tmp_path):
    common = ["--data-root", fake_fmnist, "--image-size", "8", "--batch-size", "8", "--eval-points", "1",
              "--curve-samples", "6", "--fd-samples", "6", "--sample-steps", "2", "--feature-epochs", "1",
              "--cache-dir", cache_dir, "--cpu"]
    rc, out, err = cli("pretrain", "--task", "text-to-image", "--out", tmp_path / "base", "--steps", "3",
                       "--channels", "8,16", "--text-dim", "32", "--text-layers", "1", *common)
    assert rc == 0, err
    assert (tmp_path / "base" / "model" / "unet" / "config.json").is_file()
    rc, out, err = cli("finetune", "--task", "text-to-image", "--base", tmp_path / "base" / "model", "--method",
                       "prog", "--out", tmp_path / "ft", "--steps", "8", *common, "--eval-points", "2",
                       "--stop-after-steps", "4", "--caption", "a picture of a {}", "--gradient-checkpointing")
    assert rc == 0, err
    assert f"continue with `autoprog finetune --resume {tmp_path / 'ft'}`" in out
    rc, out, err = cli("finetune", "--resume", tmp_path / "ft")  # no --task: the run knows its own
    assert rc == 0, err
    meta = json.loads((tmp_path / "ft" / "model" / "autoprog.json").read_text())
    assert meta["captions"][5] == "a picture of a sandal" and meta["steps"] == 8
    rc, out, err = cli("sample", tmp_path / "ft", "--prompt", "a picture of a bag", "--per-class", "2",
                       "--sample-steps", "2", "--out", tmp_path / "s")
    assert rc == 0, err
    assert (tmp_path / "s" / "prompt1.png").is_file()
    rc, out, err = cli("sample", tmp_path / "ft", "--per-class", "1", "--sample-steps", "2", "--out", tmp_path / "c")
    assert rc == 0, err
    assert (tmp_path / "c" / "class5.png").is_file()


def test_finetune_help_names_the_text_options(cli):
    rc, out, _ = cli("finetune", "--task", "text-to-image", "--help")
    assert rc == 0 and "--train-text-encoder" in out and "--caption" in out
    rc, out, _ = cli("finetune", "--help")
    assert rc == 0 and "--caption" not in out


@pytest.mark.slow
def test_compare_text_to_image_reads_every_method_off_full_finetunings_front(text_base, fake_fmnist, cache_dir,
                                                                            tmp_path):
    from autoprog.diffusion.runner import TextFinetuneSpec, compare_finetune

    spec = TextFinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), image_size=8, feature_epochs=1,
                            cache_dir=str(cache_dir), train=TINY)
    rows = {r["method"]: r for r in compare_finetune(spec, ["full", "prog"], tmp_path, budget=False, front=(0.5, 1))}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == list(rows.values())
    assert set(rows) == {"full", "prog", "full@0.5", "full@1"}  # full@1: the whole run with the rate decayed
    assert rows["prog"]["tq_speedup"] is not None and rows["full"]["fd"] is not None
    assert all(0.0 <= r["text_agreement"] <= 1.0 for r in rows.values()), "Table 7's prompt agreement, without CLIP"
    assert (tmp_path / "samples.png").is_file() and "text agreement (autoprog classifier)" in (
        tmp_path / "summary.md").read_text()


def test_a_base_of_the_other_kind_is_refused_in_one_line(text_base, fake_fmnist, tmp_path):
    from autoprog.diffusion.runner import FinetuneSpec, TextFinetuneSpec, build_finetune
    from autoprog.models.dit import build_backbone

    dit = tmp_path / "dit"
    save_backbone(build_backbone("dit", image_size=8, patch_size=4, in_chans=1, num_classes=10, hidden_size=16,
                                 depth=2, num_heads=2), dit)
    with pytest.raises(ConfigError, match="needs a text-to-image base"):
        build_finetune(TextFinetuneSpec(base=str(dit), data_root=str(fake_fmnist), image_size=8))
    with pytest.raises(ConfigError, match="add --task text-to-image"):
        build_finetune(FinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), image_size=8))
    with pytest.raises(ConfigError, match="needs a {}"):
        build_finetune(TextFinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), caption="a photo"))


def test_captions_the_text_encoder_cuts_to_the_same_prompt_are_refused(text_base, fake_fmnist, capsys):
    """The text encoder reads 12 tokens here (words it does not know spelt letter by letter): captions that differ
    only beyond them would train every class on one prompt, silently; cut but distinct ones are warned about,
    with the stage identifier's room taken; the default caption is neither."""
    from autoprog.diffusion.runner import TextFinetuneSpec, build_finetune

    spec = TextFinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), image_size=8, method="full")
    with pytest.raises(ConfigError, match="--caption: the prompts 'a simple black and white drawing of a .*' and .* "
                                          "are the same in the 10 tokens the text encoder reads; make them differ"):
        build_finetune(replace(spec, caption="a simple black and white drawing of a {}"))
    build_finetune(replace(spec, method="prog"))
    assert "warning" not in capsys.readouterr().err
    build_finetune(replace(spec, method="prog", caption="{} of a photo of a photo"))
    err = capsys.readouterr().err
    assert "prompt(s) longer than the 7 tokens the text encoder reads beside the stage identifier are cut" in err


def test_gradient_checkpointing_and_the_text_encoder_flag_reach_the_model(text_base, fake_fmnist):
    from autoprog.diffusion.runner import TextFinetuneSpec, build_finetune
    from autoprog.diffusion.trainer import DiffusionConfig

    spec = TextFinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), image_size=8, method="full",
                            train=DiffusionConfig(gradient_checkpointing=True), train_text_encoder=True)
    _, model, *_ = build_finetune(spec)
    assert model.unet.is_gradient_checkpointing
    saved = spec.to_dict()  # as a run written before the option moved to every task's training settings
    saved["gradient_checkpointing"] = saved["train"].pop("gradient_checkpointing")
    assert TextFinetuneSpec.from_dict(saved).to_dict() == spec.to_dict()
    assert all(p.requires_grad for p in model.text_encoder.parameters())
    _, model, *_ = build_finetune(TextFinetuneSpec(base=str(text_base), data_root=str(fake_fmnist), image_size=8,
                                                   method="full"))
    assert not model.unet.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_a_frozen_text_path_encodes_each_prompt_once_and_afresh_when_its_weights_change():
    m = tiny()
    m.text_encoder.requires_grad_(False)
    calls = []
    m.text_encoder.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
    ids = m.tokenize(CAPTIONS + CAPTIONS[:1])
    first = m.encode_text(ids)
    assert calls == [3]  # three distinct prompts among four rows
    assert torch.equal(m.encode_text(ids[[1, 0]]), first[[1, 0]]) and calls == [3]
    with torch.no_grad():
        m.text_encoder.get_input_embeddings().weight.mul_(2)
    changed = m.encode_text(ids)
    assert calls == [3, 3] and not torch.allclose(changed, first)
    assert torch.allclose(changed, m.text_encoder(m.with_sid(ids)).last_hidden_state, atol=1e-6)
    n = len(calls)
    copy.deepcopy(m).encode_text(ids)  # a copy has weights of its own: it encodes for itself
    assert len(calls) == n + 1


def test_a_learnable_identifier_is_encoded_every_time():
    m = tiny(sid=2)
    m.text_encoder.requires_grad_(False)
    calls = []
    m.text_encoder.register_forward_hook(lambda mod, a, o: calls.append(1))
    ids = m.tokenize(CAPTIONS)
    m.encode_text(ids), m.encode_text(ids)
    assert len(calls) == 2 and m.sid.embedding.weight.requires_grad


def test_training_steps_look_prompts_up_in_the_declared_table_and_count_strangers():
    m = tiny()
    m.text_encoder.requires_grad_(False)
    calls = []
    m.text_encoder.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
    m.expect_conditions(m.tokenize(CAPTIONS))
    ids = m.tokenize([CAPTIONS[2], CAPTIONS[0], CAPTIONS[2]])
    ids = torch.cat([ids, m.null_ids[None]])  # classifier-free guidance's dropped prompt is in the table too
    with torch.no_grad():
        expected = m.text_encoder(ids).last_hidden_state
    calls.clear()
    looked_up = m.encode_text(ids)  # autograd on: a training step
    assert calls == [4] and torch.allclose(looked_up, expected, atol=1e-6)  # the table (3 captions + empty) encoded
    assert torch.equal(m.encode_text(ids[[3, 1]]), looked_up[[3, 1]]) and calls == [4]  # once
    assert int(m.unexpected_conditions()) == 0
    m.encode_text(m.tokenize(["a photo of a bag"]))  # not a caption of the run: counted, for the health check
    assert int(m.unexpected_conditions()) == 1
    with torch.no_grad():  # sampling (autograd off) may use any prompt: the exact per-prompt cache
        assert torch.allclose(m.encode_text(m.tokenize(["a photo of a bag"])),
                              m.text_encoder(m.tokenize(["a photo of a bag"])).last_hidden_state, atol=1e-6)
    assert int(m.unexpected_conditions()) == 1


@pytest.mark.parametrize("learns", ["identifier", "text encoder"])
def test_a_learnable_text_path_encodes_each_declared_prompt_once_per_step_with_the_same_gradients(learns):
    m = tiny(sid=2).double()  # (in float32 the two sums' roundings differ by a layer norm's cancellations)
    m.text_encoder.requires_grad_(learns == "text encoder")
    m.expect_conditions(m.tokenize(CAPTIONS))
    calls = []
    m.text_encoder.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
    ids = torch.cat([m.tokenize([CAPTIONS[2], CAPTIONS[0], CAPTIONS[2], CAPTIONS[2], CAPTIONS[0]]), m.null_ids[None]])
    learnable = [p for p in m.parameters() if p.requires_grad and p.dtype.is_floating_point]
    weights = torch.randn(len(ids), 1, 1, dtype=torch.float64)

    def grads(encode):
        for p in learnable:
            p.grad = None
        out = encode()
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() if p.grad is not None else None for p in learnable]

    per_row, per_row_grads = grads(lambda: m.text_encoder(m.with_sid(ids)).last_hidden_state)
    calls.clear()
    once, once_grads = grads(lambda: m.encode_text(ids))
    assert calls == [4], "the 3 captions and the empty prompt, not the batch's 6 rows"
    assert torch.allclose(once, per_row, atol=1e-12)
    assert all((a is None) == (b is None) for a, b in zip(once_grads, per_row_grads))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(once_grads, per_row_grads) if a is not None)
    assert int(m.unexpected_conditions()) == 0
    calls.clear()
    m.encode_text(ids[:3])  # a batch with no more rows than the run has prompts: encoded row by row
    assert calls == [3]
    m.encode_text(torch.cat([ids, m.tokenize(["a photo of a bag"])]))  # a stranger: counted for the health check
    assert int(m.unexpected_conditions()) == 1


def test_the_health_check_raises_on_a_training_prompt_outside_the_table():
    from accelerate import Accelerator

    from autoprog.engine import HealthWatch

    m = tiny()
    m.text_encoder.requires_grad_(False)
    m.expect_conditions(m.tokenize(CAPTIONS))
    watch = HealthWatch()
    watch.guard(m.unexpected_conditions, "a training prompt was not among the run's captions")
    watch.watch(1, torch.tensor(0.5), None)
    acc = Accelerator(cpu=True)
    watch.check(acc)  # nothing looked up yet
    m.encode_text(m.tokenize(CAPTIONS[:2]))
    watch.check(acc)
    m.encode_text(m.tokenize(["a photo of a bag"]))
    with pytest.raises(RuntimeError, match="internal error: a training prompt was not among"):
        watch.check(acc)


def test_a_step_flops_count_leaves_out_the_one_off_encoding_of_the_prompt_table(text_base, fake_fmnist, cache_dir,
                                                                               tmp_path):
    from autoprog.diffusion.runner import TextFinetuneSpec, build_finetune
    from autoprog.diffusion.trainer import DiffusionTrainer
    from autoprog.metrics import count_flops

    data, model, controller, unfreezer, lr = build_finetune(TextFinetuneSpec(
        base=str(text_base), data_root=str(fake_fmnist), image_size=8, method="full", feature_epochs=1,
        cache_dir=str(cache_dir), train=TINY))
    trainer = DiffusionTrainer(model, controller, data, TINY, tmp_path, lr, unfreezer=unfreezer)
    counted = trainer.step_flops()
    x0, y = data.batch(torch.arange(2), trainer.resolution, generator=torch.Generator().manual_seed(0))

    def step():
        trainer.training_loss(model, x0, y).backward()
        model.zero_grad(set_to_none=True)

    step()
    assert counted == int(count_flops(step) / 2 * trainer.global_batch)  # as a warm step counts


@pytest.mark.parametrize("batch_size", [4, 16])
def test_a_step_flops_count_charges_a_learnable_text_path_for_the_prompts_it_encodes(batch_size, text_base,
                                                                                     fake_fmnist, cache_dir, tmp_path):
    """With the text encoder learnable, a step of more rows than the run has captions (one per class id of the
    label space, 10, and the empty prompt) encodes each caption once: the count is a real step's of that many
    rows, not its 2-row count scaled up."""
    from autoprog.diffusion.runner import TextFinetuneSpec, build_finetune
    from autoprog.diffusion.trainer import DiffusionTrainer
    from autoprog.metrics import count_flops

    cfg = replace(TINY, batch_size=batch_size)
    data, model, controller, unfreezer, lr = build_finetune(TextFinetuneSpec(
        base=str(text_base), data_root=str(fake_fmnist), image_size=8, method="full", feature_epochs=1,
        cache_dir=str(cache_dir), train_text_encoder=True, train=cfg))
    trainer = DiffusionTrainer(model, controller, data, cfg, tmp_path, lr, unfreezer=unfreezer)
    assert model.encoded_rows(batch_size) == min(batch_size, 11)
    counted = trainer.step_flops()
    x0, y = data.batch(torch.arange(batch_size), trainer.resolution, generator=torch.Generator().manual_seed(0))

    def step():
        trainer.training_loss(model, x0, y).backward()
        model.zero_grad(set_to_none=True)

    assert counted == pytest.approx(count_flops(step), rel=1e-9)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("sid", [0, 2])
def test_sampling_encodes_each_batchs_prompts_once_not_at_every_step(sid, cfg_scale, monkeypatch):
    """The sampler hands a text model the same conditions at every DDIM step: they are encoded once per batch,
    not once per step (a learnable SID's text path encoded at every step; a frozen one read its ids back to the
    host for the prompt cache at every step, a wait for the GPU); the samples are the same."""
    torch.manual_seed(0)
    m = tiny(sid=sid)
    if sid:
        m.set_stage(1)
    else:
        m.text_encoder.requires_grad_(False)
    y = m.tokenize(CAPTIONS)
    m._text_cache = {}
    before = sample(m, y, steps=4, cfg_scale=cfg_scale, seed=0, batch_size=2)
    m._text_cache, m._last_text = {}, None  # as a fresh model
    encodes, reads = [], []
    hook = m.text_encoder.register_forward_hook(lambda mod, args, out: encodes.append(args[0].shape[0]))
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(t.shape) or cpu(t, *a, **k))
    again = sample(m, y, steps=4, cfg_scale=cfg_scale, seed=0, batch_size=2)
    monkeypatch.undo()
    hook.remove()
    assert len(encodes) == 2, encodes  # two batches (3 prompts, 2 a batch), four steps each
    # per batch: the finished samples, and (a frozen text path's prompt cache) the prompt ids once
    assert len(reads) == 2 * (1 if sid else 2), reads
    assert torch.equal(before, again)
    assert m._last_text is None  # the sampler's encodings are not kept (on a GPU, through the training after it)
    with torch.inference_mode():  # inference tensors (no version counter) are encoded, not remembered
        ids = m.tokenize(CAPTIONS)
        assert ids.is_inference() and m.encode_text(ids).shape[0] == len(ids) and m._last_text is None
