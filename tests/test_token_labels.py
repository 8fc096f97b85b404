"""Token labeling with MixToken (the paper's VOLO recipe): score maps, their geometry, targets, MixToken, the loss,
and runs from the command line."""

import json
import random

import numpy as np
import pytest
import torch

from autoprog.classification import token_labels as tl
from autoprog.errors import ConfigError, DataError

C = 3  # classes of the synthetic folders


def _map(top: torch.Tensor, second: torch.Tensor | None = None, logit: float = 8.0) -> torch.Tensor:
    """A [2, 2, H, W] score map: class ``top`` (H, W ints) with ``logit``, the next class with 0."""
    second = (top + 1) % C if second is None else second
    values = torch.stack([torch.full(top.shape, logit), torch.zeros(top.shape)])
    return torch.stack([values, torch.stack([top, second]).float()]).half()


def write_token_folder(root, maps_root, per_class=6, val=2, size=(40, 36), map_side=4, seed=0):
    """An ImageFolder (classes c0..c2, a bright bar per class) and a score map per training image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(C):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((*size, 3)) * 80).astype(np.uint8)
                a[4 + 8 * c:12 + 8 * c, 6:30] = 255
                Image.fromarray(a).save(d / f"img{i}.x.png")  # a name with two dots: the map is img{i}.pt
                if split == "train":
                    top = torch.from_numpy(rng.integers(0, C, (map_side, map_side)))
                    (maps_root / f"c{c}").mkdir(parents=True, exist_ok=True)
                    torch.save(_map(top), maps_root / f"c{c}" / f"img{i}.pt")
    return root


@pytest.fixture
def token_folder(tmp_path):
    return write_token_folder(tmp_path / "data", tmp_path / "maps"), tmp_path / "maps"


# ------------------------------------------------------------------------------------------ files
def test_score_maps_are_found_by_image_name_and_checked_in_one_line(tmp_path):
    assert tl.score_map_path(tmp_path, "/d/train/n01/n01_1.JPEG") == tmp_path / "n01" / "n01_1.pt"
    ok = _map(torch.zeros(3, 3, dtype=torch.long))
    bad = {"missing": None, "shape": torch.zeros(5, 3, 3), "ints": ok.long(), "nan": ok.clone(),
           "index": ok.clone(), "fraction": ok.clone(), "other": ok[:, :, :2], "junk": b"not a tensor"}
    bad["nan"][0, 0, 0, 0] = float("nan")
    bad["index"][1, 0, 0, 0] = C
    bad["fraction"][1, 0, 0, 0] = 0.5
    torch.save(ok, tmp_path / "ok.pt")
    assert tl.load_score_map(tmp_path / "ok.pt", C).dtype == torch.float32
    for name, value in bad.items():
        path = tmp_path / f"{name}.pt"
        if name == "junk":
            path.write_bytes(value)
        elif value is not None:
            torch.save(value, path)
        with pytest.raises(DataError) as e:
            tl.load_score_map(path, C, shape=tuple(ok.shape))
        assert str(path) in str(e.value) and "\n" not in str(e.value), name


# ------------------------------------------------------------------------------- geometry (workers)
def _blob_image_and_map(width=64, height=64, cells=16):
    """A grey image with a white off-centre rectangle, and its exact map (``cells`` × ``cells``, square only for a
    square image): class 1 on the rectangle's cells."""
    from PIL import Image

    a = np.full((height, width, 3), 40, np.uint8)
    ch, cw = height // cells, width // cells
    a[2 * ch:6 * ch, 9 * cw:14 * cw] = 255
    top = torch.zeros(cells, cells, dtype=torch.long)
    top[2:6, 9:14] = 1
    return Image.fromarray(a), _map(top).float()


