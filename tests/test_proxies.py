"""Zero-shot proxies of AutoProg-Zero (Eq. 16-19): NTK condition number, ZiCo, step time, ranked voting."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from autoprog.algorithms.proxies import (
    NOISE_RTOL,
    PAPER_WEIGHTS,
    TIME_RTOL,
    autoprog_zero_vote,
    learnable_parameters,
    ntk_condition_number,
    ranked_vote,
    tie_within,
    zico,
)
from autoprog.errors import ConfigError
from autoprog.steptime import measure_step_time


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def samples(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference_kappa(model: nn.Module, x: torch.Tensor, names: list[str]) -> float:
    """kappa from the full Jacobian over a flat vector of the ``names`` parameters (the rest held fixed)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def outputs(vec):
        chunks = vec.split([s.numel() for s in shapes])
        override = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, {**params, **override}, (x,)).sum(dim=1)  # one scalar per sample

    jac = jacrev(outputs)(flat)  # (N, P)
    eig = torch.linalg.eigvalsh(jac @ jac.T)
    return (eig[-1] / eig[0]).item()


def assert_no_grads(model: nn.Module) -> None:
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- NTK condition number (Eq. 16)


def test_ntk_condition_number_matches_the_full_jacobian():
    model, x = mlp(), samples(6)
    got = ntk_condition_number(model, [x[:4], x[4:]])
    all_names = [n for n, _ in model.named_parameters()]
    assert got == pytest.approx(reference_kappa(model, x, all_names), rel=1e-6)
    assert 1 < got < math.inf
    assert_no_grads(model)


def test_ntk_takes_at_most_max_samples_and_forwards_no_more_batches_than_needed():
    model, x = mlp(), samples(12)
    calls = []

    def forward(m, batch):
        calls.append(len(batch))
        return m(batch)

    got = ntk_condition_number(model, [x[:4], x[4:8], x[8:]], forward=forward, max_samples=6)
    assert calls == [4, 4]
    names = [n for n, _ in model.named_parameters()]
    assert got == pytest.approx(reference_kappa(model, x[:6], names), rel=1e-6)


def test_only_learnable_parameters_count():
    model, x = mlp(), samples(6)
    full = ntk_condition_number(model, [x])
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert [n for n, _ in learnable_parameters(model)] == ["2.weight", "2.bias"]
    frozen = ntk_condition_number(model, [x])
    assert frozen == pytest.approx(reference_kappa(model, x, ["2.weight", "2.bias"]), rel=1e-6)
    assert frozen != pytest.approx(full, rel=1e-3)


