"""Class-conditional diffusion transformers behind one interface.

Two backbones predict the noise ε of Eq. 11 from ``(x_t, t, y)``:

* :class:`DiT`, built in, in the paper's architecture (Peebles & Xie): patchify, adaLN-Zero blocks
  conditioned on timestep + class embedding, a fixed 2-D sin-cos position embedding computed for
  whatever grid the input has (positions are interpolated onto the full grid, so a lower input
  resolution sees the same spatial layout);
* :class:`DiffusersDiT`, diffusers' ``DiTTransformer2DModel`` wrapped to the same interface.

Both reserve class id ``num_classes`` as the null class of classifier-free guidance and accept a
Unique Stage Identifier (SID, Sec. 4.1.2): a learnable stage embedding added to the class embedding.
The interface is what the fine-tuning methods need: ``blocks`` (unfrozen or not as a whole),
``branch_modules`` (where DiffFit's scale factors go), ``lora_targets`` (linear layers for peft) and
``condition_parameters`` (the class/stage embeddings, learnable in every fine-tuning method because
a transfer task brings classes the base model never saw).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import save_tensors
from ..errors import ConfigError, first_line
from ..formats import check_fields, check_finite, check_value, read_json_object, read_weights
from .backbone import SAVED_META_FIELDS, DiffusionBackbone

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BACKBONES = ("dit", "diffusers-dit", "text-unet")


# ------------------------------------------------------------------------------------------- built-in
def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: the conditioning regresses shift/scale/gate, gates start at zero."""

    takes_tokens = True  # a transformer block on (B, N, D) tokens: Adapter and VPT-Deep attach here (models.extras)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.layers import Mlp
        from timm.models.vision_transformer import Attention

        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for lin in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(DiffusionBackbone):
    """The paper's DiT (ε-prediction only), sized by ``hidden_size``, ``depth`` and ``num_heads``."""

    kind = "dit"
    lora_targets = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 hidden_size: int = 128, depth: int = 8, num_heads: int = 4, mlp_ratio: float = 4.0,
                 learn_sigma: bool = False):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        if image_size % patch_size:
            raise ConfigError(f"image size {image_size} is not divisible by patch size {patch_size}")
        if hidden_size % num_heads:
            raise ConfigError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.config = dict(image_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.learned_sigma = bool(learn_sigma)
        if self.learned_sigma:  # the official DiT's: ε and the variance values, channel fastest per pixel
            self.config["learn_sigma"] = True
        self.x_embedder = nn.Conv2d(in_chans, hidden_size, patch_size, stride=patch_size)
        self.t_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embedder = TimestepEmbedding(256, hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # last row: the null class
        self.sid = None
        # registered directly: ``blocks`` is the interface's property, names stay ``blocks.{i}.…`` as in DiT
        self._modules["blocks"] = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_chans * (2 if self.learned_sigma else 1))
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.abs().sum() > 0:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for lin in (self.t_embedder.linear_1, self.t_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self._modules["blocks"]

    @property
    def block_prefix(self) -> str:
        return "blocks"

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        b = self.blocks[i]
        return {"attn": b.attn, "mlp": b.mlp}

    def class_embedding_modules(self) -> list[nn.Embedding]:
        return [self.y_embedder]

    def _pos_embed(self, gh: int, gw: int, device, dtype) -> torch.Tensor:
        key = (gh, gw, str(device), dtype)
        if key not in self._pos_cache:
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            if gh != gw:
                raise ConfigError(f"the built-in DiT takes square inputs, got a {gh}×{gw} patch grid")
            base = self.image_size // self.patch_size
            pe = get_2d_sincos_pos_embed(self.hidden_size, gh, base_size=base, interpolation_scale=1.0)
            self._pos_cache[key] = pe.to(device=device, dtype=dtype).unsqueeze(0)
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ConfigError(f"input {h}×{w} is not divisible by patch size {p}")
        tok = self.x_embedder(x).flatten(2).transpose(1, 2)
        tok = tok + self._pos_embed(h // p, w // p, x.device, tok.dtype)
        temb = self.t_embedder(self.t_proj(t.reshape(-1).expand(b)).to(tok.dtype))
        yemb = self.y_embedder(y)
        if self.sid is not None:
            yemb = yemb + self.sid(yemb)
        c = temb + yemb
        for blk in self.blocks:
            tok = self.run_block(blk, tok, c)
        out = self.final_layer(tok, c)  # (B, N, p*p*C), or p*p*2C with a learned sigma
        gh, gw = h // p, w // p
        oc = out.shape[-1] // (p * p)
        out = out.reshape(b, gh, gw, p, p, oc).permute(0, 5, 1, 3, 2, 4).reshape(b, oc, h, w)
        return out if self.variance_output or not self.learned_sigma else out[:, :self.in_chans]


# ------------------------------------------------------------------------------------------ diffusers
class DiffusersDiT(DiffusionBackbone):
    """diffusers' ``DiTTransformer2DModel`` behind the interface.

    diffusers keeps a timestep/class embedder inside every block and drops classes itself in training
    mode; here class dropout is switched off (the trainer drops labels to the null class so that every
    block sees the same label) and the SID reaches every block's class embedder through a forward hook.

    A learned-sigma DiT (``out_channels == 2 × in_channels``, as the official DiT-XL/2) predicts ε in its first
    half and the variance interpolation in the second. Fine-tuning trains the ε half (Eq. 11); the output rows
    of the variance half get no gradient (a hook zeroes it), so the variance head stays the base model's
    (unless ``--weight-decay``, off by default, shrinks them; the shared trunk still moves under them), unless
    ``--hybrid-loss`` trains it with DiT's hybrid loss (``train_variance``).
    ``forward`` returns ε only (both halves while ``variance_output`` is set): autoprog samples with DDIM, whose
    variance is set by η, not learned.
    """

    kind = "diffusers-dit"
    lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 hidden_size: int = 128, depth: int = 8, num_heads: int = 4, model=None, learned_sigma: bool = False,
                 diffusers: dict | None = None):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        if hidden_size % num_heads:
            raise ConfigError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        if model is None and diffusers is not None:  # the exact diffusers config a saved model had
            model = DiTTransformer2DModel.from_config(diffusers)
        if model is None:
            model = DiTTransformer2DModel(
                num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_chans,
                out_channels=in_chans * (2 if learned_sigma else 1), num_layers=depth,
                sample_size=image_size // patch_size * patch_size, patch_size=patch_size,
                num_embeds_ada_norm=num_classes,
            )
        self.model = model
        cfg = model.config
        out = cfg.out_channels or cfg.in_channels
        if out not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ConfigError("a DiT predicts ε (out_channels == in_channels) or ε and a learned variance "
                              f"(out_channels == 2 × in_channels); this one has {cfg.in_channels} in and {out} out")
        self.learned_sigma = out == 2 * cfg.in_channels
        self.config = dict(image_size=cfg.sample_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
                           num_classes=cfg.num_embeds_ada_norm, hidden_size=cfg.num_attention_heads *
                           cfg.attention_head_dim, depth=cfg.num_layers, num_heads=cfg.num_attention_heads)
        if self.learned_sigma:
            self.config["learned_sigma"] = True
            head = model.proj_out_2  # rows ordered (patch row, patch column, channel), channel fastest
            variance = (torch.arange(head.out_features, device=head.weight.device) % out) >= cfg.in_channels
            on = {}  # the mask on each device the gradients come from, copied there once (not at every backward)

            def zero_variance_rows(g):
                m = on.get(g.device)
                if m is None:
                    m = on[g.device] = variance.to(g.device)
                return g.masked_fill(m.view(-1, *([1] * (g.ndim - 1))), 0)

            for p in (head.weight, head.bias):  # the variance rows learn only under the hybrid loss
                p.register_hook(lambda g: g if self.train_variance else zero_variance_rows(g))
        self.sid = None
        for emb in self._label_embedders():
            emb.dropout_prob = 0.0
            if emb.embedding_table.num_embeddings != self.num_classes + 1:
                raise ConfigError("the diffusers DiT has no null-class row; it must be built with class dropout")
            emb.register_forward_hook(self._add_sid)

    def _label_embedders(self):
        return [blk.norm1.emb.class_embedder for blk in self.model.transformer_blocks]

    def _add_sid(self, module, args, output):
        return output if self.sid is None else output + self.sid(output)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer_blocks

    @property
    def block_prefix(self) -> str:
        return "model.transformer_blocks"

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        b = self.model.transformer_blocks[i]
        return {"attn": b.attn1, "mlp": b.ff}

    def class_embedding_modules(self) -> list[nn.Embedding]:
        return [e.embedding_table for e in self._label_embedders()]

    def set_gradient_checkpointing(self, on: bool) -> None:
        """diffusers' own per-block checkpointing."""
        super().set_gradient_checkpointing(on)
        if on:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    def _on_resize_classes(self, num_classes: int) -> None:
        for e in self._label_embedders():
            e.num_classes = num_classes
        self.model.register_to_config(num_embeds_ada_norm=num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])
        out = self.model(x, timestep=t, class_labels=y).sample
        return out[:, :self.in_chans] if self.learned_sigma and not self.variance_output else out


# --------------------------------------------------------------------------------------- build / save
def build_backbone(kind: str = "dit", **kw) -> DiffusionBackbone:
    if kind == "dit":
        return DiT(**kw)
    if kind == "diffusers-dit":
        kw.pop("mlp_ratio", None)
        return DiffusersDiT(**kw)
    raise ConfigError(f"unknown diffusion backbone {kind!r}: choose from {', '.join(BACKBONES)}")


def save_backbone(model: DiffusionBackbone, path: str | Path, extra: dict | None = None, vae=None,
                  scheduler=None) -> Path:
    """Write ``config.json`` + weights (safetensors) to directory ``path``; SID rows are kept. A text-to-image
    model is written as a pipeline directory instead, with ``vae`` and ``scheduler`` when it has them
    (:func:`~autoprog.models.text_unet.save_text_unet`)."""
    if model.kind == "text-unet":
        from .text_unet import save_text_unet

        return save_text_unet(model, path, extra, vae=vae, scheduler=scheduler)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(model.config)
    if isinstance(model, DiffusersDiT):  # every diffusers setting (attention bias, activation, ...), not only ours
        config["diffusers"] = {k: v for k, v in dict(model.model.config).items() if not k.startswith("_")}
    meta = {"format": "autoprog-diffusion/1", "kind": model.kind, "config": config,
            "sid_stages": model.sid.num_stages if model.sid is not None else 0, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_tensors(state, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _refuse_run_folder(path: Path) -> None:
    """A one-line error for a run's folder given as a model: its model is ``path/model`` once the run ends."""
    from ..checkpoint import has_checkpoint

    if (path / "model" / CONFIG_FILE).is_file() or (path / "model" / "unet").is_dir():
        raise ConfigError(f"{path} is a run's folder: its model is {path / 'model'}")
    if has_checkpoint(path) or (path / "results.json").is_file():
        raise ConfigError(f"{path} is a run's folder with no model yet (it stopped before its end): finish it with "
                          "--resume, or give a model folder")


def load_backbone(path: str | Path, with_sid: bool = True) -> tuple[DiffusionBackbone, dict]:
    """Load a backbone written by :func:`save_backbone`, a diffusers ``DiTTransformer2DModel`` directory
    (``config.json`` with ``_class_name`` and ``diffusion_pytorch_model.safetensors``) or a Stable Diffusion
    pipeline directory (``unet/``, ``text_encoder/``, ``tokenizer/``) from local disk."""
    from .text_unet import is_text_unet_dir, load_text_unet

    path = Path(path)
    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        return load_official_dit(path)
    if is_text_unet_dir(path):
        return load_text_unet(path, with_sid)
    cfg_file = path / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path}: no such model directory")
    if path.is_file():  # say, RUN/model/config.json
        raise ConfigError(f"{path} is a file; give the model directory that holds it"
                          + (f" ({path.parent})" if (path.parent / CONFIG_FILE).is_file() else ""))
    _refuse_run_folder(path)
    if not cfg_file.is_file():
        raise ConfigError(f"{path} is not a model directory: {CONFIG_FILE} is missing")
    meta = read_json_object(cfg_file, "model config")
    if meta.get("_class_name") in ("DiTTransformer2DModel", "Transformer2DModel"):
        return _load_diffusers_dit(path, meta)
    if meta.get("format") != "autoprog-diffusion/1":
        hint = ("; it is an image classifier: fine-tune it with 'autoprog finetune --task classification --base "
                f"{path}'" if str(meta.get("format", "")).startswith("autoprog-classifier/")
                or isinstance(meta.get("architecture"), str) else "")
        raise ConfigError(f"{cfg_file} is neither an autoprog diffusion model nor a diffusers DiT{hint}")
    check_model_config(meta, str(cfg_file))
    model = build_backbone(meta["kind"], **meta["config"])
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{path} has a config but no weights: {WEIGHTS_FILE} is missing")
    state = read_weights(weights)
    if meta.get("sid_stages") and with_sid:  # a model trained with SID dropout also has its null-stage row
        rows = state["sid.embedding.weight"].shape[0] if "sid.embedding.weight" in state else meta["sid_stages"]
        model.add_stage_identifier(meta["sid_stages"], init="zero", null_row=rows > meta["sid_stages"])
    if not with_sid:
        state = {k: v for k, v in state.items() if not k.startswith("sid.")}
    if meta.get("extras"):  # a model fine-tuned with Adapter or VPT-Deep keeps those modules
        from .extras import install_extras

        install_extras(model, meta["extras"], f"{cfg_file}: extras")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: weights of another architecture
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ConfigError(f"{path} does not match its config: {lines[1] if len(lines) > 1 else lines[0]}") from e
    if missing or unexpected:
        raise ConfigError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, meta


# ------------------------------------------------------------------------------------- the official DiT
OFFICIAL_SUFFIXES = (".pt", ".pth")
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, -B, -L, -XL: heads are not in the weights
_OFFICIAL_NAMES = {"x_embedder.proj.": "x_embedder.", "t_embedder.mlp.0.": "t_embedder.linear_1.",
                   "t_embedder.mlp.2.": "t_embedder.linear_2.", "y_embedder.embedding_table.": "y_embedder."}


def load_official_dit(path: Path) -> tuple[DiT, dict]:
    """A checkpoint of the official DiT code (facebookresearch/DiT): ``DiT-XL-2-256x256.pt`` (a plain state dict)
    or a ``train.py`` checkpoint (its ``ema`` weights), read safely (``weights_only``). The architecture follows
    from the weights (heads from the official model sizes); a learned-sigma model keeps its variance half too
    (``learn_sigma``: ``forward`` returns ε, which is what autoprog samples with, DDIM setting the variance; the
    variance head trains only with ``--hybrid-loss``); the fixed position embedding must equal the one autoprog
    computes."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py saves its arguments beside
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused (not weights only), truncated or not a torch file
        raise ConfigError(f"{path} cannot be read as a DiT state dict ({first_line(e)[:150]})") from None
    if isinstance(state, dict) and isinstance(state.get("ema", state.get("model")), dict):
        state = state.get("ema", state.get("model"))
    need = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight", "pos_embed")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ConfigError(f"{path} is not an official DiT checkpoint (it lacks {', '.join(need)})")
    w = state["x_embedder.proj.weight"]
    hidden, chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    if hidden not in OFFICIAL_HEADS:
        raise ConfigError(f"{path}: a DiT {hidden} wide is none of the official sizes ({', '.join(map(str, OFFICIAL_HEADS))}); "
                          "its number of heads is unknown")
    tokens = int(state["pos_embed"].shape[1])
    grid = round(tokens ** 0.5)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    config = dict(image_size=grid * patch, patch_size=patch, in_chans=chans,
                  num_classes=int(state["y_embedder.embedding_table.weight"].shape[0]) - 1, hidden_size=hidden,
                  depth=depth, num_heads=OFFICIAL_HEADS[hidden],
                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    out = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
    learned_sigma = out == 2 * chans
    if out not in (chans, 2 * chans):
        raise ConfigError(f"{path}: its final layer predicts {out} channels per pixel for {chans} input channels")
    if learned_sigma:
        config["learn_sigma"] = True
    model = DiT(**config)
    ours = {}
    for k, v in state.items():
        if k == "pos_embed":
            continue
        for old, new in _OFFICIAL_NAMES.items():
            k = k.replace(old, new) if k.startswith(old) else k
        ours[k] = v
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not match the DiT its weights describe: {first_line(e)[:150]}") from None
    pos = model._pos_embed(grid, grid, torch.device("cpu"), torch.float32)
    if not torch.allclose(pos, state["pos_embed"].float(), atol=1e-5):
        raise ConfigError(f"{path}: its position embedding is not the fixed sin-cos one autoprog computes")
    check_finite(model.parameters(), path)
    return model, {"kind": "dit", "source": str(path), "config": config, "learned_sigma": learned_sigma,
                   "format": "official DiT"}


# what an autoprog model's config.json holds, beside the backbone's own arguments under "config"
MODEL_FIELDS = {"format": str, "kind": str, "config": dict, **SAVED_META_FIELDS}


def check_model_config(meta: dict, where: str) -> None:
    """One-line errors for a model ``config.json`` that would not build: a key of the wrong type, an unknown
    backbone or argument, a size that is not positive."""
    import inspect

    check_fields(meta, MODEL_FIELDS, where, required=("kind", "config"))
    builders = {"dit": DiT, "diffusers-dit": DiffusersDiT}
    if meta["kind"] not in builders:
        raise ConfigError(f"{where}: kind must be one of {', '.join(builders)}, got {meta['kind']!r}")
    params = inspect.signature(builders[meta["kind"]].__init__).parameters
    for key, value in meta["config"].items():
        if key == "mlp_ratio" and meta["kind"] != "dit":
            continue  # build_backbone drops it
        if key not in params or key in ("self", "model"):
            raise ConfigError(f"{where}: config: unknown argument {key!r} of a {meta['kind']} backbone")
        kind = {"int": int, "float": float, "bool": bool}.get(str(params[key].annotation))
        if kind is not None:
            check_value(value, kind, f"{where}: config: {key}")
            if kind is not bool and value <= 0:
                raise ConfigError(f"{where}: config: {key} must be positive, got {value}")
    if meta.get("sid_stages", 0) < 0:
        raise ConfigError(f"{where}: sid_stages must be 0 or more, got {meta['sid_stages']}")


def _load_diffusers_dit(path: Path, meta: dict) -> tuple[DiffusersDiT, dict]:
    """A diffusers DiT directory; older checkpoints (the official DiT-XL/2's) name their class
    ``Transformer2DModel``, which is a DiT when its ``norm_type`` is ``ada_norm_zero``."""
    from diffusers import DiTTransformer2DModel

    if meta["_class_name"] == "Transformer2DModel" and meta.get("norm_type") != "ada_norm_zero":
        raise ConfigError(f"{path} holds a Transformer2DModel with norm_type {meta.get('norm_type')!r}: "
                          "autoprog reads it only as a DiT (norm_type 'ada_norm_zero')")
    try:
        inner = DiTTransformer2DModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"cannot load the DiT in {path}: {first_line(e)}") from None
    check_finite(inner.parameters(), path)
    return DiffusersDiT(model=inner), {"kind": "diffusers-dit", "source": str(path)}


def num_parameters(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


__all__ = ["BACKBONES", "DiT", "DiffusersDiT", "DiffusionBackbone", "build_backbone",
           "load_backbone", "save_backbone", "num_parameters"]
