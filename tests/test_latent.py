"""LatentCodec: a tiny diffusers AutoencoderKL saved to disk, encoded to and decoded from scaled latents."""

from __future__ import annotations

import json

import pytest
import torch

from autoprog.diffusion.latent import LatentCodec
from autoprog.errors import ConfigError

diffusers = pytest.importorskip("diffusers")


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir):
    return LatentCodec.from_pretrained(vae_dir)


def images(n=3, c=3, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=gen, dtype=torch.uint8)


def test_from_pretrained_properties(codec, vae_dir):
    assert codec.path == str(vae_dir)
    assert codec.latent_channels == 4 and codec.downsample == 2
    assert codec.scaling_factor == pytest.approx(codec.vae.config.scaling_factor)
    assert codec.latent_size(16) == 8 and codec.latent_size(32) == 16
    assert not codec.vae.training
    assert not any(p.requires_grad for p in codec.vae.parameters())
    assert codec.describe()["path"] == str(vae_dir)
    with pytest.raises(ConfigError, match="multiple of the VAE's downsampling factor 2"):
        codec.latent_size(15)


def test_from_pretrained_errors(tmp_path, vae_dir):
    def err(path) -> str:
        with pytest.raises(ConfigError) as e:
            LatentCodec.from_pretrained(path)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "does not exist" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "config.json is missing" in err(tmp_path / "empty")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 16}))
    assert "holds a UNet2DModel, not an AutoencoderKL" in err(other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((vae_dir / "config.json").read_text())  # weights missing
    assert "cannot load the AutoencoderKL" in err(broken)
    (broken / "config.json").write_text("{not json")
    assert "is not valid JSON" in err(broken)


def test_pipeline_dir_with_vae_subfolder(tmp_path, vae_dir):
    import shutil

    shutil.copytree(vae_dir, tmp_path / "vae")
    assert LatentCodec.from_pretrained(tmp_path).path == str(tmp_path / "vae")


def test_encode_matches_vae_and_is_deterministic(codec):
    x = images(5)
    z = codec.encode(x, batch_size=2)
    assert z.shape == (5, 4, 8, 8) and z.dtype == torch.float32 and z.device.type == "cpu"
    with torch.no_grad():
        ref = codec.vae.encode(x.float() / 127.5 - 1).latent_dist.mean * codec.scaling_factor
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codec.encode(x, batch_size=5), z, atol=1e-5, rtol=1e-4)
    assert torch.equal(codec.encode(x, batch_size=2), z)
    calls = []
    codec.encode(x, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_sample_posterior_is_seeded(codec):
    sampler = LatentCodec(codec.vae, sample_posterior=True, seed=3)
    x = images(2)
    a, b = sampler.encode(x), sampler.encode(x)
    assert torch.equal(a, b) and not torch.allclose(a, codec.encode(x))


def test_roundtrip_rgb_and_grey(codec):
    x = images(3)
    out = codec.decode(codec.encode(x), batch_size=2)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1

    grey = images(2, c=1)
    z = codec.encode(grey)
    torch.testing.assert_close(z, LatentCodec(codec.vae).encode(grey.repeat(1, 3, 1, 1)))
    out = codec.decode(z)  # remembers the grey images from encode
    assert out.shape == (2, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert codec.decode(z * 1e3).abs().max() <= 1  # clamped
    assert codec.decode(z, out_channels=3).shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="channels"):
        codec.encode(images(1, c=2))
    with pytest.raises(ConfigError, match="uint8"):
        codec.encode(images(1).float())
    with pytest.raises(ConfigError, match="multiple"):
        codec.encode(images(1, size=15))


def test_encode_cached(tmp_path, vae_dir, monkeypatch):
    codec = LatentCodec.from_pretrained(vae_dir)
    calls = []
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    x = images(3, c=1)
    cache = tmp_path / "cache"
    z1 = codec.encode_cached(x, cache)
    files = sorted(cache.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".safetensors"

    fresh = LatentCodec.from_pretrained(vae_dir)  # same VAE, new object: same key, loaded, remembers grey
    fresh.encode = lambda *a, **k: pytest.fail("encoded again")
    z2 = fresh.encode_cached(x, cache)
    assert torch.equal(z1, z2) and fresh.image_channels == 1
    assert fresh.decode(z2).shape == (3, 1, 16, 16)

    codec.encode_cached(images(3, c=1, seed=1), cache)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    files[0].write_bytes(b"garbage")  # a damaged entry is re-encoded and replaced
    torch.testing.assert_close(codec.encode_cached(x, cache), z1)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("posterior", [False, True])
def test_shares_of_the_encoding_are_the_rows_of_encoding_them_all(vae_dir, posterior):
    """Each process's share is whole batches, in order, and its latents are those that one process encoding
    every row gets (the same batches; under ``sample_posterior`` the same draws), empty shares included."""
    from autoprog.diffusion.latent import shard_rows

    codec = LatentCodec.from_pretrained(vae_dir, sample_posterior=posterior, seed=3)
    x = images(n=7)
    alone = codec.encode(x, batch_size=2)
    for world in (2, 3, 5):
        bounds = [shard_rows(7, 2, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 7 and all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
        assert all(lo % 2 == 0 for lo, _ in bounds)  # whole batches
        parts = [codec.encode(x, batch_size=2, shard=(r, world)) for r in range(world)]
        assert [len(p) for p in parts] == [hi - lo for lo, hi in bounds]
        assert torch.equal(torch.cat(parts), alone)


LATENT_DRIVER = '''
import json
import sys

import torch
from accelerate import Accelerator

from autoprog.accelerator import end_processes, leave_process
from autoprog.diffusion.latent import LatentCodec

vae_dir, cache, out = sys.argv[1:4]
acc = Accelerator(cpu=True)
encoded = []
real = LatentCodec.encode


def counting(self, x, *a, **k):
    z = real(self, x, *a, **k)
    encoded.append(len(z))
    return z


LatentCodec.encode = counting
x = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
codec = LatentCodec.from_pretrained(vae_dir)
first = codec.encode_cached(x, cache, batch_size=2, accelerator=acc)
again = codec.encode_cached(x, cache, batch_size=2, accelerator=acc)  # the main process's cache, read by all
alone = real(codec, x, batch_size=2)
with open(f"{out}/rank{acc.process_index}.json", "w") as f:
    json.dump({"encoded": encoded, "first": torch.equal(first, alone), "again": torch.equal(again, alone)}, f)
end_processes(acc)
leave_process(0)  # skipping the interpreter's shutdown, as autoprog's CLI does
'''


def test_two_processes_encode_a_share_each_and_both_get_every_latent(vae_dir, tmp_path):
    """Under two processes neither encodes the whole set while the other waits (a large set through a large VAE
    could outlast the 30-minute collective timeout): each encodes its share of the batches (4 and 5 of 9 rows),
    both get all the latents, equal to one process's, and the next call reads the main process's cache (no
    encoding at all)."""
    import sys

    from test_distributed import _torchrun

    driver = tmp_path / "latent_driver.py"
    driver.write_text(LATENT_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(vae_dir), str(tmp_path / "cache"), str(tmp_path)]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=tmp_path / "scratch")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["encoded"] for r in ranks] == [[4], [5]]
    assert all(r["first"] and r["again"] for r in ranks)
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 1


def test_a_latent_space_run_can_drop_its_pixels_and_a_read_of_them_fails():
    from autoprog.diffusion.data import DiffusionData

    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    data = DiffusionData("x", images, torch.zeros(6, dtype=torch.long), images[:2], torch.zeros(2, dtype=torch.long),
                         1, (0,))
    with pytest.raises(ValueError, match="pixel-space"):
        data.drop_pixels()
    data.latents = torch.randn(6, 4, 4, 4)
    data.drop_pixels()
    assert len(data.train_images) == 6 and data.image_size == 8 and data.in_chans == 3, "counts and sizes still read"
    with pytest.raises((NotImplementedError, RuntimeError)):
        data.train_images[:2].tolist()
    x, _ = data.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 4, 4, 4), "training batches come from the latents"


def test_a_folder_of_greyscale_images_encodes_with_a_one_channel_vae(image_folder, tmp_path):
    """An ImageFolder reads greyscale files as RGB: a 1-channel VAE takes them as one channel (it refused them as
    3-channel images); colour files are still refused, called colour."""
    from PIL import Image

    from autoprog.diffusion.data import load_diffusion_data
    from autoprog.diffusion.latent import with_latents

    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                            norm_num_groups=4, layers_per_block=1, sample_size=16).save_pretrained(tmp_path / "vae1")
    for f in image_folder.rglob("*.png"):
        Image.open(f).convert("L").save(f)
    data = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    with_latents(data, str(tmp_path / "vae1"), tmp_path / "cache")
    assert data.in_chans == 1 and data.latents.shape[1:] == (4, 8, 8)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(image_folder / "train" / "circle" / "red.png")
    colour = load_diffusion_data(str(image_folder), classes=None, image_size=16)
    with pytest.raises(ConfigError, match=r"images have 3 channels \(colour\); the VAE takes 1"):
        with_latents(colour, str(tmp_path / "vae1"), tmp_path / "cache")


