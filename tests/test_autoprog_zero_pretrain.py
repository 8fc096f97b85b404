"""AutoProg-Zero on pre-training (Table 5): zero-shot proxies scored on grown candidates, through the protocol."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_args

from autoprog.classification.runner import RunSpec, build_run
from autoprog.classification.trainer import TrainConfig, Trainer
from autoprog.controllers import GrowthServices, ProxyTask, ZeroShotServices
from autoprog.space import SubNet


@pytest.fixture(scope="module")
def az_run(fake_fmnist, tmp_path_factory):
    from autoprog.cli import main

    out = tmp_path_factory.mktemp("az") / "run"
    assert main(["pretrain", "--method", "autoprog-zero", "--out", str(out), *tiny_args(fake_fmnist)]) == 0
    return out


def test_pretrain_autoprog_zero_chooses_every_stage_and_ends_full(az_run):
    res = json.loads((az_run / "results.json").read_text())
    sched = json.loads((az_run / "schedule.json").read_text())
    assert res["done"] and sched["method"] == "autoprog-zero"
    stages = [(s["resolution"], s["depth"]) for s in sched["stages"]]
    assert len(stages) == 4 and stages[-1] == (28, 4), "the last stage is the full model"
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(stages, stages[1:])), "stages never shrink"
    search = res["summary"]["search"]
    assert [s["stage"] for s in search] == [1, 2, 3], "every stage but the last is searched"
    for s in search:
        assert 0 <= s["chosen"] < len(s["candidates"])
        assert all(c["ntk_cond"] > 0 and c["time_s"] > 0 for c in s["candidates"])


def test_replaying_the_found_schedule_runs(az_run, cli, fake_fmnist, tmp_path):
    rc, _, err = cli("pretrain", "--method", "fixed", "--schedule", az_run / "schedule.json",
                     "--out", tmp_path / "replay", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    replayed = json.loads((tmp_path / "replay" / "schedule.json").read_text())["stages"]
    found = json.loads((az_run / "schedule.json").read_text())["stages"]
    assert [(s["resolution"], s["depth"]) for s in replayed] == [(s["resolution"], s["depth"]) for s in found]


def _trainer(fake_fmnist, tmp_path, method="autoprog-zero"):
    spec = RunSpec(method=method, data_root=str(fake_fmnist), subset=256, depth=4, embed_dim=16, num_heads=2,
                   patch_size=4, train=TrainConfig(epochs=1, batch_size=32, count_flops=False))
    torch.manual_seed(0)
    data, net, controller, growth = build_run(spec)
    return Trainer(net, controller, growth, data, spec.train, tmp_path)


def test_both_protocols_are_offered_by_the_pretraining_trainer(fake_fmnist, tmp_path):
    tr = _trainer(fake_fmnist, tmp_path)
    assert isinstance(tr, ZeroShotServices) and isinstance(tr, GrowthServices)


def test_try_candidate_grows_then_restores_everything(fake_fmnist, tmp_path):
    tr = _trainer(fake_fmnist, tmp_path)
    tr.use_subnet(SubNet(16, 2))
    tr.stage = 0  # as inside a run: later candidates are grown, not just applied
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    with tr.try_candidate(SubNet(20, 4)) as task:
        assert isinstance(task, ProxyTask)
        assert tr.net.subnet == SubNet(20, 4)
        x, y = task.batches[0]
        assert x.shape[0] == tr.cfg.proxy_batch_size and len(task.batches) == tr.cfg.proxy_batches
        assert task.forward(task.model, task.batches[0]).shape == (len(y), 10)
        assert torch.isfinite(task.loss(task.model, task.batches[0]))
    assert tr.net.subnet == SubNet(16, 2)
    after = tr.net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_proxies_see_the_models_own_forward_under_bf16_training(fake_fmnist, tmp_path, fresh_accelerate):
    """Training in bf16 (Accelerate wraps the model's forward in autocast): inside ``try_candidate`` the proxies
    run the model's own forward, in fp32, as the official search computes them; the training forward is back
    after."""
    from accelerate import Accelerator

    spec = RunSpec(method="autoprog-zero", data_root=str(fake_fmnist), subset=256, depth=4, embed_dim=16,
                   num_heads=2, patch_size=4, train=TrainConfig(epochs=1, batch_size=32, count_flops=False))
    torch.manual_seed(0)
    data, net, controller, growth = build_run(spec)
    tr = Trainer(net, controller, growth, data, spec.train, tmp_path,
                 accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
    x = torch.zeros(2, 1, 28, 28)
    inner = []  # autocast inside the first block: training's forward, the proxies', training's again
    first_block = next(m for m in tr.net.modules() if type(m).__name__ == "Block")
    first_block.register_forward_pre_hook(lambda m, a: inner.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        tr.net(x)
        with tr.try_candidate(SubNet(28, 4)) as task:
            task.forward(task.model, task.batches[0])
        tr.net(x)
    assert inner == [True, False, True]


def test_proxy_batches_below_two_are_refused(cli, fake_fmnist, tmp_path):
    rc, _, err = cli("pretrain", "--method", "autoprog-zero", "--proxy-batches", "1", "--out", tmp_path / "r",
                     *tiny_args(fake_fmnist))
    assert rc == 2 and "--proxy-batches" in err and "Traceback" not in err


def test_the_flops_time_source_makes_choices_independent_of_timing(cli, fake_fmnist, tmp_path):
    """Two runs with --time-source flops: the same schedule, and candidate times in the same exact ratios
    (only the one calibration constant is measured)."""
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        rc, _, err = cli("pretrain", "--method", "autoprog-zero", "--time-source", "flops", "--out", out,
                         *tiny_args(fake_fmnist, epochs="1"))
        assert rc == 0, err
        runs.append(json.loads((out / "results.json").read_text()))
    a, b = runs
    assert a["summary"]["schedule"] == b["summary"]["schedule"]
    for sa, sb in zip(a["summary"]["search"], b["summary"]["search"]):
        ta = [c["time_s"] for c in sa["candidates"]]
        tb = [c["time_s"] for c in sb["candidates"]]
        assert [x / ta[0] for x in ta] == pytest.approx([x / tb[0] for x in tb], rel=1e-9)
        assert len(set(ta)) > 1, "candidates of different sizes cost differently"


def test_a_candidates_snapshot_keeps_the_optimizer_state_where_it_is(fake_fmnist, tmp_path, monkeypatch):
    """Trying a candidate snapshots and restores the optimizer state: copies on the parameters' device (on a GPU,
    no copy through the host and no wait per tensor), which later steps do not change."""
    tr = _trainer(fake_fmnist, tmp_path)
    tr.use_subnet(SubNet(16, 2))
    tr.stage = 0
    x = torch.randn(4, 1, 16, 16)
    torch.nn.functional.cross_entropy(tr.net(x), torch.tensor([0, 1, 2, 3])).backward()
    tr.optimizer.step()  # some state to keep
    state = {p: {k: v.clone() for k, v in st.items()} for p, st in tr.optimizer.state.items()}
    to_host = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: to_host.append(t.shape) or cpu(t, *a, **k))
    snap = tr.snapshot()
    assert to_host == [], f"{len(to_host)} optimizer tensors copied to the host"
    monkeypatch.undo()
    for st in tr.optimizer.state.values():  # a later step changes the live state, not the snapshot
        for v in st.values():
            v.add_(1.0)
    tr.restore(snap)
    for p, st in tr.optimizer.state.items():
        for k, v in st.items():
            torch.testing.assert_close(v.float(), state[p][k].float(), rtol=0, atol=0, msg=k)
    # the restored state is the optimizer's own copy: later steps do not change the snapshot
    live = {id(v) for st in tr.optimizer.state.values() for v in st.values()}
    assert not any(id(v) in live for v in snap["optimizer"].values())
