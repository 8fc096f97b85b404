"""Two processes on the CPU (torchrun + Accelerate, gloo): diffusion fine-tuning inside DDP.

A driver script runs ``autoprog.diffusion.runner.finetune`` under torchrun for several methods in one launch
(one process-group start-up for all of them), with a DiffusionTrainer subclass that, after ``fit``, has every
rank save its own weights and what it saw (the trainer itself writes only on rank 0). The test then checks:

* ``prog``: the learnable parameter set changes at every stage, so DDP must be re-prepared each time
  (``_rewrap_if_needed``); without that the newly unfrozen blocks would train apart on the two ranks;
* ``autoprog-zero``: the choice made at each stage is rank 0's (broadcast), so both ranks follow one schedule;
* ``lora-r4``: peft's adapters inside DDP;

and that the CLI itself runs a fine-tuning under torchrun, printing its progress once.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _torchrun

from autoprog.diffusion.runner import BaseSpec, pretrain_base
from autoprog.diffusion.trainer import DiffusionConfig

pytestmark = pytest.mark.slow

METHODS = ("prog", "autoprog-zero", "lora-r4")
STEPS = 8  # 4 stages of 2 steps; 150 training images (classes 5-9), 8 per process and step on 2 processes

DRIVER = textwrap.dedent('''
    import json
    import sys
    from dataclasses import replace
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    import autoprog.diffusion.runner as runner
    from autoprog.diffusion.runner import FinetuneSpec
    from autoprog.diffusion.trainer import DiffusionConfig

    base, data_root, cache_dir, root, methods = sys.argv[1:6]
    root = Path(root)


    class RecordingTrainer(runner.DiffusionTrainer):
        def fit(self, resume=False):
            res = super().fit(resume)
            rank = self.acc.process_index
            d = root / "ranks" / self.run_info["method"]
            d.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
            torch.save(state, d / f"rank{rank}.pt")
            info = {"rank": rank, "world": self.acc.num_processes, "steps": self.step,
                    "total_steps": self.total_steps, "stage_log": self.stage_log,
                    "learnable": sorted(n for n, p in self.model.named_parameters() if p.requires_grad),
                    "controller": self.controller.summary(),
                    "distributed_type": str(self.acc.distributed_type),
                    "wrapped": type(self.wrapped).__name__,
                    "wrapped_module_is_model": getattr(self.wrapped, "module", None) is self.model,
                    "prepared_models": len(self.acc._models)}
            (d / f"rank{rank}.json").write_text(json.dumps(info))
            return res


    runner.DiffusionTrainer = RecordingTrainer  # finetune() looks the trainer up in its module
    cfg = DiffusionConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=1, eval_points=2, curve_samples=8,
                          fd_samples=16, sample_steps=2, proxy_batches=2, proxy_batch_size=4, time_repeats=1)
    acc = Accelerator(cpu=True)
    for method in methods.split(","):
        spec = FinetuneSpec(method=method, base=base, data_root=data_root, cache_dir=cache_dir, feature_epochs=1,
                            train=replace(cfg))
        runner.finetune(spec, root / method, acc)
    acc.end_training()  # destroy the process group before exit, as autoprog's CLI does
''')


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The feature classifier's cache: trained once (by the base model's run), then only loaded."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def base(fake_fmnist, cache_dir, tmp_path_factory):
    """A tiny base DiT (4 blocks, 16 wide) trained in this process on fake Fashion-MNIST classes 0-4."""
    out = tmp_path_factory.mktemp("ddp-base")
    train = DiffusionConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, eval_points=1, curve_samples=8,
                            fd_samples=16, sample_steps=2, ema_decay=0.9)
    pretrain_base(BaseSpec(data_root=str(fake_fmnist), hidden_size=16, depth=4, num_heads=2, patch_size=4,
                           feature_epochs=1, cache_dir=str(cache_dir), train=train), out)
    return out / "model"


@pytest.fixture(scope="module")
def ddp_runs(base, fake_fmnist, cache_dir, tmp_path_factory):
    """One torchrun launch that fine-tunes with every method of METHODS, one after the other."""
    work = tmp_path_factory.mktemp("ddp-finetune")
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(base), str(fake_fmnist), str(cache_dir), str(work / "run"), ",".join(METHODS)]
    proc, log = _torchrun(cmd, cwd=work, run_dir=work / "run")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    return work / "run", log


def _ranks(run, method):
    d = run / "ranks" / method
    infos = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(d / f"rank{r}.pt") for r in (0, 1)]
    return infos, states


def _assert_same_weights(r0: dict, r1: dict) -> None:
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_two_process_finetuning_finishes(ddp_runs, method):
    run, log = ddp_runs
    res = json.loads((run / method / "results.json").read_text())
    assert res["done"] is True
    assert res["summary"]["steps"] == res["summary"]["total_steps"] == STEPS
    assert [p["step"] for p in res["curve"]] == [4, 8] and all("fd" in p for p in res["curve"])
    assert (run / method / "model" / "model.safetensors").is_file()
    infos, _ = _ranks(run, method)
    assert [i["rank"] for i in infos] == [0, 1] and [i["world"] for i in infos] == [2, 2]
    assert all("MULTI_CPU" in i["distributed_type"] for i in infos)
    assert all(i["steps"] == i["total_steps"] == STEPS for i in infos)
    assert all(i["wrapped"] == "DistributedDataParallel" and i["wrapped_module_is_model"] for i in infos)
    # a re-prepared model replaces the previous wrapper in Accelerate's list instead of piling up
    assert all(i["prepared_models"] == 1 for i in infos), [i["prepared_models"] for i in infos]
    assert "terminate called" not in log


@pytest.mark.parametrize("method", METHODS)
def test_both_processes_end_with_identical_weights(ddp_runs, method):
    run, _ = ddp_runs
    infos, (r0, r1) = _ranks(run, method)
    _assert_same_weights(r0, r1)
    assert infos[0]["learnable"] == infos[1]["learnable"]


def test_prog_rewraps_ddp_at_every_stage_and_trains_every_block(ddp_runs, base):
    run, log = ddp_runs
    infos, (r0, r1) = _ranks(run, "prog")
    res = json.loads((run / "prog" / "results.json").read_text())
    # both ranks went through the same 4 stages, the learnable blocks growing: 1, 2, 3, then all 4
    assert infos[0]["stage_log"] == infos[1]["stage_log"] == res["stages"]
    assert [s["step"] for s in res["stages"]] == [0, 2, 4, 6]
    blocks = [s["learnable_blocks"] for s in res["stages"]]
    assert [len(b) for b in blocks] == [1, 2, 3, 4] and blocks[-1] == [0, 1, 2, 3]
    assert all(set(a) <= set(b) for a, b in zip(blocks, blocks[1:]))
    assert res["stages"][-1]["subnet"]["resolution"] == 28
    assert infos[0]["learnable"] == sorted(r0)  # the last stage trains the whole model (SID included)
    assert log.count("stage 4/4") == 1, "progress is printed by the main process only"
    # rank 0's export is exactly these weights: nothing to fold for prog, and the SID is kept
    exported = load_file(run / "prog" / "model" / "model.safetensors")
    assert exported.keys() == r0.keys() and "sid.embedding.weight" in exported
    for k, v in exported.items():
        assert torch.equal(v, r0[k]), k
    # every stage trained its own stage identifier row (zero at creation), identically on both ranks
    assert all(float(row.abs().sum()) > 0 for row in r0["sid.embedding.weight"])
    # every block, even the ones unfrozen only in the last stage (blocks 0 and 1 of [3], [1, 3], ...), trained
    before = load_file(base / "model.safetensors")
    for i in range(4):
        names = [n for n in before if n.startswith(f"blocks.{i}.")]
        assert names and any(not torch.equal(before[n], r0[n]) for n in names), f"block {i} did not train"


def test_autoprog_zero_follows_rank_zeros_choices(ddp_runs):
    run, log = ddp_runs
    infos, (r0, r1) = _ranks(run, "autoprog-zero")
    res = json.loads((run / "autoprog-zero" / "results.json").read_text())
    log0, log1 = infos[0]["stage_log"], infos[1]["stage_log"]
    assert log0 == res["stages"]
    assert [s["step"] for s in log0] == [s["step"] for s in log1] == [0, 2, 4, 6]
    for a, b in zip(log0, log1):
        assert (a["stage"], a["subnet"], a["learnable_blocks"]) == (b["stage"], b["subnet"], b["learnable_blocks"])
    assert log0[-1]["subnet"] == {"resolution": 28, "depth": 4} and log0[-1]["learnable_blocks"] == [0, 1, 2, 3]
    # the same candidate index was unfrozen on both ranks (rank 1's own scores, its timings above all, may differ)
    s0, s1 = infos[0]["controller"]["search"], infos[1]["controller"]["search"]
    assert [s["stage"] for s in s0] == [s["stage"] for s in s1] == [1, 2, 3]
    assert [s["chosen"] for s in s0] == [s["chosen"] for s in s1]
    for s, stage in zip(s0, log0):
        chosen = s["candidates"][s["chosen"]]
        assert {k: chosen[k] for k in stage["subnet"]} == stage["subnet"]
    assert res["summary"]["search"] == s0
    assert log.count("stage 1 candidates:") == 1
    sched = json.loads((run / "autoprog-zero" / "schedule.json").read_text())
    assert [{k: st[k] for k in ("resolution", "depth")} for st in sched["stages"]] == \
        [{k: s["subnet"][k] for k in ("resolution", "depth")} for s in log0]


def test_lora_trains_only_adapters_in_ddp_and_exports_them_merged(ddp_runs, base):
    run, _ = ddp_runs
    infos, (r0, r1) = _ranks(run, "lora-r4")
    learnable = infos[0]["learnable"]
    adapters = [n for n in learnable if "lora_" in n]
    assert adapters and all("lora_" in n or not n.startswith("blocks.") for n in learnable)
    assert all(r0[n].shape[0] == 4 for n in adapters if ".lora_A." in n)
    # the adapters trained (lora_B starts at zero), the frozen base weights stayed the base model's
    assert any(float(r0[n].abs().sum()) > 0 for n in adapters if ".lora_B." in n)
    before = load_file(base / "model.safetensors")
    wrapped = [k for k in r0 if k.endswith(".base_layer.weight")]
    assert wrapped
    for k in wrapped:
        plain = k.replace(".base_layer.", ".")
        assert torch.equal(r0[k], before[plain]), k
    # rank 0's export folds each adapter in: W + (alpha / r) B A, alpha = r
    exported = load_file(run / "lora-r4" / "model" / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in exported)
    for k in wrapped:
        stem = k[: -len(".base_layer.weight")]
        merged = r0[k] + r0[f"{stem}.lora_B.default.weight"] @ r0[f"{stem}.lora_A.default.weight"]
        torch.testing.assert_close(exported[f"{stem}.weight"], merged, rtol=0, atol=1e-6, msg=stem)
    for k, v in exported.items():
        if k in r0:
            assert torch.equal(v, r0[k]), k


def test_cli_finetune_under_torchrun(base, fake_fmnist, cache_dir, tmp_path):
    out = tmp_path / "cli-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "autoprog.cli",
           "finetune", "--method", "prog", "--base", str(base), "--data-root", str(fake_fmnist),
           "--cache-dir", str(cache_dir), "--out", str(out), "--steps", str(STEPS), "--batch-size", "8",
           "--eval-points", "2", "--curve-samples", "8", "--fd-samples", "16", "--sample-steps", "2",
           "--feature-epochs", "1", "--cpu"]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    assert "terminate called" not in log
    res = json.loads((out / "results.json").read_text())
    assert res["done"] is True and res["summary"]["steps"] == STEPS
    assert log.count("stage 4/4") == 1, "progress is printed by the main process only"
    assert log.count("done: ") == 1
    assert (out / "model" / "model.safetensors").is_file()

