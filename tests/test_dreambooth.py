"""DreamBooth: subject and class images, the paired batches and prior-preservation loss, the scores (own
feature classifier, and CLIP / DINO from tiny local checkpoints written here), the spec's prompts, and the
command end to end on a tiny text-to-image base."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import test_text_to_image as t2i
import torch

from autoprog.diffusion.data import DiffusionData
from autoprog.diffusion.dreambooth import (
    ClipScorer,
    DinoScorer,
    SubjectEvaluator,
    class_images,
    default_subject,
    dreambooth_data,
    read_images,
    write_images,
)
from autoprog.diffusion.runner import DreamBoothSpec
from autoprog.diffusion.sampling import diffusion_loss, training_scheduler
from autoprog.errors import ConfigError, DataError
from autoprog.models.text_unet import word_tokenizer


def images(n: int, value: int = 100, size: int = 8, chans: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(value)
    return (torch.rand(n, chans, size, size, generator=g) * 255).to(torch.uint8)


def toy_data(n_inst=3, n_prior=10, weight=1.0) -> DiffusionData:
    tok = lambda prompts: torch.zeros(len(prompts), 4, dtype=torch.long)  # noqa: E731
    return dreambooth_data(images(n_inst), images(n_prior, 7) if n_prior else None, "a photo of sks dress",
                           "a photo of a dress", weight if n_prior else None, tok)


# ---------------------------------------------------------------------------------------------- batches
def test_paired_batches_are_half_subject_half_class_on_every_process():
    data = toy_data()
    for procs in (1, 2):
        for step in range(5):
            idx = data.batch_indices(step, 8, seed=0, num_processes=procs)
            assert len(idx) == 8
            for p in range(procs):
                share = idx[p::procs]
                inst = (share < data.num_instance).sum().item()
                assert inst == len(share) - inst  # both kinds on every process, half each
    assert torch.equal(data.batch_indices(3, 8, 0), data.batch_indices(3, 8, 0))


def test_the_few_subject_images_are_cycled_through_evenly_even_when_a_batch_is_larger():
    data = toy_data(n_prior=0)
    assert data.prior_weight is None and not data.paired
    seen = torch.cat([data.batch_indices(s, 6, seed=1) for s in range(4)])  # 24 draws of 3 images
    assert seen.max() < 3 and torch.bincount(seen).tolist() == [8, 8, 8]
    assert data.loss_weights(seen[:6]) is None


def test_the_weighted_loss_is_the_subject_mean_plus_the_prior_weight_times_the_class_mean():
    data = toy_data(weight=0.5)
    idx = data.batch_indices(0, 6, seed=0)
    w = data.loss_weights(idx)
    sched = training_scheduler()

    class Echo(torch.nn.Module):  # predicts zero noise: the per-sample loss is the noise's mean square
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    x0 = torch.randn(6, 1, 4, 4)
    y = torch.zeros(6, 2, dtype=torch.long)
    loss = diffusion_loss(Echo(), x0, y, sched, 0, generator=torch.Generator().manual_seed(3), weights=w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    per = noise.pow(2).flatten(1).mean(1)
    prior = idx >= data.num_instance
    expected = per[~prior].mean() + 0.5 * per[prior].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ images
def test_a_folder_of_images_is_read_resized_cropped_and_converted(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((30, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    grey = read_images(tmp_path, 8, 1)
    err = capsys.readouterr().err  # (said, not done silently)
    assert "1 of the 2 subject images are in colour; the base model takes 1 channel, so they train in grey" in err
    assert "skipping 1 non-image file" in err and "e.g. notes.txt" in err
    rgb = read_images(tmp_path, 8, 3)
    assert grey.shape == (2, 1, 8, 8) and rgb.shape == (2, 3, 8, 8) and grey.dtype == torch.uint8
    assert torch.equal(grey[1, 0], rgb[1, 0]), "a greyscale file keeps its values"
    assert "colour" not in capsys.readouterr().err


def test_bad_image_folders_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        read_images(tmp_path / "missing", 8, 1)
    with pytest.raises(DataError, match="holds no images"):
        read_images(tmp_path, 8, 1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png") as e:
        read_images(tmp_path, 8, 1)
    assert "\n" not in str(e.value)


def test_the_built_in_subject_is_one_image_and_its_nearest_neighbours_of_the_class(fake_fmnist):
    from autoprog.diffusion.data import load_diffusion_data

    subject = default_subject(str(fake_fmnist), class_id=3, n=4)
    pool = load_diffusion_data("fashion-mnist", str(fake_fmnist), classes=(3,)).test_images
    assert subject.shape == (4, 1, 28, 28) and torch.equal(subject[0], pool[0])
    d = (pool.float() - pool[0].float()).flatten(1).pow(2).sum(1)
    chosen = (subject.float() - pool[0].float()).flatten(1).pow(2).sum(1)
    assert chosen.max() <= d.sort().values[3] + 1e-3  # no other image of the class is nearer than the chosen


def test_class_images_are_generated_once_topped_up_and_then_reused(tmp_path):
    model = t2i.tiny()
    logs = []
    folder = tmp_path / "class"
    first = class_images(model, lambda x: x, "a photo of a dress", 3, folder, 8, 1, 2, 4.0, 1.0, 0, log=logs.append)
    assert first.shape == (3, 1, 8, 8) and len(list(folder.glob("class-*.png"))) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    more = class_images(model, lambda x: x, "a photo of a dress", 5, folder, 8, 1, 2, 4.0, 1.0, 0, log=logs.append)
    assert more.shape[0] == 5 and torch.equal(more[:3], first) and "generating 2 class images" in logs[-1]
    again = class_images(model, lambda x: x, "a photo of a dress", 5, folder, 8, 1, 2, 4.0, 1.0, 0, log=logs.append)
    assert torch.equal(again, more) and "generating" not in logs[-1]
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in folder.iterdir() if p.name in mtimes)


def test_class_images_added_to_a_folder_overwrite_none_there(tmp_path):
    """A folder holding ``class-00001.png`` alone (say, ``class-00000.png`` deleted): the two images topping it up to
    three are written after it, not over it."""
    model = t2i.tiny()
    folder = tmp_path / "class"
    write_images(images(1, size=8, chans=1), folder, start=1)
    kept = (folder / "class-00001.png").read_bytes()
    got = class_images(model, lambda x: x, "a photo of a dress", 3, folder, 8, 1, 2, 4.0, 1.0, 0, log=lambda *_: None)
    assert sorted(p.name for p in folder.iterdir()) == ["class-00001.png", "class-00002.png", "class-00003.png"]
    assert (folder / "class-00001.png").read_bytes() == kept and got.shape[0] == 3


def test_written_images_read_back_unchanged(tmp_path):
    x = images(3, size=8, chans=3)
    write_images(x, tmp_path, prefix="img")
    assert torch.equal(read_images(tmp_path, 8, 3), x)


# ------------------------------------------------------------------------------------------------ scores
class BandNet(torch.nn.Module):
    """A feature classifier that reads the fake data's class band: features are row brightnesses."""

    in_channels = 1

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(28, 10)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            for c in range(10):
                r = 2 + (c * 5) // 2
                self.head.weight[c, r:r + 3] = 20.0

    def features(self, x):
        return x.mean(-1).flatten(1) + 1  # [-1, 1] pixels: rows' mean brightness, shifted to be positive


