"""Latent-space diffusion: a diffusers ``AutoencoderKL`` (loaded from local disk) maps images to latents.

Stable Diffusion / DiT convention: ``latents = (vae.encode(x).latent_dist.mean - shift) * scaling_factor``
(``shift`` is ``vae.config.shift_factor``, ``None`` → 0 for SD/DiT VAEs), and decoding inverts it.
Images are uint8 ``(N, C, H, W)`` as in :mod:`autoprog.diffusion.data`; grey images (``C == 1``) are
repeated to the VAE's input channels and decoded images are averaged back to one channel.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import save_tensors
from ..engine import shard_rows
from ..errors import ConfigError, first_line, warn
from ..formats import read_json_object
from .data import DiffusionData, to_float

CACHE_FORMAT = "autoprog-latents/1"


class LatentCodec:
    """A diffusers AutoencoderKL: uint8 images ↔ scaled latents (float32, on the CPU).

    The VAE is frozen (eval mode, ``requires_grad=False``). ``sample_posterior=False`` encodes to the
    posterior mean (deterministic); ``True`` samples it with a generator seeded by ``seed`` at each call.
    """

    def __init__(self, vae, device: str | torch.device = "cpu", sample_posterior: bool = False,
                 seed: int = 0):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.sample_posterior = bool(sample_posterior)
        self.seed = int(seed)
        self.path: str | None = None
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_channels: int | None = None  # channels of the images last encoded (for decode)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kw) -> LatentCodec:
        """Load a diffusers ``AutoencoderKL`` directory (or a pipeline directory with a ``vae/`` subfolder)
        from local disk only; any problem is a one-line :class:`ConfigError`."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"VAE directory {root} does not exist")
        vae_dir = root
        if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
            vae_dir = root / "vae"
        cfg_file = vae_dir / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{root} is not a diffusers AutoencoderKL directory: config.json is missing")
        meta = read_json_object(cfg_file, "VAE config")
        kind = meta.get("_class_name")
        if kind != "AutoencoderKL":
            raise ConfigError(f"{vae_dir} holds a {kind or 'non-diffusers model'}, not an AutoencoderKL")
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
        except Exception as e:  # missing/mismatched weights, bad config values, ...
            raise ConfigError(f"cannot load the AutoencoderKL in {vae_dir}: {first_line(e)}") from e
        codec = cls(vae, device=device, **kw)
        codec.path = str(vae_dir)
        return codec

    def describe(self) -> dict:
        """What a run config should record about the codec."""
        return {"path": self.path, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_channels": self.latent_channels, "downsample": self.downsample,
                "sample_posterior": self.sample_posterior, "seed": self.seed}

    def latent_size(self, image_size: int) -> int:
        """Latent side length for images of side ``image_size``."""
        if image_size <= 0 or image_size % self.downsample:
            raise ConfigError(f"image size {image_size} is not a positive multiple of the VAE's "
                              f"downsampling factor {self.downsample}")
        return image_size // self.downsample

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images_uint8: torch.Tensor, batch_size: int = 64,
               progress: Callable[[int, int], None] | None = None,
               shard: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` → float32 latents ``(N, latent_channels, H/d, W/d)`` on the CPU.

        ``progress(done, total)`` is called after each batch (counting this share's rows). Remembers ``C`` for
        :meth:`decode`. ``shard=(rank, world)``: only the rows of process ``rank``'s even share of the batches
        (:func:`shard_rows`), the numbers that encoding every row gives them (the same batches, and under
        ``sample_posterior`` the same draws).
        """
        x = images_uint8
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ConfigError(f"encode expects uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        n, c, h, w = x.shape
        if c not in (1, self.in_channels):
            kind = " (colour)" if c == 3 else ""
            raise ConfigError(f"images have {c} channels{kind}; the VAE takes {self.in_channels} (or 1, repeated)")
        lh, lw = self.latent_size(h), self.latent_size(w)
        lo, hi = shard_rows(n, batch_size, *shard) if shard is not None else (0, n)
        out = torch.empty(hi - lo, self.latent_channels, lh, lw, dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.seed) if self.sample_posterior else None
        dtype = self._dtype
        if gen is not None:  # the draws of the batches before this share, as diffusers makes them (on the host)
            for i in range(0, lo, batch_size):
                torch.randn((min(batch_size, n - i), self.latent_channels, lh, lw), generator=gen, dtype=dtype,
                            device="cpu")
        for i in range(lo, hi, batch_size):
            xb = to_float(x[i:i + batch_size]).to(self.device, dtype)
            if c != self.in_channels:
                xb = xb.repeat(1, self.in_channels, 1, 1)
            dist = self.vae.encode(xb).latent_dist
            z = dist.sample(generator=gen) if self.sample_posterior else dist.mean
            out[i - lo:i - lo + len(xb)] = ((z - self.shift_factor) * self.scaling_factor).float().cpu()
            if progress is not None:
                progress(min(i + batch_size, hi) - lo, hi - lo)
        self.image_channels = c
        return out

    @torch.no_grad()
    def encode_batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Float images in [-1, 1] ``(N, C, H, W)`` on the VAE's device → scaled float32 latents there, with no
        copy to the host: a training batch encoded inside its step (``--latent-encoding per-step``). The posterior
        is sampled with ``generator`` (on the VAE's device), as the official ``train_apz.py`` samples it."""
        if x.shape[1] != self.in_channels:
            x = x.repeat(1, self.in_channels, 1, 1)  # (1 channel: checked when the run was set up)
        z = self.vae.encode(x.to(self._dtype)).latent_dist.sample(generator=generator)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64,
               out_channels: int | None = None) -> torch.Tensor:
        """Scaled latents → float32 images in [-1, 1] on the CPU, with ``out_channels`` channels (default:
        those of the images last encoded, else the VAE's); 1 channel averages the VAE's output."""
        want = out_channels or self.image_channels or self.out_channels
        if want not in (1, self.out_channels):
            raise ConfigError(f"cannot decode to {want} channels: "
                              f"the VAE gives {self.out_channels} (or 1, averaged)")
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ConfigError(f"decode expects latents (N, {self.latent_channels}, h, w), "
                              f"got {tuple(latents.shape)}")
        n, _, lh, lw = latents.shape
        out = torch.empty(n, want, lh * self.downsample, lw * self.downsample, dtype=torch.float32)
        dtype = self._dtype
        for i in range(0, n, batch_size):
            z = latents[i:i + batch_size].to(self.device, dtype) / self.scaling_factor + self.shift_factor
            x = self.vae.decode(z).sample.float()
            if want != x.shape[1]:
                x = x.mean(dim=1, keepdim=True)
            out[i:i + len(z)] = x.clamp(-1.0, 1.0).cpu()
        return out

    def fingerprint(self) -> str:
        """sha256 over the VAE's config and weights (computed once), for cache keys."""
        if self._fingerprint is None:
            cfg = json.dumps(_plain(dict(self.vae.config)), sort_keys=True, default=str)
            h = hashlib.sha256(cfg.encode())
            for name, t in sorted(self.vae.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def cache_key(self, images_uint8: torch.Tensor) -> str:
        """sha256 over the cache format, the codec (VAE config + weights, posterior mode) and the images."""
        x = images_uint8.detach().cpu().contiguous()
        h = hashlib.sha256(f"{CACHE_FORMAT}|{self.fingerprint()}|{self.sample_posterior}|{self.seed}"
                           .encode())
        h.update(f"|{tuple(x.shape)}|{x.dtype}|".encode())
        h.update(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def encode_cached(self, images_uint8: torch.Tensor, cache_path: str | Path, batch_size: int = 64,
                      progress: Callable[[int, int], None] | None = None, accelerator=None) -> torch.Tensor:
        """:meth:`encode`, cached as ``cache_path/latents-<key[:16]>.safetensors`` (written atomically).

        A damaged or foreign cache file is ignored and overwritten. With an ``accelerator`` of several processes
        (call it on every process, outside ``main_process_first``), the main process looks the cache up for all;
        on a miss each process encodes its share of the batches, every process gets all the latents and the main
        process writes the cache, so no process waits alone for the whole encoding (a large set through a large
        VAE can outlast the collectives' 30-minute timeout).
        """
        key = self.cache_key(images_uint8)
        folder = Path(cache_path).expanduser()
        file = folder / f"latents-{key[:16]}.safetensors"
        world = accelerator.num_processes if accelerator is not None else 1
        if world > 1:
            from ..engine import broadcast, count_flags, gather_rows

            main = accelerator.is_main_process
            cached = self._read_cache(file, key) if main else None
            if broadcast(accelerator, cached is not None if main else None):  # the others read it too, if they can
                cached = cached if main else self._read_cache(file, key)
                if not count_flags(accelerator, cached is None)[0]:  # (a cache folder not shared by every machine:
                    return cached                                     # encoded again below)
            rank = accelerator.process_index
            mine = self.encode(images_uint8, batch_size=batch_size, progress=progress, shard=(rank, world))
            counts = [hi - lo for lo, hi in (shard_rows(len(images_uint8), batch_size, r, world) for r in range(world))]
            latents = gather_rows(accelerator, mine, counts, everywhere=True)
            if main:
                try:  # the others went on with the latents: an unwritable cache must not stop the main process alone
                    self._write_cache(file, key, latents, images_uint8.shape[1])
                except OSError as e:
                    warn(f"the latents were not cached in {folder}: {first_line(e)}")
            return latents
        cached = self._read_cache(file, key)
        if cached is not None:
            return cached
        latents = self.encode(images_uint8, batch_size=batch_size, progress=progress)
        self._write_cache(file, key, latents, images_uint8.shape[1])
        return latents

    def _read_cache(self, file: Path, key: str) -> torch.Tensor | None:
        """The latents cached in ``file`` under ``key``, or None (absent, damaged or foreign)."""
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") == key and meta.get("format") == CACHE_FORMAT:
                    latents = f.get_tensor("latents")
                    self.image_channels = int(meta["image_channels"])
                    return latents
        except Exception:  # unreadable: re-encoded
            pass
        return None

    def _write_cache(self, file: Path, key: str, latents: torch.Tensor, image_channels: int) -> None:
        folder = file.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        meta = {"format": CACHE_FORMAT, "key": key, "image_channels": str(image_channels), "vae": self.path or ""}
        try:
            save_tensors({"latents": latents.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)


def _plain(cfg: dict) -> dict:
    """Config values only (no ``_name_or_path`` etc.), tuples as lists, so equal VAEs hash equally."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}


__all__ = ["LATENT_ENCODING", "LatentCodec", "shard_rows"]


LATENT_ENCODING = ("cached", "per-step")  # --latent-encoding


def with_latents(data: DiffusionData, vae_path: str, cache_dir: str | os.PathLike, device="cpu",
                 accelerator=None, encoding: str = "cached") -> DiffusionData:
    """Latent-space training with the AutoencoderKL at ``vae_path``: ``encoding="cached"`` encodes ``data``'s
    training images once (the posterior mean, full size; cached; with an ``accelerator`` in shares by every
    process, see :meth:`LatentCodec.encode_cached`); ``"per-step"`` encodes each batch in its step instead
    (:attr:`DiffusionData.encode_each_batch`)."""
    if encoding not in LATENT_ENCODING:
        raise ConfigError(f"--latent-encoding must be one of {', '.join(LATENT_ENCODING)}, got {encoding!r}")
    codec = LatentCodec.from_pretrained(vae_path, device=device)
    codec.latent_size(data.image_size)  # refuses sizes the VAE cannot halve down
    if codec.in_channels == 1:  # greyscale files, which an ImageFolder reads as RGB: one channel, value for value
        data.to_greyscale()
    if encoding == "per-step":
        if data.in_chans not in (1, codec.in_channels):  # (as encode() refuses them)
            kind = " (colour)" if data.in_chans == 3 else ""
            raise ConfigError(f"images have {data.in_chans} channels{kind}; the VAE takes {codec.in_channels} "
                              "(or 1, repeated)")
        codec.image_channels = data.in_chans
        data.codec, data.encode_each_batch = codec, True
        return data
    data.latents = codec.encode_cached(data.train_images, Path(cache_dir) / "latents", accelerator=accelerator)
    data.codec = codec
    return data