def _small_data(n=6, size=16, c=3):
    from autoprog.diffusion.data import DiffusionData

    px = images(n, c, size, seed=3)
    return DiffusionData("x", px, torch.arange(n) % 2, px[:2], torch.zeros(2, dtype=torch.long), 2, (0, 1))


def test_per_step_encoding_encodes_each_batchs_flipped_pixels_at_the_stages_resolution(vae_dir, tmp_path):
    """--latent-encoding per-step (the official train_apz.py's): no latents cached; a batch is the flipped pixels
    resized to the stage's resolution times the VAE's factor, encoded, the posterior drawn from the step's seed."""
    from autoprog.diffusion.data import POSTERIOR_SALT, resize, to_float
    from autoprog.diffusion.latent import with_latents

    data = with_latents(_small_data(), str(vae_dir), tmp_path / "cache", encoding="per-step")
    assert data.latents is None and data.encode_each_batch and not (tmp_path / "cache").exists()
    assert (data.model_chans, data.model_size) == (4, 8)
    idx = torch.tensor([0, 3, 5])
    x, y = data.batch(idx, 4, generator=torch.Generator().manual_seed(7))
    assert x.shape == (3, 4, 4, 4) and torch.isfinite(x).all() and torch.equal(y, data.train_labels[idx])
    again, _ = data.batch(idx, 4, generator=torch.Generator().manual_seed(7))
    other, _ = data.batch(idx, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x, again) and not torch.allclose(x, other), "the step's seed draws the flips and posterior"
    g = torch.Generator().manual_seed(7)
    flip = torch.rand(3, generator=g) < 0.5
    px = to_float(data.train_images[idx])
    px = torch.where(flip.view(-1, 1, 1, 1), px.flip(-1), px)
    codec = data.codec
    vae = codec.vae  # the VAE's own posterior sample, scaled: the official `latent_dist.sample().mul_(0.18215)`
    gen = torch.Generator().manual_seed(7 ^ POSTERIOR_SALT)
    expected = vae.encode(resize(px, 8)).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    assert torch.allclose(x, expected, atol=1e-6)
    assert not torch.allclose(x, vae.encode(resize(px, 8)).latent_dist.mean * vae.config.scaling_factor, atol=1e-3)
    clean = data.clean(idx, 4, seed=1)  # the searches' batches: unflipped, encoded
    unflipped = vae.encode(resize(to_float(data.train_images[idx]), 8)).latent_dist
    assert torch.allclose(clean, unflipped.sample(generator=torch.Generator().manual_seed(1 ^ POSTERIOR_SALT))
                          * vae.config.scaling_factor, atol=1e-6)
    with pytest.raises(ValueError, match="per-step keeps no latents"):
        data.inputs(idx)
    cached = with_latents(_small_data(), str(vae_dir), tmp_path / "cache")
    assert cached.latents.shape == (6, 4, 8, 8) and not cached.encode_each_batch
    with pytest.raises(ConfigError, match="--latent-encoding must be one of cached, per-step"):
        with_latents(_small_data(), str(vae_dir), tmp_path / "cache", encoding="sometimes")