def test_own_feature_scores_rank_the_subject_above_noise_and_name_the_class_agreement(fake_fmnist):
    from autoprog.diffusion.data import load_diffusion_data

    src = load_diffusion_data("fashion-mnist", str(fake_fmnist), classes=None)
    net = BandNet()
    subject = src.test_images[src.test_labels == 3][:4]
    ev = SubjectEvaluator(subject, "a photo of a dress", net, subject_class=3)
    same = ev.evaluate(src.test_images[src.test_labels == 3][4:8])
    noise = ev.evaluate(images(4, size=28))
    assert ev.headline == "subject_fidelity" and same["metric"] == "subject fidelity (autoprog features)"
    assert same["subject_fidelity"] > noise["subject_fidelity"]
    assert same["text_agreement"] > noise["text_agreement"]
    assert "text_agreement" not in SubjectEvaluator(subject, "x", net).evaluate(subject)
    assert "dino" not in same and "clip_t" not in same
    with pytest.raises(ValueError, match="uint8"):
        ev.evaluate(subject.float())


@pytest.fixture(scope="module")
def tiny_clip_and_dino(tmp_path_factory):
    """A tiny random CLIP (model + processor) and DINO-style ViT (model + image processor), saved locally."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("scorers")
    tok = word_tokenizer("a photo of dress sks".split(), max_length=12)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=12, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=8))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tok).save_pretrained(root / "clip")
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2), add_pooling_layer=False)
    vit.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_clip_and_dino_scores_come_from_local_checkpoints(tiny_clip_and_dino):
    clip_dir, dino_dir = tiny_clip_and_dino
    subject = images(3, size=8, chans=1)
    ev = SubjectEvaluator(subject, "a photo of dress", dino=DinoScorer(str(dino_dir)), clip=ClipScorer(str(clip_dir)))
    assert ev.headline == "dino" and ev.metric == "DINO"
    same, other = ev.evaluate(subject), ev.evaluate(images(3, value=5, size=8))
    for k in ("dino", "clip_i", "clip_t"):
        assert -1 <= same[k] <= 1 and np.isfinite(same[k])
    one = SubjectEvaluator(subject[:1], "a photo of dress", dino=DinoScorer(str(dino_dir)),
                           clip=ClipScorer(str(clip_dir))).evaluate(subject[:1])
    assert one["dino"] == pytest.approx(1.0, abs=1e-4) and one["clip_i"] == pytest.approx(1.0, abs=1e-4)
    assert other["dino"] < 1 - 1e-4
    assert "subject_fidelity" not in same  # never named after what was not measured


def test_a_missing_or_wrong_scorer_folder_is_a_one_line_error(tiny_clip_and_dino, tmp_path):
    clip_dir, dino_dir = tiny_clip_and_dino
    with pytest.raises(ConfigError, match="--clip-model .*no such directory"):
        ClipScorer(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="--clip-model .*not a CLIP") as e:
        ClipScorer(str(dino_dir))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--dino-model .*not a"):
        DinoScorer(str(tmp_path))


# ------------------------------------------------------------------------------------------------ spec
def test_prompts_fill_in_the_subject_class_and_must_differ():
    assert DreamBoothSpec().prompts() == ("a photo of sks dress", "a photo of a dress")
    assert DreamBoothSpec(subject_class=8).prompts() == ("a photo of sks bag", "a photo of a bag")
    with pytest.raises(ConfigError, match="--instance-prompt .*write the class name"):
        DreamBoothSpec(instance_dir="x").prompts()
    assert DreamBoothSpec(instance_dir="x", instance_prompt="a photo of sks mug",
                          class_prompt="a photo of a mug").prompts()[0] == "a photo of sks mug"
    with pytest.raises(ConfigError, match="are the same"):
        DreamBoothSpec(instance_prompt="a photo of a {}").prompts()
    with pytest.raises(ConfigError, match="--subject-class 12"):
        DreamBoothSpec(subject_class=12).prompts()


def test_an_own_subject_takes_its_class_name_from_its_dataset(image_folder, tmp_path):
    """--subject-class names a class of --dataset: its folder's name (it took Fashion-MNIST's: class 1 of a
    circle/square folder was 'trouser'), and a class the dataset lacks is refused (it was accepted on a {}-less
    prompt)."""
    spec = DreamBoothSpec(instance_dir="x", dataset=str(image_folder), subject_class=1)
    assert spec.prompts() == ("a photo of sks square", "a photo of a square")
    with pytest.raises(ConfigError, match=f"--subject-class 7: {image_folder} has classes 0-1"):
        replace(spec, subject_class=7, instance_prompt="a photo of sks thing", class_prompt="a photo of a thing"
                ).prompts()
    assert DreamBoothSpec(instance_dir="x", dataset="digits", subject_class=3).prompts()[1] == "a photo of a three"


def test_dreambooth_takes_no_image_size_or_subset_it_would_not_read(cli, text_base, tmp_path):
    """DreamBooth trains on the subject's images at the base model's size: --image-size and --subset were listed
    in its help, saved in its config, and not read."""
    from autoprog.diffusion.runner import finetune

    rc, _, err = cli("finetune", "--task", "dreambooth", "--image-size", "16", "--out", tmp_path / "a")
    assert rc == 2 and "unrecognized arguments: --image-size 16" in err
    with pytest.raises(ConfigError, match="subset=2 is not read"):
        finetune(DreamBoothSpec(base=str(text_base), subset=2), tmp_path / "b")


def test_prior_preservations_settings_without_it_are_said_to_be_unread(text_base, fake_fmnist, capsys):
    from autoprog.diffusion.runner import build_finetune

    build_finetune(DreamBoothSpec(base=str(text_base), data_root=str(fake_fmnist), prior_loss_weight=5.0,
                                  class_dir="/nonexistent"))
    assert "--prior-loss-weight, --class-dir are read only with --with-prior-preservation" in capsys.readouterr().err


def test_the_built_in_subject_under_a_prompt_naming_another_class_is_warned_of(text_base, fake_fmnist, capsys):
    from autoprog.diffusion.runner import build_finetune
    from autoprog.errors import forget_warnings

    forget_warnings()
    build_finetune(DreamBoothSpec(base=str(text_base), data_root=str(fake_fmnist)))  # "a photo of sks {}": a dress
    assert "does not name the built-in subject" not in capsys.readouterr().err
    build_finetune(DreamBoothSpec(base=str(text_base), data_root=str(fake_fmnist), instance_prompt="a photo of sks dog",
                                  class_prompt="a photo of dog"))  # the dreambooth-paper preset's, without its images
    assert ("--instance-prompt 'a photo of sks dog' does not name the built-in subject, a Fashion-MNIST dress: give "
            "--instance-dir") in capsys.readouterr().err


def test_class_images_never_go_into_the_subjects_folder(cli, text_base, tmp_path):
    """--class-dir naming the --instance-dir (or a folder in it, or around it) once wrote generated class images
    among the subject's, which every later run then read as the subject."""
    from PIL import Image

    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(3):
        Image.new("L", (24, 24), 40 * i).save(subject / f"s{i}.png")
    for class_dir in (subject, subject / "class", tmp_path):
        rc, _, err = cli("finetune", "--task", "dreambooth", "--method", "full", "--base", text_base, "--instance-dir",
                         subject, "--subject-class", "8", "--with-prior-preservation", "--class-dir", class_dir,
                         "--out", tmp_path / "db", "--steps", "2", "--cpu")
        assert rc == 2 and "share a folder" in err, err
    assert sorted(p.name for p in subject.iterdir()) == ["s0.png", "s1.png", "s2.png"]


