"""Text-to-image diffusion behind the backbone interface: a diffusers ``UNet2DConditionModel`` conditioned on a
``transformers.CLIPTextModel`` (Stable Diffusion's layout), with no edit to either library's classes.

The condition ``y`` is a batch of token ids ``(B, L)`` (the tokenizer's fixed length), so everything that moves,
drops or batches a class label moves, drops or batches a prompt the same way; the null condition of
classifier-free guidance is the empty prompt. The learnable units that progressive unfreezing spreads over the
depth are the UNet's down blocks, its mid block and its up blocks, in forward order.

The text SID (Sec. 4.1.2): each stage k gets a token ``[SIDk]`` of its own, added to the tokenizer, whose
embedding is a learnable row of :class:`StageIdentifier` (every other row of the text encoder's table stays
as it is); prompts get ``", [SIDk] stage"`` appended before the end-of-text token. An exported model writes
those rows into the text encoder's table and the tokens into its tokenizer, so any CLIP user can prompt it.

The text encoder is frozen in fine-tuning unless ``train_text_encoder``; a base model trains it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, first_line
from ..formats import check_fields, check_finite, read_json_object, read_weights
from .backbone import SAVED_META_FIELDS, DiffusionBackbone
from .sid import StageIdentifier

META_FILE = "autoprog.json"
FORMAT = "autoprog-text-unet/1"
SID_TEXT = ", [SID{k}] stage"  # the paper's "a [class noun], [SID] stage"
SUBFOLDERS = ("unet", "text_encoder", "tokenizer")


class TextUNet(DiffusionBackbone):
    """``UNet2DConditionModel`` + CLIP text encoder + tokenizer (see the module docstring)."""

    kind = "text-unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' own DreamBooth-LoRA targets

    def __init__(self, unet, text_encoder, tokenizer, train_text_encoder: bool = False):
        super().__init__()
        cfg = unet.config
        if cfg.cross_attention_dim != text_encoder.config.hidden_size:
            raise ConfigError(f"the UNet attends to {cfg.cross_attention_dim}-dim text features, the text encoder "
                              f"gives {text_encoder.config.hidden_size}")
        if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
            raise ConfigError(f"the tokenizer pads to {tokenizer.model_max_length} tokens, the text encoder has "
                              f"{text_encoder.config.max_position_embeddings} positions")
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.train_text_encoder = bool(train_text_encoder)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.config = dict(image_size=int(size), patch_size=2 ** (len(cfg.block_out_channels) - 1),
                           in_chans=int(cfg.in_channels), max_length=int(tokenizer.model_max_length))
        if cfg.out_channels != cfg.in_channels:
            raise ConfigError("only ε-prediction UNets (out_channels == in_channels) are supported; this one has "
                              f"{cfg.in_channels} in and {cfg.out_channels} out channels")
        self.noise_config: dict | None = None  # the pipeline's own noise schedule (scheduler/), when it has one
        self.sid = None
        self.register_buffer("_sid_lut", None, persistent=False)  # token id → stage (−1: not a SID token)
        self._sid_suffix: list[list[int]] = []
        self.register_buffer("null_ids", self.tokenize([""])[0], persistent=False)
        self.expect_conditions(None)  # no training prompts declared yet
        self.text_encoder.get_input_embeddings().register_forward_hook(self._sid_rows)

    # ------------------------------------------------------------------------------- the interface
    @property
    def blocks(self) -> list[nn.Module]:
        mid = [self.unet.mid_block] if self.unet.mid_block is not None else []
        return [*self.unet.down_blocks, *mid, *self.unet.up_blocks]

    @property
    def block_prefix(self) -> str:
        return "unet"

    @property
    def num_classes(self) -> int:
        raise ConfigError("a text-to-image model has prompts, not a class table")

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def branch_modules(self, i: int) -> dict[str, nn.Module]:
        """The layers ending unit ``i``'s residual branches (each resnet's ``conv2``, each transformer's
        ``proj_out``): DiffFit scales their outputs, which folds into their weights."""
        unit = self.blocks[i]
        out = {f"resnet{j}": r.conv2 for j, r in enumerate(getattr(unit, "resnets", []))}
        out.update({f"attn{j}": a.proj_out for j, a in enumerate(getattr(unit, "attentions", None) or [])})
        return out

    def class_embedding_modules(self) -> list[nn.Embedding]:
        return []

    def condition_parameters(self) -> list[nn.Parameter]:
        """The SID rows, and the text encoder when it trains: learnable in every method and stage."""
        params = [self.sid.embedding.weight] if self.sid is not None else []
        return params + (list(self.text_encoder.parameters()) if self.train_text_encoder else [])

    def resize_classes(self, num_classes: int) -> None:
        raise ConfigError("a text-to-image model has prompts, not a class table")

    def freeze_fixed(self) -> None:
        if not self.train_text_encoder:
            self.text_encoder.requires_grad_(False)

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        return self.null_ids.to(y.device).expand_as(y)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """diffusers' checkpointing of the UNet's blocks, and transformers' of the text encoder's layers (switched
        off only where it was on: nothing is called for a run that never asks for it)."""
        was = self.gradient_checkpointing
        super().set_gradient_checkpointing(on)
        text = self.text_encoder
        new_api = hasattr(text, "activation_checkpointing_enable")  # transformers 5; 4.x names it gradient_…
        if on:
            self.unet.enable_gradient_checkpointing()
            if new_api:
                text.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif was:
            self.unet.disable_gradient_checkpointing()
            if new_api:
                text.activation_checkpointing_disable()
            else:
                text.gradient_checkpointing_disable()

    # ---------------------------------------------------------------------------------------- text
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``(N, max_length)``, padded and truncated as Stable Diffusion's pipeline does."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def check_prompts(self, prompts, what: str) -> None:
        """Refuse ``prompts`` (a run's captions) of which two differ but reach the UNet as the same token ids, cut
        to the text encoder's length (less the room the longest stage identifier takes); warn once when any is cut.
        ``what`` names the option they come from."""
        from ..errors import warn

        length = self.tokenizer.model_max_length
        room = max((len(s) for s in self._sid_suffix), default=0) if self.sid is not None else 0
        keep = length - 1 - room  # tokens a prompt keeps, its start-of-text one included (with_sid, tokenize)
        beside = " beside the stage identifier" if room else ""
        eos, seen, cut = self.tokenizer.eos_token_id, {}, []
        for prompt in dict.fromkeys(prompts):
            ids = self.tokenizer(prompt, verbose=False).input_ids  # whole: no warning about its length
            ids = ids[:-1] if ids and ids[-1] == eos else ids
            if len(ids) > keep:
                cut.append(prompt)
            other = seen.setdefault(tuple(ids[:keep]), prompt)
            if other != prompt:
                raise ConfigError(f"{what}: the prompts {other!r} and {prompt!r} are the same in the {keep - 1} "
                                  f"tokens the text encoder reads{beside}; make them differ earlier (shorter, or the "
                                  "class name first)")
        if cut:
            warn(f"{what}: {len(cut)} prompt(s) longer than the {keep - 1} tokens the text encoder reads{beside} are "
                 f"cut, e.g. {cut[0]!r}", once=True)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states`` for token ids (the current stage's SID appended).

        While nothing in the text path learns, each distinct prompt is encoded once and cached (a run has a
        few prompts): the cache is keyed by the token ids and by the storage and version counter of every text
        weight, so any change to them (an optimizer or EMA step, a loaded checkpoint) makes it encode afresh.
        With autograd on (training steps, and the searches' and FLOPs counts' steps) the table of
        :meth:`expect_conditions` serves instead, where one is declared. Without autograd, the same ids tensor
        given again (a sampler's every step) gets the same encodings back, with no work and no read back to the
        host, while the text weights, device, autocast type and stage are unchanged."""
        random = self.text_encoder.training and self.text_encoder.config.attention_dropout > 0
        if torch.is_grad_enabled() or random or ids.is_inference():  # (inference tensors have no version counter)
            return self._encode_text(ids)
        key = (ids._version, self._text_version(ids))
        last = getattr(self, "_last_text", None)
        if last is not None and last[0] is ids and last[1] == key:
            return last[2]
        out = self._encode_text(ids)
        self._last_text = (ids, key, out)
        return out

    def forget_encodings(self) -> None:
        """Drop the encodings :meth:`encode_text` keeps for the ids tensor it was last given (a sampler calls this
        when it ends, so they do not stay on the device through training)."""
        self._last_text = None

    def encoded_rows(self, rows: int) -> int:
        """How many prompts a training step of ``rows`` rows runs a learnable text encoder on: the run's declared
        captions when they are fewer (each encoded once, see :meth:`_encode_text`), else every row."""
        return len(self._table) if self._encodes_table(rows) else rows

    def _text_params(self) -> list[nn.Parameter]:
        """The text path's parameters (the text encoder's, then the SID's), listed once per text encoder and SID
        (walking the text encoder's modules at every step costs Python a GPU step waits for)."""
        key = (self.text_encoder, self.sid, self.text_encoder.get_input_embeddings().weight)  # (a resized table: anew)
        cached = getattr(self, "_text_params_for", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            params = [*self.text_encoder.parameters(), *(self.sid.parameters() if self.sid is not None else ())]
            self._text_params_for = cached = (key, params)
        return cached[1]

    def _text_learnable(self) -> bool:
        return any(p.requires_grad for p in self._text_params())

    def _text_random(self) -> bool:
        return self.text_encoder.training and self.text_encoder.config.attention_dropout > 0

    def _encodes_table(self, rows: int) -> bool:
        """Whether a training step (autograd on) of ``rows`` rows encodes the declared captions once each."""
        return self._text_learnable() and not self._text_random() and self._table_fits(rows)

    def _table_fits(self, rows: int) -> bool:
        """Whether the run declared fewer captions than ``rows``."""
        return self._table is not None and len(self._table) < rows

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.with_sid(ids)
        learnable, random = self._text_learnable(), self._text_random()
        if learnable or random:
            grad = torch.is_grad_enabled() and learnable
            with torch.set_grad_enabled(grad):
                if grad and not random and self._table_fits(len(ids)):  # (as _encodes_table)
                    # a training step with fewer prompts in the run than rows in the batch: each prompt encoded
                    # once, its rows gathered (the same encodings; the gradients of a prompt's rows summed)
                    keys = self._table_keys(ids)
                    return self.text_encoder(keys).last_hidden_state[self._table_rows(ids, keys)]
                return self.text_encoder(ids).last_hidden_state
        if torch.is_grad_enabled() and self._table is not None:  # a training step
            return self._looked_up_text(ids)
        return self._cached_text(ids)

    def expect_conditions(self, conditions: torch.Tensor | None) -> None:
        """Declare the token ids ``(K, L)`` of which every training condition is a row (the run's captions; the
        empty prompt is added), or ``None``. While the text path is frozen, a step with autograd on then looks its
        prompts up in the encodings of that table on the device, with no read back to the host (the prompt cache
        of :meth:`encode_text` reads the ids back once per call). A row not in the table is counted
        (:meth:`unexpected_conditions`) for the trainer's health check, which raises on it."""
        self._table = None if conditions is None else torch.unique(
            torch.cat([conditions.cpu(), self.null_ids.cpu()[None]]), dim=0)
        self._table_version = self._table_states = self._misses = self._keys_for = None

    def unexpected_conditions(self) -> torch.Tensor | None:
        """How many training conditions were not rows of the declared table (a device count; None: none looked up)."""
        return self._misses

    def _text_version(self, ids: torch.Tensor) -> tuple:
        """What the encodings of ``ids`` depend on besides the ids: the text weights (their storage and version
        counters: an optimizer or EMA step or a loaded checkpoint changes them), the device, the autocast type
        and the SID's stage."""
        return (tuple((p.data_ptr(), p._version) for p in self._text_params()), str(ids.device),
                torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else None,
                self.sid.stage if self.sid is not None else None)

    @torch.no_grad()
    def _looked_up_text(self, ids: torch.Tensor) -> torch.Tensor:
        version = self._text_version(ids)
        if self._table_version != version:  # the table encoded once per weights (a frozen text path: once)
            self._table_states = self.text_encoder(self._table_keys(ids)).last_hidden_state
            self._table_version = version
        return self._table_states[self._table_rows(ids, self._table_keys(ids))]

    def _table_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """The declared table's token ids with the current stage's SID, on ``ids``' device (made once per stage
        and device, not copied at every step)."""
        key = (self.sid.stage if self.sid is not None else None, ids.device)
        if (getattr(self, "_keys_for", None) or (None,))[0] != key:
            self._keys_for = (key, self.with_sid(self._table.to(ids.device)))
        return self._keys_for[1]

    def _table_rows(self, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Each row of ``ids``' index in ``keys``, on the device; rows not in it are counted
        (:meth:`unexpected_conditions`) and given row 0."""
        match = (ids[:, None, :] == keys[None]).all(-1)  # (B, K)
        misses = (~match.any(1)).sum()
        self._misses = misses if self._misses is None else self._misses + misses
        return match.int().argmax(1)

    @torch.no_grad()
    def _cached_text(self, ids: torch.Tensor) -> torch.Tensor:
        version = self._text_version(ids)
        if getattr(self, "_text_cache_version", None) != version or len(self._text_cache) > 256:
            self._text_cache, self._text_cache_version = {}, version
        rows, inverse = torch.unique(ids, dim=0, return_inverse=True)
        keys = [r.tobytes() for r in rows.cpu().numpy()]  # one copy to the host, not one per prompt
        todo = [i for i, k in enumerate(keys) if k not in self._text_cache]
        if todo:
            for i, h in zip(todo, self.text_encoder(rows[todo]).last_hidden_state):
                self._text_cache[keys[i]] = h.clone()  # not a view that keeps the whole batch alive
        return torch.stack([self._text_cache[k] for k in keys])[inverse]

    def with_sid(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` with the current stage's ``", [SIDk] stage"`` before each prompt's end-of-text token
        (the prompt is cut short when there is no room)."""
        if self.sid is None:
            return ids
        suffix = self._sid_suffix[self.sid.stage]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        length, n = ids.shape[1], len(suffix)
        keep = length - 1 - n  # room left for the prompt (BOS included) before suffix + EOS
        # every row at once, on the device (no per-prompt read back to the host)
        pos = torch.arange(length, device=ids.device).expand_as(ids)
        end = torch.where(ids == eos, pos, length).min(dim=1, keepdim=True).values.clamp(max=keep)
        key = (self.sid.stage, ids.device, ids.dtype)
        if getattr(self, "_sid_tail", (None,))[0] != key:  # made once per stage, not copied at every step
            self._sid_tail = (key, torch.tensor([*suffix, eos], dtype=ids.dtype, device=ids.device))
        tail = self._sid_tail[1]
        out = torch.where(pos < end, ids, eos if pad is None else pad)
        inside = (pos >= end) & (pos <= end + n)
        return torch.where(inside, tail[(pos - end).clamp(0, n)], out)

    def _sid_rows(self, module, args, out):
        """Forward hook on the token embedding: SID tokens take their learnable rows."""
        if self.sid is None:
            return out
        ids = args[0]
        stage = self._sid_lut[ids.clamp(max=len(self._sid_lut) - 1)]
        is_sid = stage >= 0  # no early return on "none": reading that back would wait for the device
        rows = self.sid.embedding.weight[stage.clamp(min=0)].to(out.dtype)
        return torch.where(is_sid.unsqueeze(-1), rows, out)

    def add_stage_identifier(self, num_stages: int) -> StageIdentifier:
        """Tokens ``[SID1]``…``[SIDn]`` (added to the tokenizer when new) with learnable rows, initialised to the
        embedding the table already has for them (new tokens: the mean row, a neutral word)."""
        tokens = [f"[SID{k + 1}]".lower() for k in range(num_stages)]  # CLIP lowercases prompts, so the table does
        vocab = self.tokenizer.get_vocab()
        self.tokenizer.add_tokens([t for t in tokens if t not in vocab])
        if len(self.tokenizer) > self.text_encoder.get_input_embeddings().num_embeddings:
            old = self.text_encoder.get_input_embeddings().num_embeddings
            self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            table = self.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[old:] = table[:old].mean(0)  # the module (and its hook) stays: only its weight grew
        table = self.text_encoder.get_input_embeddings().weight
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in tokens]
        if len(set(ids)) != num_stages or self.tokenizer.unk_token_id in ids:
            raise ConfigError(f"the tokenizer cannot hold the stage identifiers {tokens}")
        self.sid = StageIdentifier(num_stages, self.hidden_size, init="zero").to(table.device)  # rows set below
        with torch.no_grad():
            self.sid.embedding.weight.copy_(table[ids])
        lut = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        lut[ids] = torch.arange(num_stages)
        self._sid_lut = lut.to(table.device)
        self._sid_suffix = [self.tokenizer(SID_TEXT.format(k=k + 1), add_special_tokens=False).input_ids
                            for k in range(num_stages)]
        if any(len(s) >= self.config["max_length"] - 2 for s in self._sid_suffix):
            raise ConfigError(f"prompts of {self.config['max_length']} tokens leave no room for the stage identifier")
        return self.sid

    def bake_stage_identifier(self) -> None:
        """Write the SID rows into the text encoder's table and drop the module (for export)."""
        if self.sid is None:
            return
        table = self.text_encoder.get_input_embeddings().weight
        ids = (self._sid_lut >= 0).nonzero().flatten()
        with torch.no_grad():
            table[ids] = self.sid.embedding.weight[self._sid_lut[ids]].to(table.dtype)
        self.sid = None

    def prompt_suffix(self) -> str:
        """What an exported model's prompts end with (the last stage's SID), or '' without one."""
        return SID_TEXT.format(k=self.sid.stage + 1) if self.sid is not None else ""

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.ndim != 2:
            raise ConfigError(f"a text-to-image model is conditioned on token ids (B, L), got shape {tuple(y.shape)}")
        t = t.reshape(-1).expand(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=self.encode_text(y)).sample

    # -------------------------------------------------------------------------------------- LoRA
    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """LoRA on the UNet's attention projections through diffusers' ``add_adapter`` (peft)."""
        from peft import LoraConfig

        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                         target_modules=list(self.lora_targets)))

    def lora_layers(self) -> dict[str, torch.Tensor] | None:
        """The UNet's LoRA weights in diffusers' format (what ``pipe.load_lora_weights`` reads), or None."""
        if not getattr(self.unet, "_hf_peft_config_loaded", False):
            return None
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))


