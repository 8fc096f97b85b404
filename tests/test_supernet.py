"""The supernet-only baseline (Table 20): a random sub-network of Ω per step, the full model between steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_args
from safetensors.torch import load_file

from autoprog.algorithms.supernet import SupernetOnly
from autoprog.space import GrowthSpace

pytestmark = pytest.mark.slow


def test_it_samples_all_of_omega_uniformly_and_restores_the_full_model():
    space = GrowthSpace(28, 4, 4, 4, 0.5)
    ctl = SupernetOnly(space, seed=0)
    assert {(c.resolution, c.depth) for c in ctl.cands} == {(r, d) for r in space.resolutions() for d in space.depths()}
    picks = [ctl.step_subnet(None, s) for s in range(400)]
    assert len(set(picks)) == len(ctl.cands) and sum(ctl.counts) == 400
    assert picks == [SupernetOnly(space, seed=0).step_subnet(None, s) for s in range(400)], "a function of the step"

    class Trainer:
        subnet = picks[0]

        def use_subnet(self, s):
            self.subnet = s

    t = Trainer()
    ctl.after_step(t)
    assert t.subnet == ctl.full and ctl.full.depth == 4 and ctl.full.resolution == 28


def test_supernet_only_runs_reports_and_resumes_identically(cli, fake_fmnist, tmp_path):
    args = tiny_args(fake_fmnist, epochs="2")
    rc, _, err = cli("pretrain", "--method", "supernet-only", "--out", tmp_path / "a", *args)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    s = res["summary"]
    assert s["method"] == "supernet-only" and sum(s["supernet_steps"]) == s["steps"] == 16
    assert sum(1 for n in s["supernet_steps"] if n) > 1 and 0 <= s["top1"] <= 100
    assert [st["depth"] for st in s["schedule"]["stages"]] == [4], "evaluated as the full model"
    rc, _, err = cli("pretrain", "--method", "supernet-only", "--out", tmp_path / "b", "--stop-after-epochs", "1", *args)
    assert rc == 0, err
    rc, _, err = cli("pretrain", "--resume", tmp_path / "b")
    assert rc == 0, err
    wa, wb = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