# ------------------------------------------------------------------------------------------ end to end
text_base = t2i.text_base  # the tiny text-to-image base, a fixture
DB = replace(t2i.TINY, steps=6, batch_size=8, fd_samples=6)  # larger than the built-in subject's 5 images


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_trains_scores_and_exports_a_pipeline(text_base, fake_fmnist, cache_dir,
                                                                                tmp_path):
    from diffusers import StableDiffusionPipeline  # noqa: F401  (the export must be its layout)

    from autoprog.diffusion.runner import finetune
    from autoprog.models.dit import load_backbone

    inst = tmp_path / "subject"
    write_images(images(4, size=8), inst, prefix="img")
    spec = DreamBoothSpec(method="autoprog-zero", base=str(text_base), data_root=str(fake_fmnist), instance_dir=str(inst),
                          subject_class=3, with_prior_preservation=True, num_class_images=5,
                          class_dir=str(tmp_path / "class"), feature_epochs=1, cache_dir=str(cache_dir), train=DB,
                          eval_prompts="a photo of sks {} on the beach")
    res = finetune(spec, tmp_path / "run")
    s = res["summary"]
    assert res["done"] and s["headline"] == "subject_fidelity" and s["fd"] is None
    assert 0 <= s["text_agreement"] <= 1 and -1 <= s["subject_fidelity"] <= 1
    assert 0 <= s["text_agreement_p1"] <= 1 and "clip_t_p1" not in s  # Prompt-A, scored without CLIP weights
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 5
    model, meta = load_backbone(tmp_path / "run" / "model")
    assert meta["captions"][0] == "a photo of sks dress" and meta["prompt_suffix"].startswith(", [SID")
    assert json.loads((tmp_path / "run" / "model" / "unet" / "config.json").read_text())["sample_size"] == 8


