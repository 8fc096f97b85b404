"""autoprog in your own loop: ProgressiveLoop drives the same controllers as the trainers, through the protocol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from autoprog.algorithms.autoprog_one import AutoProgOne, AutoProgOneConfig
from autoprog.algorithms.autoprog_zero import AutoProgZero
from autoprog.controllers import GrowthServices, ZeroShotServices
from autoprog.errors import ConfigError
from autoprog.loop import ProgressiveLoop, ProxyData
from autoprog.models.dit import DiT
from autoprog.schedules import prog

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _batches(n=4, res=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, res, res, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _proxy():
    return ProxyData(_batches(), loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def _run(loop, model, optimizer, data, start=0, stop=None):
    for i in range(start, loop.total_steps if stop is None else stop):
        x, y = data[i % len(data)]
        loop.before_step()
        loss = F.cross_entropy(model(loop.resize(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop.after_step(loss)


@pytest.mark.parametrize("mode", ["carry", "reset"])
def test_growing_follows_prog_and_moves_optimizer_state_with_the_weights_or_clears_it(mode):
    """By default (``carry``) each copied block's moments move with its weights; ``reset`` (the official code's)
    clears the optimizer's state at a growth that adds blocks."""
    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop = ProgressiveLoop.growing(model, opt, 16, log=lambda s: None,
                                   **({"optimizer_at_growth": "reset"} if mode == "reset" else {}))
    assert isinstance(loop, GrowthServices) and isinstance(loop, ZeroShotServices)
    data = _batches()
    seen, checked = [], 0
    for i in range(16):
        x, y = data[i % 4]
        before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                  if p in opt.state}
        if loop.before_step() and loop.stage > 0:
            grown = loop.stage_log[-1]["growth"]["block_map"]
            names = dict(model.named_parameters())
            if mode == "reset" and any(int(d) != s for d, s in grown.items()):
                assert not opt.state, "a growth that adds blocks starts a fresh optimizer"
                checked += 1
            for dst, src in grown.items() if mode == "carry" else ():
                if src is not None and int(dst) != src:
                    for n in [n for n in before if n.startswith(f"model.blocks.{src}.")]:
                        moved = n.replace(f"blocks.{src}.", f"blocks.{dst}.", 1)
                        assert torch.equal(opt.state[names[moved]]["exp_avg"], before[n]["exp_avg"]), moved
                        checked += 1
        seen.append(loop.subnet)
        x = loop.resize(x)
        assert x.shape[-1] == loop.resolution
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loop.after_step(loss)
    assert checked > 0, "no copied block was checked"
    want = [s.subnet for s in prog(model.growth_space()).stages]
    assert list(dict.fromkeys(seen)) == want
    assert loop.schedule().to_dict()["stages"] == prog(model.growth_space()).to_dict()["stages"]


@pytest.mark.parametrize("make", [
    lambda s: AutoProgZero(s), lambda s: AutoProgOne(s, AutoProgOneConfig(search_epochs=1, search_samples=16)),
    lambda s: AutoProgZero(s, criterion="gain"),
    lambda s: AutoProgOne(s, AutoProgOneConfig(search_epochs=1, search_samples=16, criterion="gain"))])
def test_searches_run_in_your_own_loop(make):
    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    space = model.growth_space()
    loop = ProgressiveLoop.growing(model, opt, 32, schedule=make(space), proxy=_proxy(), steps_per_epoch=4,
                                   log=lambda s: None)
    _run(loop, model, opt, _batches())
    stages = loop.schedule().stages
    assert len(stages) == 4 and stages[-1].subnet == space.full
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unfreezing_trains_only_the_learnable_blocks():
    torch.manual_seed(0)
    model = DiT(image_size=8, patch_size=2, in_chans=1, num_classes=3, hidden_size=16, depth=4, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop = ProgressiveLoop.unfreezing(model, opt, 8, schedule="4x1,8x4", log=lambda s: None)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop.before_step()
    assert loop.resolution == 4
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("blocks.0", "blocks.1", "blocks.2")) or "blocks" not in n for n in frozen)
    x = loop.resize(torch.randn(4, 1, 8, 8))
    model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 3, (4,))).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(first[n], dict(model.named_parameters())[n]) for n in frozen), "frozen weights moved"
    assert all(dict(model.named_parameters())[n] not in opt.state for n in frozen), "frozen weights got state"


def test_clear_errors_for_misuse():
    with pytest.raises(ConfigError, match="elastic"):
        ProgressiveLoop.growing(torch.nn.Linear(2, 2), None, 10)
    model = tiny_vit()
    with pytest.raises(ConfigError, match="proxy=ProxyData"):
        ProgressiveLoop.growing(model, None, 16, schedule=AutoProgZero(model.growth_space()), log=lambda s: None
                                ).before_step()
    with pytest.raises(ConfigError, match="total_steps"):
        ProgressiveLoop.growing(model, None, 0)


def _example(name, *args):
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("schedule", ["autoprog-zero", "prog"])
def test_own_loop_pretrain_example_runs(schedule):
    out = _example("own_loop_pretrain.py", "--steps", 40, "--schedule", schedule)
    assert "schedule:" in out and "top-1" in out


