"""The official DiT code's checkpoints (``DiT-XL-2-256x256.pt``: a plain state dict; ``train.py``'s: ``ema``) load
as autoprog's DiT, read with ``weights_only``; a learned-sigma model keeps its ε half."""

from __future__ import annotations

import pytest
import torch

from autoprog.errors import ConfigError
from autoprog.models.dit import DiT, load_backbone


def _official(model: DiT, learned_sigma: bool) -> dict:
    """``model``'s weights under the official code's names, as its DiT class would hold them."""
    names = {"x_embedder.": "x_embedder.proj.", "t_embedder.linear_1.": "t_embedder.mlp.0.",
             "t_embedder.linear_2.": "t_embedder.mlp.2.", "y_embedder.": "y_embedder.embedding_table."}
    out = {}
    for k, v in model.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(ours, theirs) if k.startswith(ours) else k
        out[k] = v.clone()
    p, c = model.patch_size, model.in_chans
    if learned_sigma:  # interleave a variance channel block after each pixel's ε channels
        w, b = out["final_layer.linear.weight"], out["final_layer.linear.bias"]
        w2 = torch.randn(p * p, 2 * c, w.shape[1])
        b2 = torch.randn(p * p, 2 * c)
        w2[:, :c], b2[:, :c] = w.view(p * p, c, -1), b.view(p * p, c)
        out["final_layer.linear.weight"], out["final_layer.linear.bias"] = w2.reshape(-1, w.shape[1]), b2.reshape(-1)
    g = model.image_size // p
    out["pos_embed"] = model._pos_embed(g, g, torch.device("cpu"), torch.float32).clone()
    return out


@pytest.mark.parametrize("learned_sigma, wrap", [(True, None), (False, "ema")])
def test_an_official_checkpoint_loads_and_predicts_the_same_epsilon(tmp_path, learned_sigma, wrap):
    torch.manual_seed(0)
    ref = DiT(image_size=16, patch_size=2, in_chans=4, num_classes=7, hidden_size=384, depth=2, num_heads=6)
    for prm in ref.parameters():  # the zero-initialised gates would hide a wrong mapping
        torch.nn.init.normal_(prm, std=0.05)
    state = _official(ref, learned_sigma)
    f = tmp_path / "DiT-S-2.pt"
    import argparse

    torch.save({wrap: state, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")} if wrap else state, f)
    model, meta = load_backbone(f)
    assert meta["learned_sigma"] is learned_sigma and meta["config"]["num_heads"] == 6
    assert (model.image_size, model.patch_size, model.in_chans, model.num_classes) == (16, 2, 4, 7)
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 7])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), ref(x, t, y), atol=1e-5)


def test_what_is_not_an_official_checkpoint_is_one_line(tmp_path):
    ref = DiT(image_size=8, patch_size=2, in_chans=4, num_classes=3, hidden_size=384, depth=1, num_heads=6)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read as a DiT state dict"):
        load_backbone(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not an official DiT checkpoint"):
        load_backbone(tmp_path / "other.pt")
    state = _official(ref, False)
    state["pos_embed"] = state["pos_embed"] + 1
    torch.save(state, tmp_path / "pos.pt")
    with pytest.raises(ConfigError, match="position embedding"):
        load_backbone(tmp_path / "pos.pt")
    state = _official(DiT(image_size=8, patch_size=2, in_chans=4, num_classes=3, hidden_size=96, depth=1,
                          num_heads=4), False)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match="none of the official sizes"):
        load_backbone(tmp_path / "odd.pt")