@pytest.mark.slow
def test_compare_dreambooth_ranks_by_subject_fidelity_on_full_finetunings_front(text_base, fake_fmnist, cache_dir,
                                                                               tmp_path):
    from autoprog.diffusion.runner import compare_finetune

    spec = DreamBoothSpec(base=str(text_base), data_root=str(fake_fmnist), feature_epochs=1, cache_dir=str(cache_dir),
                          train=DB)
    rows = {r["method"]: r for r in compare_finetune(spec, ["full", "prog"], tmp_path, budget=False, front=(0.5, 1))}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == list(rows.values())
    assert summary["headline"] == "subject_fidelity" and set(rows) == {"full", "prog", "full@0.5", "full@1"}  # full@1: the cosine-decayed whole run
    assert rows["prog"]["tq_speedup"] is not None or rows["prog"]["tq_bound"] in (">", "<")
    md = (tmp_path / "summary.md").read_text()
    assert "subject fidelity (autoprog features)" in md and "DreamBooth built-in subject" in md
    assert 0 < summary["reference"]["subject_fidelity"] <= 1 + 1e-6  # the subject images against each other
    assert "The subject images themselves score" in md
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "front.png").is_file()


def test_dreambooth_help_says_what_class_images_are_for(cli):
    rc, out, _ = cli("finetune", "--task", "dreambooth", "--help")
    assert rc == 0
    for flag in ("--instance-dir", "--instance-prompt", "--with-prior-preservation", "--prior-loss-weight",
                 "--num-class-images", "--class-prompt", "--clip-model", "--dino-model"):
        assert flag in out
    assert "variety" in out and "--caption" not in out


