"""DreamBooth (Ruiz et al., 2023) on the text-to-image path: a few images of one subject, a prompt with a rare
identifier (``"a photo of sks dress"``), and optionally prior preservation: images the base model generates
for the subject's class prompt (``"a photo of a dress"``), trained alongside so that the class keeps its
variety (the paper's language drift). Each batch is then half subject, half class images, and the loss is
the subject's mean loss plus ``prior_weight`` times the class images' (as diffusers' ``train_dreambooth.py``).

The built-in subject is :data:`DEFAULT_SUBJECT_IMAGES` near-identical Fashion-MNIST test images of one class
the shipped base knows (an image and its nearest neighbours in pixel space): the base never saw them.

Metrics (:class:`SubjectEvaluator`) on images generated from the instance prompt:

* ``dino``: mean cosine similarity of DINO CLS features between generated and subject images (needs local
  weights, ``--dino-model DIR``), DreamBooth's subject fidelity;
* ``clip_t`` / ``clip_i``: CLIP image–text cosine to the class prompt, and image–image cosine to the subject
  images (``--clip-model DIR``);
* without those weights the same questions on autoprog's own feature classifier, named as such:
  ``subject_fidelity`` (cosine of its features to the subject images) and ``text_agreement`` (its probability
  that the images show the prompt's class, when the class is one of the dataset's);
* ``clip_t_pK`` / ``text_agreement_pK``: on images generated from the K-th of ``--eval-prompts`` (Table 8's
  Prompt-A and Prompt-B, e.g. "a photo of sks dog sleeping under a tree"): CLIP-T against that prompt; without
  CLIP, the classifier's probability of the subject's class (whether the subject survives the new context; it
  cannot read the rest of the prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import read_image
from ..errors import ConfigError, DataError, DivergedError, first_line, warn
from .data import DiffusionData, resize, to_float

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SUBJECT_CLASS = 3  # Fashion-MNIST "dress": a class the shipped text-to-image base was trained on
DEFAULT_SUBJECT_IMAGES = 5
FEW_SUBJECT_IMAGES = 3  # DreamBooth's paper: 3-5 images of a subject (the help asks 3-6); fewer are warned about
DEFAULT_INSTANCE_PROMPT = "a photo of sks {}"
DEFAULT_CLASS_PROMPT = "a photo of a {}"
CLASS_CFG_SCALE = 4.0  # guidance of the generated class images (autoprog sample's default; diffusers' uses 7.5)
CLASS_BATCH = 16  # class images sampled at once
OWN_FIDELITY = "subject fidelity (autoprog features)"
OWN_TEXT = "text agreement (autoprog classifier)"
CLASSIFIER_CHUNK = 256  # images the feature classifier scores at once
MAX_EVAL_PROMPTS = 4  # --eval-prompts (Table 8's Prompt-A and Prompt-B are two)
SCORE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "subject_fidelity": OWN_FIDELITY,
                "text_agreement": OWN_TEXT,  # each score's name in reports; then those of each --eval-prompts prompt
                **{f"{key}_p{i}": f"{label}, prompt {i}" for i in range(1, MAX_EVAL_PROMPTS + 1)
                   for key, label in (("clip_t", "CLIP-T"), ("text_agreement", OWN_TEXT))}}
SCORE_KEYS = tuple(SCORE_LABELS)


# ------------------------------------------------------------------------------------------------ images
def read_images(folder: str | Path, size: int, channels: int) -> torch.Tensor:
    """Every image file in ``folder`` (sorted by name) as uint8 ``(N, channels, size, size)``: the shorter side
    resized to ``size``, centre-cropped, grey or RGB."""
    from torchvision import transforms

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    skipped = sorted(p.name for p in folder.iterdir() if p not in files and not p.name.startswith("."))
    if skipped:
        warn(f"{folder}: skipping {len(skipped)} non-image file{'s' * (len(skipped) != 1)} (images are "
             f"{', '.join(IMAGE_SUFFIXES)}), e.g. {skipped[0]}")
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    images = [read_image(f, "RGB", upright=True) for f in files]  # phone photos upright, as diffusers' DreamBooth
    if channels == 1:
        from PIL import ImageChops

        def coloured(im) -> bool:
            r, g, b = im.split()
            return any(ImageChops.difference(a, b).getbbox() is not None for a, b in ((r, g), (g, b)))

        n = sum(map(coloured, images))
        if n:
            warn(f"{folder}: {n} of the {len(images)} subject images are in colour; the base model takes 1 channel, "
                 "so they train in grey")
        images = [im.convert("L") for im in images]
    return torch.stack([tf(im) for im in images])


def image_files(folder: Path) -> list[Path]:
    """The image files in ``folder``, sorted by name (none when it does not exist)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def write_images(images: torch.Tensor, folder: Path, start: int = 0, prefix: str = "class") -> None:
    """uint8 ``(N, C, H, W)`` images as ``folder/<prefix>-<k>.png`` (each written whole, then renamed)."""
    from PIL import Image

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(images, start):
            arr = img.permute(1, 2, 0).numpy()
            im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            tmp = folder / f".{prefix}-{k:05d}.{os.getpid()}.png.tmp"  # processes writing the same images
            im.save(tmp, format="PNG")
            tmp.replace(folder / f"{prefix}-{k:05d}.png")
    except OSError as e:
        raise ConfigError(f"cannot write images to {folder}: {first_line(e)}") from None