def test_explicit_params_are_made_learnable_only_during_the_measurement():
    model, x = mlp(), samples(6)
    for p in model.parameters():
        p.requires_grad_(False)
    got = ntk_condition_number(model, [x], params=list(model[2].parameters()))
    assert got == pytest.approx(reference_kappa(model, x, ["2.weight", "2.bias"]), rel=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_ntk_runs_in_the_models_mode_and_leaves_grads_alone():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    model.eval()
    marker = torch.ones_like(model[0].bias)
    model[0].bias.grad = marker.clone()
    x = samples(4)
    assert ntk_condition_number(model, [x]) == ntk_condition_number(model, [x])  # eval: no dropout
    assert not model.training
    assert torch.equal(model[0].bias.grad, marker) and model[2].weight.grad is None


@pytest.mark.parametrize(
    "case",
    ["more_samples_than_params", "duplicate_samples", "no_learnable_params", "nan", "zero_gradient"],
)
def test_ntk_degenerate_kernels_rank_worst(case):
    if case == "more_samples_than_params":  # 2 parameters, 3 samples: Theta has rank <= 2
        torch.manual_seed(0)
        model, x = nn.Linear(1, 1).double(), torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    else:
        model, x = mlp(), samples(4)
        if case == "duplicate_samples":
            x = torch.cat([x, x[:1]])
        elif case == "no_learnable_params":
            model.requires_grad_(False)
        elif case == "nan":
            x[0, 0] = float("nan")
        elif case == "zero_gradient":  # a sample whose output does not depend on the parameters
            model = nn.Sequential(nn.Linear(3, 2), nn.ReLU()).double()
            with torch.no_grad():
                model[0].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
                model[0].bias.zero_()
            x = torch.tensor([[1.0, 0, 0], [2.0, 1, 0], [-1.0, 0, 0]], dtype=torch.float64)
    assert ntk_condition_number(model, [x]) == math.inf
    assert_no_grads(model)


def test_ntk_rejects_nothing_to_measure():
    with pytest.raises(ConfigError):
        ntk_condition_number(mlp(), [])
    with pytest.raises(ConfigError):
        ntk_condition_number(mlp(), [samples(2)], max_samples=0)


# ---------------------------------------------------------------- ZiCo (Eq. 17)


class Known(nn.Module):
    """Two linear layers and a loss whose gradient is chosen per batch: loss = sum(param * c[name])."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(2, 1).double()

    @staticmethod
    def loss(model, c):
        return sum((p * c[n]).sum() for n, p in model.named_parameters())


def gradients(seed: int, n_batches: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in Known().named_parameters()}
    return [{n: torch.randn(s, dtype=torch.float64, generator=gen) for n, s in shapes.items()}
            for _ in range(n_batches)]


def manual_zico(batches: list[dict[str, torch.Tensor]], layers: dict[str, list[str]]) -> float:
    total = 0.0
    for names in layers.values():
        s = 0.0
        for n in names:
            g = np.stack([b[n].numpy() for b in batches])
            mean_abs, std = np.abs(g).mean(0), g.std(0)  # population std
            s += (mean_abs[std > 0] / std[std > 0]).sum()
        if s > 0:
            total -= math.log(s)
    return total


def test_zico_matches_eq17_on_known_gradients():
    model, batches = Known(), gradients(0)
    expected = manual_zico(batches, {"a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"]})
    assert zico(model, batches, Known.loss) == pytest.approx(expected, rel=1e-12)
    assert_no_grads(model)


def test_zico_masks_zero_std_elements_and_skips_constant_layers():
    model, batches = Known(), gradients(1)
    for b in batches:  # one element of a.weight and all of a.bias are constant across batches; so is layer b
        b["a.weight"][0, 0] = 0.7
        b["a.bias"] = torch.tensor([0.5, -2.0], dtype=torch.float64)
        b["b.weight"] = torch.full((1, 2), 3.0, dtype=torch.float64)
        b["b.bias"] = torch.zeros(1, dtype=torch.float64)
    got = zico(model, batches, Known.loss)
    g = torch.stack([b["a.weight"] for b in batches])
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 0] = False
    expected = -math.log((g.abs().mean(0) / g.std(0, correction=0))[keep].sum().item())
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-12)


def test_zico_counts_only_learnable_parameters():
    model, batches = Known(), gradients(2)
    model.b.requires_grad_(False)
    expected = manual_zico(batches, {"a": ["a.weight", "a.bias"]})
    assert zico(model, batches, Known.loss) == pytest.approx(expected, rel=1e-12)


def test_zico_degenerate_cases():
    model = Known()
    with pytest.raises(ConfigError):
        zico(model, gradients(0, n_batches=1), Known.loss)
    same = gradients(0, n_batches=1) * 3  # every element has zero std: no layer contributes
    assert zico(model, same, Known.loss) == math.inf
    model.requires_grad_(False)
    assert zico(model, gradients(0), Known.loss) == math.inf
    assert_no_grads(model)


def test_zico_runs_a_real_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    got = zico(model, batches, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert math.isfinite(got)
    assert_no_grads(model)


# ---------------------------------------------------------------- ranked voting (Eq. 19)


def test_ranked_vote_follows_eq19():
    winner, table = autoprog_zero_vote(ntk=[10, 20, 30], zico=[-5, -6, -7], time=[3, 2, 1])
    # ranks: ntk 1,2,3; zico 3,2,1; time 3,2,1 -> R = 0.5*1+0.5*3+3 = 5, 4, 3
    assert [row["total"] for row in table] == [5.0, 4.0, 3.0] and winner == 2
    assert table[0] == {"candidate": 0, "total": 5.0, "ntk": 10.0, "ntk_rank": 1,
                        "zico": -5.0, "zico_rank": 3, "time": 3.0, "time_rank": 3}
    assert PAPER_WEIGHTS == {"ntk": 0.5, "zico": 0.5, "time": 1.0}


def test_ties_share_the_smallest_rank_and_nan_ranks_after_inf():
    _, table = ranked_vote("abcde", {"m": ([2.0, 1.0, 2.0, math.inf, math.nan], 1.0)})
    assert [row["m_rank"] for row in table] == [2, 1, 2, 4, 5]
    _, table = ranked_vote("abc", {"m": ([math.nan, math.inf, math.nan], 1.0)})
    assert [row["m_rank"] for row in table] == [2, 1, 2]


def test_inf_proxies_rank_worst():
    winner, table = autoprog_zero_vote(ntk=[math.inf, 5.0], zico=[1.0, 1.0], time=[1.0, 1.0])
    assert winner == 1 and table[0]["ntk_rank"] == 2


def test_a_tie_in_total_goes_to_the_earliest_candidate():
    winner, table = ranked_vote(["cheap", "dear"], {"a": ([1, 2], 1.0), "b": ([2, 1], 1.0)})
    assert table[0]["total"] == table[1]["total"] and winner == 0
    winner, _ = ranked_vote(["dear", "cheap"], {"a": ([2, 1], 1.0), "b": ([1, 2], 1.0)})
    assert winner == 0


def test_times_within_the_tolerance_tie_and_the_proxies_decide():
    # candidate 1 is 3 % slower than 0 and better on both proxies: with our tolerance timing noise must not decide
    ntk, zc, t = [2.0, 1.0, 3.0], [2.0, 1.0, 3.0], [1.00, 1.03, 1.50]
    winner, table = autoprog_zero_vote(ntk, zc, t, time_rtol=NOISE_RTOL)
    assert winner == 1 and [r["time_rank"] for r in table] == [1, 1, 3]
    assert [r["time"] for r in table] == t  # the table shows what was measured
    # the default is the paper's exact ranking: 3 % decides
    winner, table = autoprog_zero_vote(ntk, zc, t)
    assert TIME_RTOL == 0 and winner == 0 and [r["time_rank"] for r in table] == [1, 2, 3]


def test_tie_within_groups_from_the_smallest_value():
    assert tie_within([1.0, 1.04, 1.06, 1.2, math.inf, 1.03], 0.05) == [1.0, 1.0, 1.06, 1.2, math.inf, 1.0]
    assert tie_within([-1.0, -0.97, -0.5], 0.05) == [-1.0, -1.0, -0.5]
    assert tie_within([1.0, 1.01], 0.0) == [1.0, 1.01]
    nan = tie_within([math.nan, 2.0], 0.1)
    assert math.isnan(nan[0]) and nan[1] == 2.0
    with pytest.raises(ConfigError):
        tie_within([1.0], -0.1)


def test_weights_matter():
    ntk, zc, t = [1, 2, 3], [1, 2, 3], [3, 1, 2]
    assert autoprog_zero_vote(ntk, zc, t)[0] == 1  # totals 4, 3, 5
    ballots = {"ntk": (ntk, 0.5), "zico": (zc, 0.5), "time": (t, 0.25)}
    assert ranked_vote(range(3), ballots)[0] == 0  # totals 1.75, 2.25, 3.5


def test_ranked_vote_rejects_bad_ballots():
    with pytest.raises(ConfigError):
        ranked_vote("ab", {"m": ([1.0], 1.0)})
    with pytest.raises(ConfigError):
        ranked_vote("ab", {"m": ([1.0, 2.0], -1.0)})
    with pytest.raises(ConfigError):
        ranked_vote([], {})


# ---------------------------------------------------------------- step time (Eq. 18)


def test_measure_step_time_is_the_median_of_timed_calls_after_untimed_warmup():
    events = []
    ticks = iter([0, 5, 10, 11, 20, 23, 30, 130, 200, 202])  # durations 5, 1, 3, 100, 2

    def clock():
        events.append("clock")
        return next(ticks)

    assert measure_step_time(lambda: events.append("step"), repeats=5, warmup=2, clock=clock) == 3
    assert events == ["step", "step"] + ["clock", "step", "clock"] * 5


def test_measure_step_time_synchronises_cuda_around_each_call_of_a_given_clock(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    measure_step_time(lambda: None, repeats=3, warmup=1, device="cuda:0", clock=time.perf_counter)
    assert syncs == ["cuda:0"] * 6
    measure_step_time(lambda: None, repeats=3, device="cpu")
    assert len(syncs) == 6


def test_measure_step_time_on_cuda_reads_events_recorded_between_steps_and_syncs_once(monkeypatch):
    """On a GPU the steps are timed by CUDA events, one after each step: the median of their gaps, in seconds."""
    from conftest import fake_cuda_events

    log = []
    fake_cuda_events(monkeypatch, log, iter([0.0, 4.0, 5.0, 8.0, 108.0, 110.0]),  # gaps 4, 1, 3, 100, 2 ms: median 3
                     sync_word="sync")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("device sync"))
    assert measure_step_time(lambda: log.append("step"), repeats=5, warmup=2, device="cuda:0") == 0.003
    assert log == ["step", "step", "record"] + ["step", "record"] * 5 + ["sync"]


def test_measure_step_time_measures_real_time():
    import time

    assert 0.004 <= measure_step_time(lambda: time.sleep(0.005), repeats=3, warmup=0) < 0.5


# ------------------------------------------------------------------------------- AutoProg-Zero's candidates
def test_neighbour_candidates_follow_the_official_autoprog_zero_rule():
    """train_apz.py: stage 1 searches {r0, r1} x {l0, l1} of Ω; later stages ψ*'s r and l and the next of each
    (no forced growth, never smaller); at the full model ψ* is the only candidate."""
    from autoprog.algorithms.autoprog_zero import AutoProgZero
    from autoprog.errors import ConfigError
    from autoprog.space import GrowthSpace, SubNet, candidates, neighbour_candidates

    space = GrowthSpace(28, 4, 4, num_stages=4, start_ratio=0.25)  # 0.25Ω: 8/16/20/28 px x 1/2/3/4 blocks
    pairs = lambda subs: [(s.resolution, s.depth) for s in subs]  # noqa: E731
    assert pairs(neighbour_candidates(space, None)) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert pairs(neighbour_candidates(space, SubNet(16, 2))) == [(16, 2), (16, 3), (20, 2), (20, 3)]
    assert pairs(neighbour_candidates(space, SubNet(20, 4))) == [(20, 4), (28, 4)]
    assert pairs(neighbour_candidates(space, SubNet(28, 4))) == [(28, 4)]
    assert pairs(neighbour_candidates(GrowthSpace(28, 4, 1, num_stages=4, start_ratio=0.25), None)) == [(8, 1), (16, 1)]
    # AutoProgZero: neighbours or AutoProg-One's rule, by name; None follows the task (set up by the trainer)
    assert AutoProgZero(space, candidate_space="neighbours").candidates(0) == neighbour_candidates(space, None)
    assert AutoProgZero(space, candidate_space="autoprog-one").candidates(0) == candidates(space, None)
    assert AutoProgZero(space).candidate_space is None
    with pytest.raises(ConfigError):
        AutoProgZero(space, candidate_space="all")