def test_a_class_conditional_base_is_refused_for_dreambooth(fake_fmnist, tmp_path):
    from autoprog.diffusion.runner import build_finetune
    from autoprog.models.dit import build_backbone, save_backbone

    save_backbone(build_backbone("dit", image_size=8, patch_size=4, in_chans=1, num_classes=10, hidden_size=16,
                                 depth=2, num_heads=2), tmp_path / "dit")
    with pytest.raises(ConfigError, match="--task dreambooth needs a text-to-image base"):
        build_finetune(DreamBoothSpec(base=str(tmp_path / "dit"), data_root=str(fake_fmnist)))



def test_the_built_in_subject_needs_fashion_mnist_and_prior_preservation_a_batch_of_two(fake_fmnist, tmp_path):
    from autoprog.diffusion.runner import _dreambooth_data
    from autoprog.diffusion.trainer import DiffusionConfig, DiffusionTrainer

    with pytest.raises(ConfigError, match="built-in subject is Fashion-MNIST's"):
        _dreambooth_data(DreamBoothSpec(dataset="digits"), None, {}, tmp_path)
    for spelling in ("Fashion-MNIST", "fashion_mnist"):  # every spelling the loaders read names the subject's data
        data = _dreambooth_data(DreamBoothSpec(dataset=spelling, data_root=str(fake_fmnist),
                                               with_prior_preservation=False), t2i.tiny(),
                                {"image_size": 8, "image_channels": 1}, tmp_path)
        assert len(data.train_images) > 0
    with pytest.raises(ConfigError, match="at least 2 per process"):
        DiffusionTrainer(t2i.tiny(), None, toy_data(), DiffusionConfig(batch_size=1), tmp_path, 1e-3)