def default_subject(data_root: str | None = None, class_id: int = DEFAULT_SUBJECT_CLASS,
                    n: int = DEFAULT_SUBJECT_IMAGES) -> torch.Tensor:
    """The built-in subject: the first Fashion-MNIST test image of ``class_id`` and its ``n - 1`` nearest
    neighbours (pixel distance) in that class, uint8 ``(n, 1, 28, 28)``."""
    from .data import load_diffusion_data

    data = load_diffusion_data("fashion-mnist", data_root, classes=(class_id,))
    pool = data.test_images
    if len(pool) < n:
        raise DataError(f"Fashion-MNIST's test split has {len(pool)} images of class {class_id}; need {n}")
    flat = to_float(pool).flatten(1)
    nearest = (flat - flat[0]).pow(2).sum(1).argsort()[:n]
    return pool[nearest].clone()


# ------------------------------------------------------------------------------------------ class images
def _base_identity(base: Path) -> str:
    """What the base model is, for the class-image cache: its weight files' paths, sizes and times."""
    files = sorted(p for p in Path(base).rglob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    return "|".join(f"{p.resolve()}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


def class_images_dir(cache_dir: str | Path, base: Path, prompt: str, settings: dict) -> Path:
    """The default home of the class images the base generates for ``prompt`` with ``settings``."""
    key = hashlib.sha1(json.dumps([_base_identity(base), prompt, settings], sort_keys=True).encode()).hexdigest()
    return Path(cache_dir).expanduser() / "dreambooth" / key[:16]


def class_images(model, decode, prompt: str, n: int, folder: Path, size: int, channels: int, steps: int,
                 cfg_scale: float, eta: float, seed: int, log=print,
                 device: torch.device | str | None = None, accelerator=None) -> torch.Tensor:
    """``n`` prior-preservation images for ``prompt``: those already in ``folder``, the rest generated by the
    base ``model`` on ``device`` (default: a GPU if there is one; DDIM, guidance ``cfg_scale``; ``decode`` takes
    its samples to pixels in [-1, 1]) and written there, so they are made once.

    With an ``accelerator`` of several processes (call it on every process, not inside ``main_process_first``),
    the main process reads the folder and sends its images to the others, every process samples and decodes an
    even share of the missing ones (:func:`~autoprog.diffusion.sampling.sample`'s ``shard``: the images one
    process makes, in ``1 / processes`` of the time), the main process writes them and reads the folder again,
    and every process returns what it read; an error reading or writing the folder, or one process's failed
    sampling, stops every process."""
    world = accelerator.num_processes if accelerator is not None else 1
    if world > 1:
        return _class_images_in_shares(model, decode, prompt, n, folder, size, channels, steps, cfg_scale, eta,
                                       seed, log, device, accelerator)
    have = _folder_images(folder, size, channels)
    if len(have) < n:
        log(f"DreamBooth: generating {n - len(have)} class images for {prompt!r} with the base model into {folder}")
        new = _generate(model, decode, prompt, n - len(have), size, channels, steps, cfg_scale, eta,
                        seed + len(have), device)
        write_images(new, folder, start=_free_index(folder))
        have = read_images(folder, size, channels)  # as a resumed run will read them: sorted by name
    else:
        log(f"DreamBooth: {n} class images from {folder}")
    return have[:n]


def _folder_images(folder: Path, size: int, channels: int) -> torch.Tensor:
    return (read_images(folder, size, channels) if image_files(folder) else
            torch.empty(0, channels, size, size, dtype=torch.uint8))


def _free_index(folder: Path, prefix: str = "class") -> int:
    """One past the largest ``k`` of the folder's ``<prefix>-<k>.png`` files (0 when none), so that images
    added to a folder never overwrite one there."""
    taken = [int(m.group(1)) for p in image_files(folder) if (m := re.fullmatch(rf"{prefix}-(\d+)\.png", p.name))]
    return max(taken, default=-1) + 1


def _main_folder_images(acc, folder: Path, size: int, channels: int, n: int) -> torch.Tensor:
    """The first ``n`` images of ``folder`` as the main process reads them, on every process; a folder the main
    process cannot read stops every process with its message."""
    from ..engine import broadcast, gather_rows

    have, outcome = torch.empty(0, channels, size, size, dtype=torch.uint8), None
    if acc.is_main_process:
        try:
            have = _folder_images(folder, size, channels)[:n]
            outcome = len(have)
        except DataError as e:
            outcome = str(e)
        except OSError as e:
            outcome = f"cannot read {folder}: {first_line(e)}"
    outcome = broadcast(acc, outcome)  # how many it holds, or why it cannot be read
    if isinstance(outcome, str):
        raise DataError(outcome)
    return gather_rows(acc, have, [outcome] + [0] * (acc.num_processes - 1), everywhere=True)


def _generate(model, decode, prompt: str, n: int, size: int, channels: int, steps: int, cfg_scale: float,
              eta: float, seed: int, device, shard: tuple[int, int] | None = None) -> torch.Tensor:
    """``n`` class images of ``prompt`` as uint8 (this process's ``shard`` of them, see ``sample``)."""
    from .quality import to_uint8
    from .sampling import sample

    ids = model.tokenize([prompt] * n)
    device = device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    x0 = sample(model.to(device), ids.to(device), steps=steps, cfg_scale=cfg_scale, seed=seed, eta=eta,
                batch_size=CLASS_BATCH, shard=shard)
    model.cpu()
    if not len(x0):  # an empty share
        return torch.empty(0, channels, size, size, dtype=torch.uint8)
    return match_images(to_uint8(decode(x0.cpu()).cpu()), size, channels)


def _class_images_in_shares(model, decode, prompt, n, folder, size, channels, steps, cfg_scale, eta, seed, log,
                            device, acc) -> torch.Tensor:
    """:func:`class_images` under several processes."""
    from ..engine import broadcast, count_flags, gather_rows
    from .sampling import shard_indices

    main, world = acc.is_main_process, acc.num_processes
    have = _main_folder_images(acc, folder, size, channels, n)
    missing = n - len(have)
    if missing <= 0:
        if main:
            log(f"DreamBooth: {n} class images from {folder}")
        return have
    if main:
        log(f"DreamBooth: generating {missing} class images for {prompt!r} with the base model into {folder} "
            f"(a share on each of {world} processes)")
    error = None
    try:
        mine = _generate(model, decode, prompt, missing, size, channels, steps, cfg_scale, eta, seed + len(have),
                         device, shard=(acc.process_index, world))
    except Exception as e:  # told to the others before it is raised, so none waits in the gather below
        error, mine = e, None
    if count_flags(acc, error is not None)[0]:
        raise error if error is not None else RuntimeError(
            "another process could not generate its share of the class images (its message says why)")
    shares = [shard_indices(missing, r, world, CLASS_BATCH) for r in range(world)]
    got = gather_rows(acc, mine, [len(i) for i in shares])  # (on the main process, which writes them)
    if main:
        new = torch.empty_like(got)
        new[torch.cat(shares)] = got
        try:
            write_images(new, folder, start=_free_index(folder))
        except ConfigError as e:
            error = str(e)
    error = broadcast(acc, error)
    if error is not None:
        raise ConfigError(error)
    return _main_folder_images(acc, folder, size, channels, n)  # as a resumed run will read them: sorted by name


def match_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 images converted to ``channels`` (grey ↔ RGB) and resized to ``size`` (as they are when they are)."""
    if images.shape[1] == channels and images.shape[-1] == size:
        return images
    x = to_float(images)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x[:, :1].expand(-1, channels, -1, -1)
    x = resize(x, size)
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def dreambooth_data(instance: torch.Tensor, prior: torch.Tensor | None, instance_prompt: str, class_prompt: str,
                    prior_weight: float | None, tokenize, name: str = "dreambooth",
                    eval_prompts: tuple[str, ...] = ()) -> DiffusionData:
    """Training data: the subject images (label 0, ``instance_prompt``) and, with prior preservation, the class
    images (label 1, ``class_prompt``, loss weight ``prior_weight``). Evaluation generates the subject, from the
    instance prompt and from each of ``eval_prompts``."""
    prior = prior if prior is not None else instance[:0]
    images = torch.cat([instance, prior]).contiguous()
    labels = torch.cat([torch.zeros(len(instance)), torch.ones(len(prior))]).long()
    captions = (instance_prompt, class_prompt)
    return DiffusionData(name, images, labels, instance.clone(), torch.zeros(len(instance)).long(), 2, (0,),
                         hflip=False, class_names=None, captions=captions, caption_ids=tokenize(list(captions)),
                         num_instance=len(instance), prior_weight=prior_weight if len(prior) else None,
                         eval_prompts=tuple(eval_prompts))


# --------------------------------------------------------------------------------------------- metrics
def _mean_pair_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.normalize(a.float(), dim=1).matmul(F.normalize(b.float(), dim=1).T).mean())


def _rgb_arrays(images: torch.Tensor) -> list:
    x = images if images.shape[1] == 3 else images[:, :1].expand(-1, 3, -1, -1)
    return [im.permute(1, 2, 0).numpy() for im in x]


def _load_local(cls, path: str, what: str, flag: str):
    if not Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: no such directory")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a wrong folder
        raise ConfigError(f"{flag} {path}: not a {what} ({first_line(e)})") from None


class DinoScorer:
    """DINO subject fidelity from a local ViT checkpoint (e.g. facebook/dino-vits16 saved with transformers)."""

    def __init__(self, path: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.model = _load_local(AutoModel, path, "vision model directory (transformers)", "--dino-model").eval()
        self.model.to(device)
        self.processor = _load_local(AutoImageProcessor, path, "vision model directory with an image processor",
                                     "--dino-model")
        self.device = device

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        px = self.processor(images=_rgb_arrays(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=px).last_hidden_state[:, 0]


class ClipScorer:
    """CLIP-T (image–text cosine) and CLIP-I (image–image cosine) from a local CLIP checkpoint."""

    def __init__(self, path: str, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = _load_local(CLIPModel, path, "CLIP model directory (transformers CLIPModel)",
                                 "--clip-model").eval().to(device)
        self.processor = _load_local(CLIPProcessor, path, "CLIP model directory with a processor", "--clip-model")
        self.device = device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        px = self.processor(images=_rgb_arrays(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _embeds(self.model.get_image_features(pixel_values=px))

    @torch.no_grad()
    def text_features(self, text: str) -> torch.Tensor:
        tok = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        return _embeds(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                    attention_mask=tok["attention_mask"].to(self.device)))


@torch.no_grad()
def classifier_outputs(net, images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature classifier's features and class probabilities of uint8 ``images`` brought to ``size``, in chunks
    of :data:`CLASSIFIER_CHUNK` images."""
    device = next(net.parameters()).device
    feats, probs = [], []
    for chunk in images.split(CLASSIFIER_CHUNK):
        f = net.features(to_float(match_images(chunk, size, net.in_channels)).to(device))
        feats.append(f)
        probs.append(net.head(f).softmax(-1))
    return torch.cat(feats), torch.cat(probs)


class PromptAgreement:
    """An evaluator (FD/KID) that also scores how well each generated image agrees with its prompt, for
    text-to-image (Table 7): ``clip_t``, the mean cosine between each image's CLIP embedding and its prompt's (with
    ``clip``, local CLIP weights), and ``text_agreement``, autoprog's own classifier's mean probability of each
    image's prompted class (with ``feature_net``; named as such in reports). Images come as the trainer generates
    them, class-balanced and cycling through ``classes`` (dataset class ids) in order, each with its caption."""

    def __init__(self, inner, captions: tuple[str, ...], classes: tuple[int, ...], clip: ClipScorer | None = None,
                 feature_net=None):
        if clip is None and feature_net is None:
            raise ConfigError("prompt agreement needs CLIP weights (--clip-model) or the feature classifier")
        self.inner, self.clip, self.feature_net = inner, clip, feature_net
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        self._text = torch.cat([clip.text_features(captions[c]) for c in classes]) if clip is not None else None

    def __getattr__(self, name):  # the inner evaluator's attributes (higher_is_better, ...)
        return getattr(self.inner, name)

    def evaluate(self, images: torch.Tensor) -> dict:
        out = dict(self.inner.evaluate(images))
        if self.clip is not None:
            img = self.clip.image_features(images)
            text = self._text[torch.arange(len(images)) % len(self._text)]
            out["clip_t"] = float(F.cosine_similarity(img.float(), text.float(), dim=-1).mean())
        if self.feature_net is not None:
            p = classifier_outputs(self.feature_net, images, images.shape[-1])[1].cpu()
            want = self.classes[torch.arange(len(images)) % len(self.classes)]
            if int(want.max()) >= p.shape[1]:
                raise ConfigError(f"class {int(want.max())} is outside the feature classifier's {p.shape[1]} classes")
            out["text_agreement"] = float(p[torch.arange(len(images)), want].mean())
        bad = [k for k in ("clip_t", "text_agreement") if k in out and not torch.isfinite(torch.tensor(out[k]))]
        if bad:
            raise DivergedError(f"non-finite {', '.join(bad)}: the generated images are not finite")
        return out


def _embeds(out) -> torch.Tensor:
    """CLIP's projected embeddings: transformers 4 returns the tensor, 5 an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class SubjectEvaluator:
    """Scores images generated from the instance prompt against the ``subject`` images (see the module
    docstring). The headline (``headline``, higher is better) is ``dino`` when DINO weights are given, else
    ``subject_fidelity``."""

    higher_is_better = True

    def __init__(self, subject: torch.Tensor, class_prompt: str, feature_net=None, subject_class: int | None = None,
                 dino: DinoScorer | None = None, clip: ClipScorer | None = None, feature_size: int | None = None):
        if dino is None and feature_net is None:
            raise ConfigError("DreamBooth's metrics need DINO weights (--dino-model) or the feature classifier")
        self.subject, self.feature_net, self.subject_class = subject, feature_net, subject_class
        self.dino, self.clip = dino, clip
        self._own_size = feature_size  # the size the feature classifier was trained at (default: the subject's)
        self.headline = "dino" if dino is not None else "subject_fidelity"
        self.metric = "DINO" if dino is not None else OWN_FIDELITY
        self._dino_ref = dino.features(subject) if dino is not None else None
        self._clip_ref = clip.image_features(subject) if clip is not None else None
        self._clip_text = clip.text_features(class_prompt) if clip is not None else None
        self._own_ref = self._own(subject)[0] if feature_net is not None else None

    def _own(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = getattr(self, "_own_size", None) or images.shape[-1]
        self._own_size = size  # the subject's size: generated images are brought to it
        return classifier_outputs(self.feature_net, images, size)

    def prompt_scores(self, images: torch.Tensor, prompt: str, index: int) -> dict:
        """Scores of uint8 images generated from ``prompt`` (the ``index``-th of ``--eval-prompts``, from 1):
        ``clip_t_p{index}`` (CLIP-T to ``prompt``, with CLIP weights) and ``text_agreement_p{index}`` (autoprog's
        classifier's probability of the subject's class, when it is known)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if not 1 <= index <= MAX_EVAL_PROMPTS:
            raise ValueError(f"prompt index {index} outside 1-{MAX_EVAL_PROMPTS}")
        out = {}
        if self.clip is not None:
            out[f"clip_t_p{index}"] = _mean_pair_cosine(self.clip.image_features(images),
                                                        self.clip.text_features(prompt))
        if self.feature_net is not None and self.subject_class is not None:
            _, p = self._own(images)
            if self.subject_class < p.shape[1]:
                out[f"text_agreement_p{index}"] = float(p[:, self.subject_class].mean())
        bad = [k for k, v in out.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            raise DivergedError(f"non-finite DreamBooth scores {bad}: the generated images are not finite")
        return out

    def reference(self) -> dict:
        """The subject images' own scores: the ceiling a model that reproduces them exactly would reach."""
        return {k: round(v, 5) for k, v in self.evaluate(self.subject).items() if k in SCORE_KEYS}

    def evaluate(self, images: torch.Tensor) -> dict:
        """Scores of uint8 images ``(N, C, H, W)`` of the subject; every score is a mean in [-1, 1] or [0, 1]."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        out: dict = {"metric": self.metric, "headline": self.headline}
        if self.feature_net is not None:
            f, p = self._own(images)
            out["subject_fidelity"] = _mean_pair_cosine(f, self._own_ref)
            if self.subject_class is not None and self.subject_class < p.shape[1]:
                out["text_agreement"] = float(p[:, self.subject_class].mean())
        if self.dino is not None:
            out["dino"] = _mean_pair_cosine(self.dino.features(images), self._dino_ref)
        if self.clip is not None:
            img = self.clip.image_features(images)
            out["clip_i"] = _mean_pair_cosine(img, self._clip_ref)
            out["clip_t"] = _mean_pair_cosine(img, self._clip_text)
        bad = [k for k in SCORE_KEYS if k in out and not torch.isfinite(torch.tensor(out[k]))]
        if bad:
            raise DivergedError(f"non-finite DreamBooth scores {bad}: the generated images are not finite")
        return out