# ---------------------------------------------------------------------------------------- build / io
@contextmanager
def _quiet():
    """No per-shard progress bars from transformers while a model directory is read or written."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def build_text_unet(image_size: int = 28, in_chans: int = 1, channels: tuple[int, ...] = (16, 32),
                    text_dim: int = 64, text_layers: int = 2, vocabulary: list[str] | None = None,
                    max_length: int = 16, tokenizer=None) -> TextUNet:
    """A small UNet + CLIP text encoder from sizes (random weights), for a base model autoprog trains itself.

    Without ``tokenizer``, one is written for ``vocabulary`` (see :func:`word_tokenizer`)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if len(channels) < 2:
        raise ConfigError("a UNet needs at least two levels (--channels 32,64)")
    if image_size % 2 ** (len(channels) - 1):
        raise ConfigError(f"image size {image_size} is not divisible by {2 ** (len(channels) - 1)}, the UNet's "
                          f"downsampling over {len(channels)} levels")
    groups = min(16, *channels)
    if any(c % groups for c in channels):
        raise ConfigError(f"--channels {channels}: every level must be divisible by {groups} (group norm)")
    if tokenizer is None:
        tokenizer = word_tokenizer(vocabulary or [], max_length)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(sample_size=image_size, in_channels=in_chans, out_channels=in_chans,
                                layers_per_block=1, block_out_channels=tuple(channels), down_block_types=down,
                                up_block_types=up, cross_attention_dim=text_dim, attention_head_dim=8,
                                norm_num_groups=groups)
    vocab = tokenizer.get_vocab()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=text_layers, num_attention_heads=max(1, text_dim // 32),
        max_position_embeddings=max_length, bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.pad_token]))
    return TextUNet(unet, text, tokenizer, train_text_encoder=True)