def test_text_to_image_reports_clip_t_against_each_images_prompt(tiny_clip_and_dino):
    import torch.nn.functional as F

    from autoprog.diffusion.dreambooth import ClipScorer, PromptAgreement
    from autoprog.diffusion.report import quality_columns

    class FD:
        higher_is_better = False

        def evaluate(self, images):
            return {"fd": 1.5, "kid": 0.1, "kid_std": 0.0, "metric": "FD"}

    clip = ClipScorer(str(tiny_clip_and_dino[0]))
    captions = ("a photo of dress", "a photo of sks", "a photo of a photo")
    ev = PromptAgreement(FD(), captions, classes=(2, 0), clip=clip)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    out = ev.evaluate(images)
    assert out["fd"] == 1.5 and ev.higher_is_better is False, "the inner evaluator's figures and attributes"
    prompts = [captions[(2, 0)[i % 2]] for i in range(5)]  # generated class-balanced, cycling through the classes
    want = torch.stack([F.cosine_similarity(clip.image_features(images[i:i + 1]), clip.text_features(p), dim=-1)
                        for i, p in enumerate(prompts)]).mean()
    assert out["clip_t"] == pytest.approx(float(want), abs=1e-5)
    cols = [k for k, _, _ in quality_columns([{"fd": 1.0, "kid": 0.1, "clip_t": 0.2, "metric": "FD"}])]
    assert cols == ["fd", "kid", "clip_t"], "text-to-image tables show FD, KID and CLIP-T"


def test_text_to_image_without_clip_reports_the_own_classifiers_agreement_with_each_prompt():
    """Table 7's question without CLIP weights: the feature classifier's probability of each image's prompted class,
    averaged; an image of the wrong class scores low, and the column is named as the classifier's."""
    from torch import nn

    from autoprog.diffusion.dreambooth import OWN_TEXT, SCORE_LABELS, PromptAgreement
    from autoprog.diffusion.report import quality_columns

    class FD:
        higher_is_better = False

        def evaluate(self, images):
            return {"fd": 1.5, "kid": 0.1, "kid_std": 0.0, "metric": "FD"}

    class ByBrightness(nn.Module):  # class 0 for dark images, class 1 for bright ones
        in_channels = 1

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(1, 2)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[-20.0], [20.0]]))
                self.head.bias.zero_()

        def features(self, x):
            return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    dark = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    bright = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    ev = PromptAgreement(FD(), ("a photo of a dark", "a photo of a bright"), classes=(0, 1), feature_net=ByBrightness())
    right = ev.evaluate(torch.cat([dark, bright, dark, bright]))  # cycling through classes 0, 1, 0, 1
    wrong = ev.evaluate(torch.cat([bright, dark, bright, dark]))
    assert right["text_agreement"] > 0.99 and wrong["text_agreement"] < 0.01 and "clip_t" not in right
    assert right["fd"] == 1.5
    cols = quality_columns([{"fd": 1.0, "kid": 0.1, "text_agreement": 0.5, "metric": "FD"}])
    assert [k for k, _, _ in cols] == ["fd", "kid", "text_agreement"] and SCORE_LABELS["text_agreement"] == OWN_TEXT
    with pytest.raises(ConfigError, match="outside the feature classifier"):
        PromptAgreement(FD(), ("a", "b", "c"), classes=(2,), feature_net=ByBrightness()).evaluate(dark)
    with pytest.raises(ConfigError, match="needs CLIP weights"):
        PromptAgreement(FD(), ("a",), classes=(0,))


def test_eval_prompts_are_filled_bounded_and_need_a_scorer(capsys):
    spec = DreamBoothSpec(eval_prompts="a photo of sks {} sleeping under a tree | a photo of sks {} on the beach")
    assert spec.evaluation_prompts() == ("a photo of sks dress sleeping under a tree", "a photo of sks dress on the beach")
    assert "warning" not in capsys.readouterr().err
    spec = DreamBoothSpec(eval_prompts="a photo of sks {} on the beach|a photo of a {} on the beach")
    assert len(spec.evaluation_prompts()) == 2  # the second names the class only: said, and still scored
    assert ("--eval-prompts 'a photo of a dress on the beach' lacks the identifier of --instance-prompt (sks): it asks "
            "for the subject's class, not the subject") in capsys.readouterr().err
    DreamBoothSpec(eval_prompts="a photo of sks, the {}, on the beach").evaluation_prompts()  # (punctuation aside)
    assert "warning" not in capsys.readouterr().err
    assert DreamBoothSpec().evaluation_prompts() == ()
    with pytest.raises(ConfigError, match="empty prompt"):
        DreamBoothSpec(eval_prompts="a|").evaluation_prompts()
    with pytest.raises(ConfigError, match="at most 4"):
        DreamBoothSpec(eval_prompts="a|b|c|d|e").evaluation_prompts()
    with pytest.raises(ConfigError, match="nothing would score"):
        DreamBoothSpec(instance_dir="x", instance_prompt="sks mug", class_prompt="a mug",
                       eval_prompts="sks mug on a beach").evaluation_prompts()