def _iou(img, label, cells=16) -> float:
    """Overlap of the image's rectangle and the map's class-1 cells, over the cells the map still covers (1 when the
    rectangle left both)."""
    a = torch.from_numpy(np.asarray(img)[..., 0].copy()).float()
    pool = (a.shape[0] // cells, a.shape[1] // cells)
    inside = label[0, 0] > 0  # cells moved in from outside have no logits
    blob = (torch.nn.functional.avg_pool2d(a[None, None], pool)[0, 0] > 128) & inside
    lab = (label[1, 0] == 1) & inside
    union = (blob | lab).sum().item()
    return 1.0 if union == 0 else (blob & lab).sum().item() / union


def _one_op(name):
    """timm's RandAugment with the single operation ``name`` at magnitude 9, always applied."""
    from timm.data.auto_augment import AugmentOp, RandAugment

    return RandAugment([AugmentOp(name, prob=1.0, magnitude=9, hparams={"img_mean": (40, 40, 40),
                                                                       "translate_pct": 0.45})], 1)


OPS = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width, height", [(64, 64), (96, 48)])
def test_corrected_geometry_moves_the_map_with_the_image(op, width, height):
    img, label = _blob_image_and_map(width, height)
    ra = tl.LabelRandAugment(_one_op(op), "corrected")
    for seed in range(4):  # both signs
        random.seed(seed)
        np.random.seed(seed)
        out_img, out_label = ra(img, label)
        moved = _iou(out_img, out_label)
        assert moved >= 0.8, (op, seed, moved)  # (a shift by a fraction of a cell blurs the edges)
        assert _iou(out_img, label) < moved - 0.15, "the operation moved the rectangle: the test can fail"


@pytest.mark.parametrize("op", OPS)
def test_corrected_geometry_is_pils_own_on_a_map_of_one_cell_per_pixel(op):
    """A 24 × 16 image whose grey levels name classes, moved by timm's operation with nearest-neighbour sampling,
    and its map with a cell per pixel moved by the corrected op: the same class at every place the image still
    covers (also a whole cell beyond the edge cells), empty where it is filled."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp, RandAugment

    rng = np.random.default_rng(0)
    classes = torch.from_numpy(rng.integers(1, 6, (16, 24)))
    img = Image.fromarray((classes.numpy() * 40).astype(np.uint8)).convert("RGB")
    label = _map(classes)
    ra = RandAugment([AugmentOp(op, prob=1.0, magnitude=9, hparams={"img_mean": (0, 0, 0), "translate_pct": 0.45,
                                                                   "interpolation": Image.NEAREST})], 1)
    for seed in range(4):
        random.seed(seed)
        np.random.seed(seed)
        out_img, out_label = tl.LabelRandAugment(ra, "corrected")(img, label.float())
        pixel = torch.from_numpy(np.asarray(out_img)[..., 0].copy()).long() // 40  # 0: filled
        covered = pixel > 0
        same = (out_label[1, 0].long() == pixel) | ~covered
        empty = (out_label[0, 0] == 0) == ~covered
        assert same.float().mean() >= 0.98 and empty.float().mean() >= 0.98, (op, seed)  # (ties at half a pixel)


def test_official_geometry_is_the_official_codes_cell_units_and_rotation_pivot():
    """Translations move the map alike in both modes (the official one empties sources within half a cell beyond
    the edge cells); shears and rotations work in cell units, a rotation turning about (H/2, W/2) in cell indices;
    on a non-square image the official map falls behind the image."""
    from scipy import ndimage

    img, label = _blob_image_and_map()
    for op in ("TranslateXRel", "TranslateYRel"):
        random.seed(1)
        a = tl.LabelRandAugment(_one_op(op), "official")(img, label)[1]
        random.seed(1)
        b = tl.LabelRandAugment(_one_op(op), "corrected")(img, label)[1]
        assert torch.equal(a[1], b[1]) and torch.equal(a[0][a[0] != 0], b[0][a[0] != 0])
        assert (a[0] == 0).sum() >= (b[0] == 0).sum()
    rotated = tl._rotate_label(label, 27.0)
    h = label.shape[2]
    theta = np.radians(27.0)
    c, s = np.cos(theta), np.sin(theta)
    centre = np.array([h / 2.0, h / 2.0])  # the official pivot, not (h - 1) / 2
    rot = np.array([[c, s], [-s, c]])
    offset = centre - rot @ centre
    expect = ndimage.affine_transform(label[1].numpy(), np.block([[np.eye(1), np.zeros((1, 2))],
                                                                   [np.zeros((2, 1)), rot]]),
                                      offset=[0, *offset], order=0, mode="nearest")
    assert np.array_equal(rotated[1].numpy(), expect)
    assert not torch.equal(rotated, tl.corrected_label_op(label, "Rotate", (27.0,), (64, 64)))
    for op in ("Rotate", "ShearY"):
        random.seed(0)
        out_img, out_label = tl.LabelRandAugment(_one_op(op), "official")(*_blob_image_and_map(96, 48))
        assert _iou(out_img, out_label) < 0.5, op


def test_the_folder_gives_image_map_and_crop_box_seeded_per_image(token_folder):
    from autoprog.data import EpochSampler, load_dataset

    data_dir, maps = token_folder
    bundle = tl.with_token_labels(load_dataset(str(data_dir), image_size=16), maps, "rand-m9-mstd0.5-inc1")
    assert tl.is_token_labelled(bundle)
    x, (y, label, box) = bundle.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and label.shape == (2, 2, 4, 4)
    assert label.dtype == torch.float32 and box.shape == (4,) and 0 < box[2] <= 1 and 0 < box[3] <= 1
    sampler = EpochSampler(len(bundle.train), seed=3, keyed=True)
    a = [b[1] for b in bundle.loader("train", 6, sampler=sampler, num_workers=0)]
    b = [b[1] for b in bundle.loader("train", 6, sampler=sampler, num_workers=2)]
    assert len(a) == 3 and all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q)), "workers alike"


def test_adareg_magnitude_reaches_the_label_aware_randaugment(token_folder):
    from autoprog.classification.adareg import AdaptiveRegularization
    from autoprog.data import load_dataset

    data_dir, maps = token_folder
    bundle = tl.with_token_labels(load_dataset(str(data_dir), image_size=16), maps, geometry="corrected")
    adareg = AdaptiveRegularization(_tiny_volo().growth_space(2, 0.5))
    ra = adareg.pil_randaugment(3)
    with_ra = bundle.with_worker_randaugment(ra)
    folder = with_ra.train
    assert isinstance(folder, tl.TokenLabelFolder) and folder.transform.randaugment.ops is ra.ops
    assert folder.transform.randaugment.geometry == folder.transform.geometry == "corrected"
    assert bundle.train.transform.randaugment is None, "the bundle given is left as it was"


# ----------------------------------------------------------------------------------- targets
def test_targets_cut_the_crop_box_from_the_map_official_transposed_and_corrected():
    """The map's top half is class 1, its bottom half class 0; the crop is the image's top half."""
    top = torch.zeros(4, 4, dtype=torch.long)
    top[:2] = 1
    maps = _map(top, logit=20.0)[None].repeat(2, 1, 1, 1, 1)
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2)  # (top, left, height, width)
    cls, tok = tl.token_label_targets(maps, box, C, label_size=2, smoothing=0.0, geometry="corrected")
    assert cls.shape == (2, C) and tok.shape == (2, 4, C)
    assert (tok.argmax(-1) == 1).all() and cls[0].argmax() == 1
    cls, tok = tl.token_label_targets(maps, box, C, label_size=2, smoothing=0.0, geometry="official")
    assert tok[0].argmax(-1).tolist() == [1, 1, 0, 0], "the official box is the map's left half: rows as x"
    smoothed, _ = tl.token_label_targets(maps, box, C, label_size=2, smoothing=0.1)
    assert torch.allclose(smoothed, cls * (1 - 0.1 + 0.1 / C) + 0.1 / C), "p · on + off, as the official code"


def test_the_loss_mixes_the_class_target_by_the_share_of_swapped_tokens():
    torch.manual_seed(0)
    cls_t = torch.softmax(torch.randn(4, C), 1)
    tok_t = torch.softmax(torch.randn(4, 9, C), 2)
    cls, tok = torch.randn(4, C), torch.randn(4, 9, C)
    plain = tl.token_label_loss(cls, tok, (0, 0, 0, 0), cls_t, tok_t)
    expect = tl.soft_cross_entropy(cls, cls_t) + 0.5 * tl.soft_cross_entropy(tok.reshape(-1, C), tok_t.reshape(-1, C))
    assert torch.allclose(plain, expect)
    lam = 1 - 4 / 9  # a 2 × 2 box of a 3 × 3 grid
    mixed = tl.token_label_loss(cls, tok, (0, 1, 2, 3), cls_t, tok_t, dense_weight=0.0)
    assert torch.allclose(mixed, tl.soft_cross_entropy(cls, lam * cls_t + (1 - lam) * cls_t.flip(0)))


# ----------------------------------------------------------------------------------- MixToken
def _tiny_volo():
    from timm.models.volo import VOLO

    from autoprog.adapters import elastic

    torch.manual_seed(0)
    return elastic(VOLO(layers=(2, 1, 2, 1), img_size=32, in_chans=3, num_classes=C, embed_dims=(16, 32, 32, 32),
                        num_heads=(1, 2, 2, 2), stem_hidden_dim=8))


def test_mix_token_swaps_a_box_of_tokens_and_the_outputs_come_back_unswapped():
    from autoprog.adapters.volo import mix_token_box, swap_box

    net = _tiny_volo().train()
    x = torch.randn(4, 3, 32, 32)
    np.random.seed(5)
    box = mix_token_box((4, 4), 2)
    np.random.seed(5)
    with net.token_labelled():
        cls, tokens, got = net(x)
    assert got == box and cls.shape == (4, C) and tokens.shape == (4, net.token_grid() ** 2, C)
    assert not net.token_labelling, "only within the context"
    grid = torch.arange(2 * 4 * 4).view(2, 4, 4)
    assert torch.equal(swap_box(swap_box(grid, (0, 1, 1, 2)), (0, 1, 1, 2)), grid)
    assert torch.equal(swap_box(grid, (0, 1, 1, 2), scale=2)[0, :2, 2:4], grid[1, :2, 2:4])
    net.eval()
    with net.token_labelled():
        assert torch.equal(net(x), net.model(x)), "evaluation: timm's VOLO output (class + 0.5 × max token)"
    per_place = net.token_logits(x)  # a teacher's: the auxiliary head on each coarse token
    assert per_place.shape == (4, 2, 2, C)
    import autoprog.adapters.volo as volo

    real, volo.mix_token_box = volo.mix_token_box, lambda fine, pooling: (0, 0, 0, 0)
    try:
        net.train()
        for m in net.modules():  # the stem's batch norms as in evaluation: the outputs must compare
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        with net.token_labelled():
            cls, tokens, _ = net(x)  # nothing swapped: the class token's own logits and the tokens' in grid order
    finally:
        volo.mix_token_box = real
        net.eval()
    assert torch.allclose(tokens, per_place.flatten(1, 2), atol=1e-5)
    assert torch.allclose(net(x), cls + 0.5 * tokens.max(1).values, atol=1e-5), "timm's: class + 0.5 × max token"
    boxes = set()
    for seed in range(30):
        np.random.seed(seed)
        r0, c0, r1, c1 = mix_token_box((28, 28), 2)
        assert 0 <= r0 <= r1 <= 14 and 0 <= c0 <= c1 <= 14
        boxes.add((r0, c0, r1, c1))
    assert len(boxes) > 20


# ---------------------------------------------------------------------------------- command line
def _args(data_dir, maps, *extra):
    return ["--model", "timm:volo_d1_224", "--img-size", "32", "--dataset", str(data_dir), "--token-labels",
            str(maps), "--batch-size", "6", "--eval-samples", "0", "--no-flops", "--cpu", "--workers", "0", "--subset",
            "0", *extra]


def test_token_labeling_trains_volo_from_the_command_line_and_resumes_identically(cli, token_folder, tmp_path):
    from conftest import resumes_like_uninterrupted

    data_dir, maps = token_folder
    args = _args(data_dir, maps, "--method", "prog", "--epochs", "2", "--randaugment", "rand-m9-mstd0.5-inc1")
    resumes_like_uninterrupted(cli, tmp_path, args, step=4)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["train"]["token_labels"] == str(maps) and cfg["train"]["dense_weight"] == 0.5


def test_token_labels_refuse_what_they_cannot_train_in_one_line(cli, token_folder, fake_fmnist, tmp_path):
    data_dir, maps = token_folder
    cases = {
        "in memory": (["--model", "timm:volo_d1_224", "--img-size", "32", "--data-root", str(fake_fmnist),
                       "--token-labels", str(maps), "--subset", "0"], "ImageFolder"),
        "a ViT": (["--dataset", str(data_dir), "--token-labels", str(maps), "--img-size", "32", "--subset", "0"], "VOLO"),
        "mixup": (_args(data_dir, maps, "--mixup", "0.8"), "Mixup"),
        "no folder": (_args(data_dir, tmp_path / "none"), "not a directory"),
        "geometry": (_args(data_dir, maps, "--token-label-geometry", "exact"), "geometry"),
    }
    for name, (args, words) in cases.items():
        rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / name, *args)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (name, err)
    (maps / "c2" / "img4.pt").rename(maps / "img4.pt")
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "lack",
                     *_args(data_dir, maps))
    assert rc != 0 and "1 of 18" in err and "c2/img4.pt" in err and len(err.strip().splitlines()) == 1, err
    (maps / "img4.pt").rename(maps / "c2" / "img4.pt")
    wrong = maps / "c1" / "img3.pt"
    torch.save(_map(torch.full((4, 4), 7)), wrong)  # class 7 of 3
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "bad",
                     *_args(data_dir, maps))
    assert rc != 0 and str(wrong) in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", maps / "run", *_args(data_dir, maps))
    assert rc == 2 and "--token-labels" in err, "the run's folder must not be inside the maps"


def test_a_token_labeling_run_without_its_maps_in_the_data_is_refused():
    from autoprog.classification.trainer import TrainConfig

    with pytest.raises(ConfigError, match="score maps"):
        from autoprog.classification.trainer import Trainer
        from autoprog.data import load_digits

        Trainer(_tiny_volo(), None, None, load_digits(), TrainConfig(token_labels="x"), "/tmp/unused")


# ------------------------------------------------------------------------------ generating score maps
def test_a_trained_teacher_writes_score_maps_that_train_a_volo(cli, token_folder, fake_fmnist, tmp_path):
    """``autoprog token-labels``: a ViT teacher's head on each patch token, top k per place, in the format read;
    maps already there are kept; a teacher of other classes or channels is refused in one line."""
    from autoprog.classification.score_maps import load_teacher
    from autoprog.data import load_dataset

    data_dir, _ = token_folder
    teacher_run, maps = tmp_path / "teacher", tmp_path / "made"
    rc, _, err = cli("pretrain", "--method", "original", "--dataset", data_dir, "--img-size", "16", "--patch-size", "4",
                     "--embed-dim", "16", "--depth", "2", "--num-heads", "2", "--subset", "0", "--batch-size", "6",
                     "--epochs", "1", "--eval-samples", "0", "--no-flops", "--workers", "0", "--cpu", "--out",
                     teacher_run)
    assert rc == 0, err
    assert json.loads((teacher_run / "model" / "config.json").read_text())["classes"] == ["c0", "c1", "c2"]
    rc, out, err = cli("token-labels", "--teacher", teacher_run, "--dataset", data_dir, "--out", maps, "--top-k", "2",
                       "--cpu", "--workers", "0")
    assert rc == 0 and "wrote 18 score maps of 4 x 4 places" in out, err
    m = torch.load(maps / "c1" / "img2.pt")
    assert m.shape == (2, 2, 4, 4) and m.dtype == torch.float16
    teacher = load_teacher(teacher_run)
    from torchvision.transforms import functional as TF

    from autoprog.data import read_image

    img = TF.pil_to_tensor(TF.resize(read_image(data_dir / "train" / "c1" / "img2.x.png"), [16, 16], antialias=True))
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    with torch.no_grad():
        logits = teacher.token_logits(((img.float() / 255 - mean) / std)[None])[0]
    assert torch.equal(m[1, 0].long(), logits.argmax(-1)), "the top class at each place is the teacher's"
    assert torch.allclose(m[0, 0].float(), logits.max(-1).values, atol=1e-2)
    bundle = tl.with_token_labels(load_dataset(str(data_dir), image_size=16), maps)
    assert bundle.train[5][1][1].shape == (2, 2, 4, 4)
    (maps / "c0" / "img1.pt").unlink()
    before = (maps / "c2" / "img0.pt").stat().st_mtime_ns
    rc, out, err = cli("token-labels", "--teacher", teacher_run, "--dataset", data_dir, "--out", maps, "--cpu",
                       "--workers", "0", "--top-k", "2")
    assert rc == 0 and "wrote 1 score maps" in out and "17 already there" in out, err
    assert (maps / "c0" / "img1.pt").is_file() and (maps / "c2" / "img0.pt").stat().st_mtime_ns == before
    rc, _, err = cli("pretrain", "--method", "original", "--data-root", fake_fmnist, "--img-size", "16", "--subset",
                     "64", "--epochs", "1", "--batch-size", "32", "--embed-dim", "16", "--depth", "2", "--num-heads",
                     "2", "--patch-size", "4", "--eval-samples", "0", "--no-flops", "--cpu", "--out", tmp_path / "grey")
    assert rc == 0, err
    rc, _, err = cli("token-labels", "--teacher", tmp_path / "grey", "--dataset", data_dir, "--out", tmp_path / "g")
    assert rc == 2 and "1-channel" in err and len(err.strip().splitlines()) == 1, err
    other = tmp_path / "two"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (other / split / c).mkdir(parents=True)
            (other / split / c / "0.png").write_bytes((data_dir / "train" / "c0" / "img0.x.png").read_bytes())
    rc, _, err = cli("token-labels", "--teacher", teacher_run, "--dataset", other, "--out", tmp_path / "o")
    assert rc == 2 and "3 classes" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli("token-labels", "--teacher", teacher_run, "--dataset", data_dir, "--out",
                     data_dir / "train" / "maps")
    assert rc == 2 and "inside the dataset's train/" in err and len(err.strip().splitlines()) == 1, err


def test_a_vit_teachers_token_logits_are_its_head_on_each_patch_token_in_grid_order():
    from conftest import tiny_vit

    net = tiny_vit(img_size=16, patch_size=4, in_chans=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = net.token_logits(x)
        patches = net.model.forward_features(x)[:, 1:]  # the model's own order: rows of patches, row-major
        expect = net.model.head(patches).reshape(2, 4, 4, -1)
    assert torch.allclose(got, expect, atol=1e-6)


def test_two_images_of_one_map_name_and_maps_made_otherwise_are_refused(cli, token_folder, tmp_path):
    data_dir, maps = token_folder
    img = data_dir / "train" / "c0" / "img0.x.png"
    (data_dir / "train" / "c0" / "img0.y.png").write_bytes(img.read_bytes())
    with pytest.raises(DataError, match="would share the score map"):
        tl.missing_score_maps(maps, [img, data_dir / "train" / "c0" / "img0.y.png"])
    (data_dir / "train" / "c0" / "img0.y.png").unlink()
    teacher_run = tmp_path / "teacher"
    rc, _, err = cli("pretrain", "--method", "original", "--dataset", data_dir, "--img-size", "16", "--patch-size", "4",
                     "--embed-dim", "16", "--depth", "2", "--num-heads", "2", "--subset", "0", "--batch-size", "6",
                     "--epochs", "1", "--eval-samples", "0", "--no-flops", "--workers", "0", "--cpu", "--out",
                     teacher_run)
    assert rc == 0, err
    made = tmp_path / "made"
    args = ["token-labels", "--teacher", teacher_run, "--dataset", data_dir, "--out", made, "--cpu", "--workers", "0"]
    rc, _, err = cli(*args, "--top-k", "2")
    assert rc == 0, err
    (made / "c0" / "img1.pt").unlink()
    rc, _, err = cli(*args, "--top-k", "3")
    assert rc == 2 and "made otherwise" in err and "top_k: 2 there, 3 now" in err, err
    rc, out, err = cli(*args[:2], teacher_run / "model", *args[3:], "--top-k", "2")  # the same teacher, named otherwise
    assert rc == 0 and "wrote 1 score maps" in out, err
    rc, _, err = cli(*args, "--top-k", "2", "--out", maps)  # maps of unknown making
    assert rc == 2 and "unknown making" in err, err


def test_a_searchs_step_time_runs_the_token_labelled_step(token_folder, tmp_path, monkeypatch):
    """The step timer times what a token-labelled training step does (targets from score maps, MixToken, the
    tokens' loss), not a plain class-label step, and gives MixToken's numpy draws back."""
    from autoprog.classification import token_labels, trainer
    from autoprog.classification.trainer import TrainConfig, Trainer
    from autoprog.data import load_dataset
    from autoprog.schedules import build_schedule

    data_dir, maps = token_folder
    net = _tiny_volo()
    data = token_labels.with_token_labels(load_dataset(str(data_dir), image_size=32), maps)
    cfg = TrainConfig(token_labels=str(maps), batch_size=4, epochs=1, count_flops=False, num_workers=0)
    run = Trainer(net, build_schedule("original", net.growth_space(2, 0.5)), None, data, cfg, tmp_path / "r")
    monkeypatch.setattr(Trainer, "_training_module", lambda self: pytest.fail("timed through DDP's wrapper"))
    calls = []
    real = trainer.token_label_targets
    monkeypatch.setattr(trainer, "token_label_targets", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    assert run._timed(net.full_subnet, repeats=1) > 0
    assert calls and calls[0] == (4, 2, 2, 4, 4), "score maps of the data's shape, a batch of them"
    np.random.seed(3)
    expected = np.random.rand()
    np.random.seed(3)
    run._timed(net.full_subnet, repeats=1)
    assert np.random.rand() == expected, "MixToken's draws while timing are given back"


def test_teachers_and_maps_of_other_class_names_are_refused(token_folder, tmp_path):
    """A run's model folder records its data's class names; a teacher naming other classes (or the same in
    another order) than the data it labels is refused, and so are maps whose manifest names other classes than the
    data a student trains on: a class count alone would let a teacher of other data through."""
    import shutil

    from conftest import tiny_vit

    from autoprog.adapters.factory import ModelOverrides
    from autoprog.classification.pretrained import build_args_of, save_classifier
    from autoprog.classification.score_maps import generate_score_maps, load_teacher
    from autoprog.data import load_dataset

    data_dir, _ = token_folder
    net = tiny_vit(img_size=16, patch_size=4, in_chans=3, num_classes=C)
    args = build_args_of("vit", ModelOverrides(), net)
    save_classifier(net, tmp_path / "swapped", args, extra={"classes": ["c0", "c2", "c1"]})
    with pytest.raises(ConfigError, match="teacher's class 1 is 'c2'"):
        generate_score_maps(load_teacher(tmp_path / "swapped"), data_dir, tmp_path / "m0", progress=lambda s: None)
    save_classifier(net, tmp_path / "right", args, extra={"classes": ["c0", "c1", "c2"]})
    maps = tmp_path / "m1"
    generate_score_maps(load_teacher(tmp_path / "right"), data_dir, maps, progress=lambda s: None)
    assert json.loads((maps / tl.MANIFEST).read_text())["classes"] == ["c0", "c1", "c2"]
    tl.with_token_labels(load_dataset(str(data_dir), image_size=16), maps)  # the same classes: accepted
    renamed = tmp_path / "renamed"
    shutil.copytree(data_dir, renamed)
    for split in ("train", "val"):
        (renamed / split / "c2").rename(renamed / split / "c9")
    shutil.copytree(maps / "c2", maps / "c9")
    with pytest.raises(DataError, match="number 2 is 'c2', the data's is 'c9'"):
        tl.with_token_labels(load_dataset(str(renamed), image_size=16), maps)


def test_the_ground_truth_variant_mixes_the_true_class_as_the_official_loss(cli, token_folder, tmp_path):
    """``--token-label-ground-truth`` (the official ``--ground-truth``): the class token's target becomes the
    teacher's × 0.5 + the smoothed true label × 0.5 where the teacher's top class is the true one, × 0.9 + × 0.1
    where it is not; a run trains with it, and it is refused without token labels."""
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    got = tl.with_ground_truth(teacher, torch.tensor([0, 2]), smoothing=0.3)
    truth = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    assert torch.allclose(got[0], 0.5 * teacher[0] + 0.5 * truth[0])
    assert torch.allclose(got[1], 0.9 * teacher[1] + 0.1 * truth[1])
    assert torch.allclose(got.sum(1), torch.ones(2))
    data_dir, maps = token_folder
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "gt",
                     *_args(data_dir, maps, "--token-label-ground-truth"))
    assert rc == 0, err
    assert json.loads((tmp_path / "gt" / "config.json").read_text())["train"]["token_label_ground_truth"] is True
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "no",
                     "--token-label-ground-truth", "--subset", "64", "--cpu")
    assert rc == 2 and "needs --token-labels" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("op", OPS)
def test_a_centre_square_map_moves_with_its_part_of_a_wide_image(op):
    """``--token-label-map-frame centre-square`` (the official ImageNet maps cover each image's central square):
    on a 96 × 48 image whose map covers pixels 24-72 across, the corrected operations move the map as the square
    of the image moves; taking the map as covering the whole image does not."""
    from PIL import Image

    a = np.full((48, 96, 3), 40, np.uint8)
    a[18:30, 24 + 27:24 + 42] = 255  # the rectangle at cells 6-10 x 9-14 of the square's 16 x 16 (3 px a cell)
    top = torch.zeros(16, 16, dtype=torch.long)
    top[6:10, 9:14] = 1
    img, label = Image.fromarray(a), _map(top).float()
    square = lambda im: im.crop((24, 0, 72, 48))  # noqa: E731
    framed = tl.LabelRandAugment(_one_op(op), "corrected", "centre-square")
    whole = tl.LabelRandAugment(_one_op(op), "corrected")
    for seed in range(4):
        random.seed(seed)
        np.random.seed(seed)
        out_img, out_label = framed(img, label)
        moved = _iou(square(out_img), out_label)
        assert moved >= 0.8, (op, seed, moved)
        assert _iou(square(out_img), label) < moved - 0.15, "the operation moved the rectangle: the test can fail"
        if op in ("Rotate", "ShearY", "TranslateXRel"):  # those that move a square's contents unlike the whole's
            random.seed(seed)
            np.random.seed(seed)
            assert _iou(square(out_img), whole(img, label)[1]) < moved - 0.15, (op, seed)


def test_a_centre_square_maps_crop_box_is_in_the_squares_frame(token_folder, tmp_path, monkeypatch):
    """The crop's box as fractions of the square a centre-square map covers (it may reach beyond it); the
    option is refused with the official geometry and for maps autoprog wrote (they cover the whole image)."""
    from PIL import Image

    from autoprog.data import load_dataset

    crop = load_dataset(str(token_folder[0]), image_size=16).worker_crop
    monkeypatch.setattr(type(crop), "get_params", staticmethod(lambda img, scale, ratio: (0, 24, 48, 48)))
    img = Image.new("RGB", (96, 48))
    label = _map(torch.zeros(4, 4, dtype=torch.long)).float()
    torch.manual_seed(0)
    _, _, framed = tl.TokenLabelTransform(crop, None, "corrected", "centre-square")(img, label)
    torch.manual_seed(0)
    _, _, whole = tl.TokenLabelTransform(crop, None, "corrected")(img, label)
    assert framed.tolist() == [0.0, 0.0, 1.0, 1.0] and whole.tolist() == [0.0, 0.25, 1.0, 0.5]
    data_dir, maps = token_folder
    bundle = load_dataset(str(data_dir), image_size=16)
    with pytest.raises(ConfigError, match="needs --token-label-geometry corrected"):
        tl.with_token_labels(bundle, maps, frame="centre-square")
    tl.with_token_labels(bundle, maps, geometry="corrected", frame="centre-square")
    (maps / tl.MANIFEST).write_text(json.dumps({"top_k": 2}))
    with pytest.raises(ConfigError, match="cover the whole image"):
        tl.with_token_labels(bundle, maps, geometry="corrected", frame="centre-square")


def test_what_a_centre_square_map_does_not_cover_is_not_trained_towards_a_guess(cli, token_folder, tmp_path):
    """A crop reaching beyond a centre-square map: the tokens whose centres lie outside it are left out of the
    tokens' loss (not trained towards the uniform target that an empty place gives), and the class token's target
    comes from the part of the box on the map; a run trains with the option, which needs token labels."""
    mask = tl.tokens_inside(torch.tensor([[0.0, -0.5, 1.0, 2.0]]), 4)
    assert mask.view(4, 4).tolist() == [[0.0, 1.0, 1.0, 0.0]] * 4
    top = torch.zeros(4, 4, dtype=torch.long)
    top[:, 2:] = 2
    maps = _map(top).float()[None]
    beyond, _ = tl.token_label_targets(maps, torch.tensor([[0.0, 0.25, 1.0, 1.5]]), C, 2, 0.0, "corrected")
    on_map, _ = tl.token_label_targets(maps, torch.tensor([[0.0, 0.25, 1.0, 0.75]]), C, 2, 0.0, "corrected")
    assert torch.allclose(beyond, on_map), "the class token's target from the box's part on the map"
    logits, target = torch.randn(2, 4, C), torch.softmax(torch.randn(2, 4, C), -1)
    cls = torch.randn(2, C)
    plain = tl.token_label_loss(cls, logits, (0, 0, 0, 0), target[:, 0], target)
    assert torch.allclose(plain, tl.token_label_loss(cls, logits, (0, 0, 0, 0), target[:, 0], target,
                                                     token_weights=torch.ones(2, 4)))
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    kept = tl.token_label_loss(cls, logits, (0, 0, 0, 0), target[:, 0], target, dense_weight=1.0, cls_weight=0.0,
                               token_weights=w)
    expect = tl.soft_cross_entropy(logits[w.bool()], target[w.bool()])
    assert torch.allclose(kept, expect)
    data_dir, maps_dir = token_folder  # 40 x 36 images: the square is 36 x 36
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "sq",
                     *_args(data_dir, maps_dir, "--token-label-geometry", "corrected", "--token-label-map-frame",
                            "centre-square"))
    assert rc == 0, err
    rc, _, err = cli("pretrain", "--method", "original", "--epochs", "1", "--out", tmp_path / "no",
                     "--token-label-map-frame", "centre-square", "--subset", "64", "--cpu")
    assert rc == 2 and "needs --token-labels" in err and len(err.strip().splitlines()) == 1, err


def test_token_labeling_settings_without_maps_are_warned_about(capsys):
    """--dense-weight and --token-label-geometry shape token labeling only: given without --token-labels they are
    unread, which a warning says (configs saved with them still run)."""
    from autoprog.classification.trainer import TrainConfig

    TrainConfig(dense_weight=1.0, token_label_geometry="corrected").validate()
    err = capsys.readouterr().err
    assert "--dense-weight and --token-label-geometry set without --token-labels" in err
    TrainConfig().validate()
    assert "token" not in capsys.readouterr().err


def test_score_maps_are_never_written_into_the_dataset_or_its_own_folder(tmp_path):
    from autoprog.classification.score_maps import check_maps_out
    from autoprog.errors import ConfigError

    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is the dataset's own folder"):
        check_maps_out(root, root)
    with pytest.raises(ConfigError, match="lies inside the dataset's train/ split"):
        check_maps_out(root, root / "train" / "maps")
    assert check_maps_out(root, root / "token-labels") == (root / "train", root / "val")