def word_tokenizer(words: list[str], max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary is ``words`` (one token each where BPE allows) plus every letter,
    digit and common punctuation mark, so any text tokenizes; written to a temporary directory and loaded
    from it, as any CLIP tokenizer is."""
    import tempfile

    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789-,.'!?&/()") | {c for w in words for c in w.lower()})
    vocab: dict[str, int] = {}
    for tok in specials + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words if len(w) > 1):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def is_text_unet_dir(path: str | Path) -> bool:
    return (Path(path) / "unet" / "config.json").is_file()


def load_text_unet(path: str | Path, with_sid: bool = True) -> tuple[TextUNet, dict]:
    """Load a Stable Diffusion pipeline directory (``unet/``, ``text_encoder/``, ``tokenizer/``; ``vae/`` is the
    latent codec's business) or one autoprog exported, from local disk only; problems are one-line errors."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ConfigError(f"{root} is not a Stable Diffusion pipeline directory: {', '.join(missing)}/ missing")
    meta = {}
    if (root / META_FILE).is_file():
        meta = read_json_object(root / META_FILE, "model settings")
        check_fields(meta, SAVED_META_FIELDS, str(root / META_FILE))
    try:
        with _quiet():
            unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
            text = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True)
            tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"cannot load the pipeline in {root}: {first_line(e)}") from None
    for name, module in (("unet", unet), ("text_encoder", text)):
        check_finite(module.parameters(), root / name)
    model = TextUNet(unet, text, tok)
    model.noise_config = _noise_config(root)
    stages = int(meta.get("sid_stages") or 0)
    if stages and with_sid:
        model.add_stage_identifier(stages)  # the baked rows become the identifiers again
    if meta.get("extras"):  # Adapter / VPT-Deep: their modules, beside the pipeline's folders
        _load_extras(model, meta["extras"], root)
    info = {"kind": TextUNet.kind, "source": str(root), **meta}
    if (root / "vae" / "config.json").is_file() and not meta.get("vae"):
        info["vae"] = str(root)
    return model, info