def test_prompt_scores_are_clip_t_to_that_prompt_and_the_classifiers_agreement(tiny_clip_and_dino, fake_fmnist):
    import torch.nn.functional as F

    from autoprog.diffusion.data import load_diffusion_data
    from autoprog.diffusion.dreambooth import ClipScorer
    from autoprog.diffusion.report import quality_columns

    src = load_diffusion_data("fashion-mnist", str(fake_fmnist), classes=None)
    subject = src.test_images[src.test_labels == 3][:4]
    clip = ClipScorer(str(tiny_clip_and_dino[0]))
    ev = SubjectEvaluator(subject, "a photo of a dress", BandNet(), subject_class=3, clip=clip)
    gen = src.test_images[src.test_labels == 3][4:8]
    out = ev.prompt_scores(gen, "a photo of sks dress on the beach", 2)
    assert set(out) == {"clip_t_p2", "text_agreement_p2"}
    want = F.cosine_similarity(clip.image_features(gen), clip.text_features("a photo of sks dress on the beach")).mean()
    assert out["clip_t_p2"] == pytest.approx(float(want), abs=1e-5)
    assert out["text_agreement_p2"] > ev.prompt_scores(images(4, size=28), "x", 2)["text_agreement_p2"]
    cols = quality_columns([{"subject_fidelity": 0.9, "clip_t_p1": 0.2, "clip_t_p2": 0.3, "metric": "m"}])
    assert [h for _, h, _ in cols] == ["subject fidelity (autoprog features)", "CLIP-T, prompt 1", "CLIP-T, prompt 2"]
    with pytest.raises(ValueError, match="prompt index"):
        ev.prompt_scores(gen, "x", 5)


def test_class_images_are_generated_on_the_runs_device(text_base, fake_fmnist, cache_dir, tmp_path, monkeypatch):
    """With ``--cpu`` on a machine that has a GPU, the class images are generated where the run trains (the
    accelerator's device), not on whatever GPU there is."""
    from autoprog.diffusion.runner import build_finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU this process must not use
    inst = tmp_path / "subject"
    write_images(images(2, size=8), inst, prefix="img")
    spec = DreamBoothSpec(base=str(text_base), data_root=str(fake_fmnist), instance_dir=str(inst), subject_class=3,
                          with_prior_preservation=True, num_class_images=2, class_dir=str(tmp_path / "class"),
                          cache_dir=str(cache_dir), train=DB)
    build_finetune(spec, device=torch.device("cpu"))
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 2


@pytest.mark.slow
def test_a_subject_of_one_image_trains(text_base, fake_fmnist, cache_dir, tmp_path, capsys):
    """One subject image (the help asks for 3-6; one is still a subject, and the run says it is few): its FLOPs,
    proxies and steps repeat it (before, the FLOPs count's batch of two indexed past it)."""
    from autoprog.diffusion.runner import finetune

    inst = tmp_path / "subject"
    write_images(images(1, size=8), inst, prefix="img")
    spec = DreamBoothSpec(method="autoprog-zero", base=str(text_base), data_root=str(fake_fmnist),
                          instance_dir=str(inst), subject_class=3, feature_epochs=1, cache_dir=str(cache_dir),
                          train=replace(DB, time_source="flops"))
    assert finetune(spec, tmp_path / "run")["done"]
    assert f"--instance-dir {inst} holds 1 image of the subject; DreamBooth learns a subject from 3-6" in \
        capsys.readouterr().err
