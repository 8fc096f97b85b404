"""The official DiT code's checkpoints (``DiT-XL-2-256x256.pt``: a plain state dict; ``train.py``'s: ``ema``) load
as autoprog's DiT, read with ``weights_only``; a learned-sigma model keeps its variance half, which DiT's hybrid loss
(``--hybrid-loss``) trains."""

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
    if learned_sigma:  # the variance half is kept, in the official layout (channel fastest per pixel)
        model.variance_output = True
        with torch.no_grad():
            both = model(x, t, y)
        assert both.shape == (3, 8, 16, 16) and torch.allclose(both[:, :4], ref(x, t, y), atol=1e-5)
        w = state["final_layer.linear.weight"].view(4, 8, -1)[:, 4:]  # (p*p, variance channels, hidden)
        assert torch.equal(model.final_layer.linear.weight.view(4, 8, -1)[:, 4:], w)


def _schedule():
    from autoprog.diffusion.sampling import training_scheduler

    return training_scheduler()


def test_the_variational_bound_is_zero_for_the_true_posterior_and_the_closed_form_otherwise():
    import math

    from autoprog.diffusion.sampling import variational_bound

    sch = _schedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1, torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([1, 10, 50, 100])  # (later, β_t and β̃_t agree to float precision)
    xt = sch.add_noise(x0, noise, t)
    at_posterior = variational_bound(sch, x0, xt, t, noise, -torch.ones_like(x0))  # v = -1: log β̃_t exactly
    assert torch.allclose(at_posterior, torch.zeros(4), atol=1e-5)
    at_beta = variational_bound(sch, x0, xt, t, noise, torch.ones_like(x0))  # v = +1: log β_t
    b, ac = sch.betas.double(), sch.alphas_cumprod.double()
    post = b * (1 - torch.cat([ac.new_ones(1), ac[:-1]])) / (1 - ac)
    lb, lp = b[t].log(), post[t].log()
    want = 0.5 * (-1 + lb - lp + (lp - lb).exp()) / math.log(2)
    assert torch.allclose(at_beta.double(), want, rtol=1e-4) and (at_beta > 0).all()
    t0 = torch.zeros(4, dtype=torch.long)  # t = 0: the decoder's NLL of the bin of x0 (the mean is x0 exactly)
    x0q = torch.randint(1, 255, x0.shape, generator=g).float() / 127.5 - 1  # inside (-1, 1): no edge bins
    nll = variational_bound(sch, x0q, sch.add_noise(x0q, noise, t0), t0, noise, -torch.ones_like(x0))
    std = math.sqrt(float(post[1]))  # the clipped posterior variance at t = 0
    normal = torch.distributions.Normal(0.0, std)
    bits = -math.log2(float(normal.cdf(torch.tensor(1 / 255)) - normal.cdf(torch.tensor(-1 / 255))))
    assert torch.allclose(nll, torch.full((4,), bits), rtol=1e-2)


def test_the_bounds_terms_are_made_whatever_device_add_noise_left_the_schedule_on():
    """diffusers' ``add_noise`` moves ``alphas_cumprod`` to the batch's device (a GPU's) and leaves ``betas`` on the
    host: the posterior's terms must not mix the two (a GPU run's first hybrid-loss step raised). The meta device
    stands in for a GPU."""
    import autoprog.diffusion.sampling as sampling

    sch = _schedule()
    want = sampling._posterior_terms(sch, "cpu")
    sch2 = _schedule()
    sch2.add_noise(torch.zeros(1, 1, 2, 2, device="meta"), torch.zeros(1, 1, 2, 2, device="meta"),
                   torch.zeros(1, dtype=torch.long, device="meta"))
    assert sch2.alphas_cumprod.device.type == "meta" and sch2.betas.device.type == "cpu"
    got = sampling._posterior_terms(sch2, "cpu")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_hybrid_loss_trains_the_variance_head_and_only_through_the_bound():
    from autoprog.diffusion.sampling import diffusion_loss

    torch.manual_seed(0)
    m = DiT(image_size=8, patch_size=2, in_chans=2, num_classes=3, hidden_size=32, depth=1, num_heads=2,
            learn_sigma=True)
    for prm in m.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    x0, y = torch.rand(4, 2, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    sch = _schedule()
    rows = m.final_layer.linear.weight.view(4, 4, -1)  # (p*p, 2C, hidden): channels 2-3 are the variance's
    m.variance_output = True
    diffusion_loss(m, x0, y, sch, 3, generator=torch.Generator().manual_seed(1), variance=True).backward()
    grad = m.final_layer.linear.weight.grad.view(4, 4, -1)
    assert grad[:, 2:].abs().sum() > 0 and grad[:, :2].abs().sum() > 0
    m.zero_grad()
    m.variance_output = False  # the plain loss: the variance rows get nothing
    diffusion_loss(m, x0, y, sch, 3, generator=torch.Generator().manual_seed(1)).backward()
    assert m.final_layer.linear.weight.grad.view(4, 4, -1)[:, 2:].abs().sum() == 0
    assert rows.shape == (4, 4, 32)


def test_hybrid_loss_needs_a_learned_sigma(cli, tmp_path):
    rc, _, err = cli("finetune", "--method", "full", "--hybrid-loss", "--cpu", "--steps", "2", "--out", tmp_path / "h")
    assert rc == 2 and "--hybrid-loss trains a learned variance" in err and len(err.strip().splitlines()) == 1


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