def test_own_loop_finetune_example_runs(fake_fmnist):
    out = _example("own_loop_finetune.py", "--steps", 12, "--data-root", fake_fmnist, "--schedule", "autoprog-zero")
    assert "schedule:" in out and "28px x6" in out


def test_a_search_with_rezero_gates_restores_structure_and_optimizer():
    """identity growth adds gates (new parameters, a new optimizer group); trying a candidate must undo both."""
    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop = ProgressiveLoop.growing(model, opt, 16, growth="identity", proxy=_proxy(), log=lambda s: None)
    _run_some = _batches()
    for i in range(5):  # into stage 2: gates exist now
        x, y = _run_some[i % 4]
        loop.before_step()
        F.cross_entropy(model(loop.resize(x)), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loop.after_step()
    gated, groups = model.gated_blocks(), len(opt.param_groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with loop.try_candidate(model.full_subnet) as task:
        assert not task.model.training
        assert len(model.gated_blocks()) > len(gated)
    assert model.gated_blocks() == gated and len(opt.param_groups) == groups
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng), "scoring a candidate draws no training randomness"
    own = model.forward
    model._original_forward, model.forward = own, lambda *a: None  # as Accelerate's prepare_model under bf16
    training_forward = model.forward
    with loop.try_candidate(model.full_subnet) as task:
        assert task.model.forward == own, "the proxies run the model's own forward (fp32), not the autocast one"
    assert model.forward is training_forward
    del model.forward, model._original_forward


def _resumable_run(make, growth, total, stop=None, state=None):
    """Run a growing loop to ``stop`` (returning everything a user saves) or, from ``state``, to the end."""
    import io

    torch.manual_seed(0)
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop = ProgressiveLoop.growing(model, opt, total, schedule=make(model.growth_space()), growth=growth,
                                   proxy=_proxy(), steps_per_epoch=4, log=lambda s: None)
    start = 0
    if state is not None:
        saved = torch.load(io.BytesIO(state), weights_only=False)
        loop.load_state_dict(saved["loop"])  # first: the structure the weights and moments belong to
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        start = loop.step
    _run(loop, model, opt, _batches(), start, stop)
    if stop is not None:
        buf = io.BytesIO()
        torch.save({"loop": loop.state_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state()}, buf)
        return buf.getvalue(), loop
    return model, loop


@pytest.mark.parametrize("growth, stop", [("mogrow", 10), ("identity", 10), ("identity", 20)])
def test_a_loop_resumes_mid_search_bit_identically(growth, stop):
    """Stopped in stage 2's supernet phase (10) or after the second growth (20: identity growth's gates have
    changed since the first), resumed, it ends where the whole run did."""
    # alpha 0: the choice turns on the candidates' losses only, never on a timing
    make = lambda s: AutoProgOne(s, AutoProgOneConfig(search_fraction=0.5, search_min_updates=1,  # noqa: E731
                                                      search_samples=16, alpha=0.0))
    whole, whole_loop = _resumable_run(make, growth, 32)
    state, stopped = _resumable_run(make, growth, 32, stop=stop)
    assert stopped.controller.searching == (stop == 10), "10 falls inside a search"
    resumed, resumed_loop = _resumable_run(make, growth, 32, state=state)
    assert resumed_loop.schedule() == whole_loop.schedule()
    losses = [[c["loss"] for c in e.get("candidates", []) if "loss" in c] for e in whole_loop.stage_log]
    assert losses == [[c["loss"] for c in e.get("candidates", []) if "loss" in c] for e in resumed_loop.stage_log]
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_loop_state_of_another_kind_is_refused():
    torch.manual_seed(0)
    model = DiT(image_size=8, patch_size=2, in_chans=1, num_classes=3, hidden_size=16, depth=4, num_heads=2)
    loop = ProgressiveLoop.unfreezing(model, None, 8, log=lambda s: None)
    with pytest.raises(ConfigError, match="ProgressiveLoop state"):
        loop.load_state_dict({"step": 3})
    grown = ProgressiveLoop.growing(tiny_vit(), None, 8, log=lambda s: None)
    with pytest.raises(ConfigError, match="growing loop"):
        loop.load_state_dict(grown.state_dict())


def test_measured_step_times_use_the_timing_batch_of_your_real_size():
    """The first proxy batch (8 images) on a GPU times kernel launches; ``timing_batch`` times a real step."""
    from autoprog.space import SubNet

    seen = []

    def loss(m, b):
        seen.append(len(b[0]))
        return F.cross_entropy(m(b[0]), b[1])

    big = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    model = tiny_vit()
    for timing, want in ((None, 8), (big, 64)):
        loop = ProgressiveLoop.growing(model, torch.optim.AdamW(model.parameters()), 16,
                                       proxy=ProxyData(_batches(), loss=loss, timing_batch=timing))
        seen.clear()
        assert loop.measure_step_time(SubNet(16, 2)) > 0
        assert set(seen) == {want}
