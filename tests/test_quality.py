"""Generation quality: the feature classifier, its cache, FD/KID through torchmetrics, image helpers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from autoprog.diffusion import quality
from autoprog.diffusion.quality import (
    ClassifierFeatures,
    QualityEvaluator,
    inception_evaluator,
    load_or_train_feature_net,
    save_grid,
    to_uint8,
    train_feature_classifier,
)
from autoprog.errors import ConfigError

SIZE = 16


def halves(n: int, seed: int, classes: tuple[int, ...] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 16, 16) images: class 0 has a bright left half, class 1 a bright right half, noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    images = torch.randint(0, 60, (n, 1, SIZE, SIZE), generator=g)
    bright = torch.randint(150, 255, (n, 1, SIZE, SIZE // 2), generator=g)
    left = labels == 0
    images[left, :, :, : SIZE // 2] = bright[left]
    images[~left, :, :, SIZE // 2 :] = bright[~left]
    return images.to(torch.uint8), labels


def train(images: torch.Tensor, labels: torch.Tensor, **kw):
    return train_feature_classifier(images, labels, 2, epochs=2, batch_size=64, **kw)


@pytest.fixture(scope="module")
def net():
    net, _ = train(*halves(256, seed=0))
    return net


def test_classifier_learns_and_is_deterministic():
    data, test = halves(256, seed=0), halves(200, seed=1)
    net_a, info = train(*data, test=test)
    net_b, _ = train(*data)
    assert info["test_top1"] > 0.9
    assert info["train_images"] == 256 and info["epochs"] == 2
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not net_a.training
    other, _ = train(*data, seed=1)
    assert not torch.equal(other.head.weight, net_a.head.weight)


def test_cache_loads_instead_of_training(tmp_path, monkeypatch):
    data, test = halves(128, seed=0), halves(64, seed=1)
    logs: list[str] = []
    net, info = load_or_train_feature_net(*data, 2, tmp_path, test=test, epochs=1, log=logs.append)
    assert not info["cached"] and "training" in logs[-1]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(quality, "train_feature_classifier", no_training)
    again, info2 = load_or_train_feature_net(*data, 2, tmp_path, test=test, epochs=1, log=logs.append)
    assert info2["cached"] and "loaded" in logs[-1]
    assert info2["test_top1"] == info["test_top1"]
    x = quality._to_unit(data[0][:32])
    assert torch.equal(net.features(x), again.features(x))

    monkeypatch.undo()
    load_or_train_feature_net(*halves(128, seed=2), 2, tmp_path, epochs=1, log=logs.append)
    assert "training" in logs[-1]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.endswith(".json")]) == 2
    assert len([n for n in names if n.endswith(".safetensors")]) == 2
    assert not [n for n in names if n.endswith(".tmp")]


def test_damaged_cache_is_retrained(tmp_path):
    data = halves(64, seed=0)
    load_or_train_feature_net(*data, 2, tmp_path, epochs=1, log=lambda _: None)
    next(tmp_path.glob("*.safetensors")).write_bytes(b"not a tensor file")
    logs: list[str] = []
    _, info = load_or_train_feature_net(*data, 2, tmp_path, epochs=1, log=logs.append)
    assert not info["cached"] and "ignoring" in logs[0]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPROG_CACHE", str(tmp_path))
    assert quality.default_cache_dir() == tmp_path
    monkeypatch.delenv("AUTOPROG_CACHE")
    assert quality.default_cache_dir().parts[-2:] == (".cache", "autoprog")


def test_torchmetrics_probes_classifier_features(net):
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(net), input_img_size=(1, SIZE, SIZE))
    real, _ = halves(64, seed=3)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-3


def test_classifier_features_reject_wrong_shapes(net):
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*\(4, 3, 16, 16\)"):
        ClassifierFeatures(net)(torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ClassifierFeatures(net)(torch.zeros(4, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        ClassifierFeatures(net, image_size=(SIZE, SIZE))(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))


class CountingFeatures(ClassifierFeatures):
    seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


def test_fd_and_kid_order_and_real_stats_once(net):
    real, _ = halves(300, seed=4)
    same_dist, _ = halves(300, seed=5)
    one_class, _ = halves(300, seed=6, classes=(1,))
    feature = CountingFeatures(net)
    ev = QualityEvaluator(feature, real, (1, SIZE, SIZE), kid_subset_size=100, batch_size=128)
    seen_after_real = feature.seen

    itself = ev.evaluate(real)
    close = ev.evaluate(same_dist)
    far = ev.evaluate(one_class)
    assert feature.seen == seen_after_real + 3 * 300  # the real set went through the net once
    assert itself["metric"] == "FD (classifier features)"
    assert itself["num_real"] == 300 and far["num_fake"] == 300

    scale = far["fd"]
    assert abs(itself["fd"]) < 1e-3 * scale
    assert close["fd"] < 0.1 * scale
    assert abs(itself["kid"]) < 0.1 * far["kid"]
    assert close["kid"] < 0.1 * far["kid"]

    fresh = QualityEvaluator(ClassifierFeatures(net), real, (1, SIZE, SIZE), batch_size=128).evaluate(
        same_dist
    )
    assert fresh["fd"] == pytest.approx(close["fd"], rel=1e-5, abs=1e-6)
    assert fresh["kid"] == pytest.approx(close["kid"], rel=1e-5, abs=1e-9)


def test_kid_subset_shrinks_to_the_sample_count(net):
    real, _ = halves(40, seed=4)
    fake, _ = halves(10, seed=5)
    out = QualityEvaluator(ClassifierFeatures(net), real, (1, SIZE, SIZE), kid_subset_size=100).evaluate(fake)
    assert out["num_fake"] == 10 and out["kid_std"] >= 0
    with pytest.raises(ValueError, match="generated images"):
        QualityEvaluator(ClassifierFeatures(net), real, (1, SIZE, SIZE)).evaluate(real[:, :, :8, :8])


def test_to_uint8_and_save_grid(tmp_path):
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
    images = torch.rand(6, 1, SIZE, SIZE) * 2 - 1
    save_grid(images, tmp_path / "a" / "b" / "grid.png", nrow=3)
    cell = -(-96 // SIZE) * SIZE  # enlarged by a whole factor to at least 96 px, 4 px apart
    with Image.open(tmp_path / "a" / "b" / "grid.png") as im:
        assert im.size == (3 * (cell + 4) + 4, 2 * (cell + 4) + 4) and im.mode == "RGB"
    rgb = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    save_grid(rgb, tmp_path / "rgb.png", nrow=4)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.size == (4 * 100 + 4, 104)
        assert im.getpixel((4, 4)) == im.getpixel((4 + 11, 4 + 11)) == tuple(rgb[0, :, 0, 0].tolist()), \
            "nearest: each pixel a 12x12 block"


def test_grids_are_labelled_and_titled(tmp_path):
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    plain = save_grid(images, tmp_path / "p.png", nrow=2)
    labelled = save_grid(images, tmp_path / "l.png", nrow=2, labels=["sandal", "a photo of a bag"],
                         title="prog · step 8 · stage 2/4")
    assert labelled.size[0] > plain.size[0] and labelled.size[1] == plain.size[1] + 24
    dark = [x for x in range(labelled.size[0] - plain.size[0]) if labelled.getpixel((x, 24 + 50))[0] < 128]
    assert dark, "the first row's label is drawn left of the images"
    assert any(labelled.getpixel((x, 10))[0] < 128 for x in range(200)), "the title is drawn on top"


def test_inception_evaluator_errors(tmp_path, monkeypatch):
    real, _ = halves(8, seed=0)
    with pytest.raises(ConfigError, match="no such file"):
        inception_evaluator(tmp_path / "missing.pth", real)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    if quality._has_torch_fidelity():
        with pytest.raises(ConfigError, match="cannot load Inception weights") as err:
            inception_evaluator(bad, real)
        assert "\n" not in str(err.value)
    monkeypatch.setattr(quality, "_has_torch_fidelity", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install autoprog\[fid\]"):
        inception_evaluator(bad, real)