EXTRAS_FILE = "extras.safetensors"  # an Adapter / VPT-Deep model's own modules (diffusers' folders lack them)


def _load_extras(model: TextUNet, settings: dict, root: Path) -> None:
    from .extras import install_extras

    module = install_extras(model, settings, f"{root / META_FILE}: extras")
    file = root / EXTRAS_FILE
    if not file.is_file():
        raise ConfigError(f"{root} was fine-tuned with {settings['kind']} but {EXTRAS_FILE} is missing")
    state = read_weights(file)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{file} does not match {META_FILE}'s extras: {first_line(e)}") from None


def _noise_config(root: Path) -> dict | None:
    """The pipeline's training noise schedule (``scheduler/scheduler_config.json``; Stable Diffusion's is a scaled
    linear β), refusing what autoprog cannot train: anything but ε-prediction (SD 2.x 768 px is v-prediction)."""
    file = root / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    cfg = read_json_object(file, "scheduler config")
    kind = cfg.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise ConfigError(f"{root} predicts {kind!r}; autoprog trains ε-prediction models only")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def save_text_unet(model: TextUNet, path: str | Path, extra: dict | None = None, vae=None,
                   scheduler=None) -> Path:
    """Write ``model`` as a pipeline directory: ``unet/``, ``text_encoder/`` (SID rows baked in), ``tokenizer/``,
    ``scheduler/`` (when given) and ``autoprog.json``; with ``vae`` (and a ``scheduler``) a whole
    ``StableDiffusionPipeline`` directory that ``StableDiffusionPipeline.from_pretrained`` loads. Changes
    ``model`` (the SID is baked): pass a copy."""
    if vae is not None and scheduler is None:
        raise ConfigError("a Stable Diffusion pipeline directory needs a scheduler")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stages = model.sid.num_stages if model.sid is not None else 0
    suffix = model.prompt_suffix()
    model.bake_stage_identifier()
    with _quiet():
        _write_pipeline(model, path, scheduler, vae)
    if getattr(model, "extras", None) is not None:
        from ..checkpoint import save_tensors

        save_tensors({k: v.detach().contiguous().cpu() for k, v in model.extras.state_dict().items()},
                  str(path / EXTRAS_FILE))
    meta = {"format": FORMAT, "kind": model.kind, "config": model.config, "sid_stages": stages,
            "prompt_suffix": suffix, **(extra or {})}
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _write_pipeline(model: TextUNet, path: Path, scheduler, vae) -> None:
    if vae is not None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=model.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(path))
    else:
        model.unet.save_pretrained(str(path / "unet"))
        model.text_encoder.save_pretrained(str(path / "text_encoder"))
        model.tokenizer.save_pretrained(str(path / "tokenizer"))
        if scheduler is not None:
            scheduler.save_pretrained(str(path / "scheduler"))
