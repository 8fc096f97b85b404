"""Two processes on the CPU (torchrun + Accelerate, gloo): a tiny prog run with growth inside DDP training.

A driver script runs ``autoprog.classification.runner.pretrain`` under torchrun with a Trainer subclass that, after ``fit``,
has every rank save its own weights (the trainer itself saves only on rank 0) and evaluate a network whose
prediction is known, so the test can check that both processes ended identical and that the distributed
evaluation counts each test image once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PORT_RACE = ("Address already in use", "EADDRINUSE", "DistNetworkError")


def torchrun_env(scratch: str) -> dict:
    """The environment of a torchrun launch on the CPU, its temporary files (torchrun's torchelastic_* folders, which
    it leaves behind) in ``scratch``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTEST_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TMPDIR=scratch)
    return env


def _torchrun(cmd: list[str], cwd, run_dir):
    """Run ``cmd`` (a torchrun command line) on the CPU; returns (process, combined log).

    torchrun --standalone picks a free port that another process can take before the rendezvous binds it;
    that, and only that, is worth a second try (from an empty run directory).
    """
    env = torchrun_env(scratch := tempfile.mkdtemp())
    try:
        for _attempt in range(2):
            shutil.rmtree(run_dir, ignore_errors=True)
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
            log = proc.stdout + proc.stderr
            if proc.returncode == 0 or not any(m in log for m in PORT_RACE):
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return proc, log

DRIVER = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    import autoprog.classification.runner as runner
    from autoprog.accelerator import end_processes, leave_process
    from autoprog.classification.runner import RunSpec
    from autoprog.classification.trainer import TrainConfig

    data_root, out, growth = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


    class RecordingTrainer(runner.Trainer):
        def fit(self, resume=False):
            res = super().fit(resume)
            rank = self.acc.process_index
            state = {f"net.{k}": v.detach().cpu().clone().contiguous() for k, v in self.net.state_dict().items()}
            state.update({f"ema.{k}": v.detach().cpu().clone().contiguous()
                          for k, v in self.ema.module.state_dict().items()})
            torch.save(state, out.parent / f"rank{rank}.pt")
            # a network that always predicts class 0: its exact top-1 is the share of class-0 test images
            with torch.no_grad():
                for net in (self.net, self.ema.module):
                    net.model.head.weight.zero_()
                    net.model.head.bias.zero_()
                    net.model.head.bias[0] = 1.0
            top1, top1_ema = self.evaluate(full=True)
            exact = 100.0 * float((self.data.test.labels == 0).double().mean())
            info = {"rank": rank, "world": self.acc.num_processes, "steps": self.step,
                    "constant_top1": top1, "constant_top1_ema": top1_ema, "constant_exact": exact,
                    "distributed_type": str(self.acc.distributed_type)}
            (out.parent / f"rank{rank}.json").write_text(json.dumps(info))
            return res


    runner.Trainer = RecordingTrainer
    spec = RunSpec(method="prog", growth=growth, data_root=data_root, subset=256, patch_size=4, depth=4, embed_dim=16, num_heads=2,
                   train=TrainConfig(epochs=2, batch_size=16, eval_samples=64, count_flops=False))
    acc = Accelerator(cpu=True)
    runner.pretrain(spec, out, acc)
    end_processes(acc)  # wait for each other, then destroy the group, as autoprog's CLI does
    leave_process(0)  # skipping the interpreter's shutdown, as autoprog's CLI does
''')


@pytest.fixture(scope="module", params=["mogrow", "identity"])
def ddp_run(request, tmp_path_factory, fake_fmnist):
    """MoGrow (the default) copies the momentum network; identity adds new gate parameters mid-training,
    which DDP must be re-wrapped to see."""
    work = tmp_path_factory.mktemp(f"ddp-{request.param}")
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(fake_fmnist), str(work / "run"), request.param]
    proc, log = _torchrun(cmd, cwd=work, run_dir=work / "run")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    return work, log, request.param


def test_two_process_run_finishes(ddp_run):
    work, log, growth = ddp_run
    res = json.loads((work / "run" / "results.json").read_text())
    assert res["done"] is True
    assert len(res["epochs"]) == 2
    # 256 images, 16 per process and step, 2 processes: 8 steps per epoch; stages change at steps 4, 8, 12
    assert res["summary"]["steps"] == res["summary"]["total_steps"] == 16
    assert [s["step"] for s in res["stages"]] == [0, 4, 8, 12]
    assert [(s["subnet"]["resolution"], s["subnet"]["depth"]) for s in res["stages"]] == [
        (16, 2), (20, 3), (24, 3), (28, 4)]
    assert [(e["stage"], e["resolution"], e["depth"]) for e in res["epochs"]] == [(2, 20, 3), (4, 28, 4)]
    assert res["summary"]["growth"] == growth
    assert all(s["growth"]["operator"] == growth for s in res["stages"][1:])
    infos = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2]
    assert all("MULTI_CPU" in i["distributed_type"] for i in infos)
    assert all(i["steps"] == 16 for i in infos)
    assert log.count("stage 4/4") == 1, "progress is printed by the main process only"


def test_both_processes_end_with_identical_weights(ddp_run):
    work, _, growth = ddp_run
    r0 = torch.load(work / "rank0.pt")
    r1 = torch.load(work / "rank1.pt")
    assert r0.keys() == r1.keys() and any(k.startswith("ema.") for k in r0)
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], rtol=0, atol=1e-6, msg=k)
    # and rank 0's checkpoint is exactly those weights
    saved = load_file(work / "run" / "checkpoint" / "model.safetensors")
    for k, v in saved.items():
        assert torch.equal(v, r0[f"net.{k}"]), k
    # the blocks trained: the copies made at growth have drifted apart
    assert not torch.equal(r0["net.model.blocks.0.attn.qkv.weight"], r0["net.model.blocks.1.attn.qkv.weight"])
    gates = [k for k in r0 if k.startswith("net.") and k.endswith(".gate")]
    if growth == "identity":
        # 2 → 3 blocks gates block 2, 3 → 4 ([0, 1, 2, 2]) gates block 3; the gates trained in sync
        assert sorted(gates) == sorted(f"net.model.blocks.{i}.{ls}.gate" for i in (2, 3) for ls in ("ls1", "ls2"))
        assert any(float(r0[k]) != 0.0 for k in gates)
    else:
        assert gates == []


def test_distributed_evaluation_counts_each_test_image_once(ddp_run):
    # 100 test images (10 per class) in eval batches of 32 on 2 processes: Accelerate pads the last round with
    # repeated images; counting them too would give (10 + k)/128 instead of exactly 10%
    work = ddp_run[0]
    for r in (0, 1):
        info = json.loads((work / f"rank{r}.json").read_text())
        assert info["constant_exact"] == pytest.approx(10.0)
        assert info["constant_top1"] == pytest.approx(info["constant_exact"], abs=1e-9)
        assert info["constant_top1_ema"] == pytest.approx(info["constant_exact"], abs=1e-9)


def test_cli_under_torchrun_exits_cleanly(tmp_path, fake_fmnist):
    """The CLI itself under torchrun: exit status 0 (the process group is torn down before exit)."""
    from conftest import tiny_args

    out = tmp_path / "cli-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "autoprog.cli",
           "pretrain", "--method", "prog", "--out", str(out), *tiny_args(fake_fmnist, epochs="1")]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    assert "terminate called" not in log
    assert json.loads((out / "results.json").read_text())["done"] is True


def test_torchrun_without_gpus_is_one_group_even_without_cpu_flag(tmp_path, fake_fmnist):
    """torchrun on a CPU-only machine, no --cpu: one gloo group (global batch 2 x 32), not two runs racing."""
    from conftest import tiny_args

    out = tmp_path / "cli-ddp-nocpu"
    args = [a for a in tiny_args(fake_fmnist, epochs="1") if a != "--cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "autoprog.cli",
           "pretrain", "--method", "prog", "--out", str(out), *args]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["total_steps"] == 4, "256 images / (2 processes x 32): one group shares the epoch"
    assert log.count("done: ") == 1, "one run reports, not two"



def test_a_supernet_search_builds_one_ddp_wrapper_per_trainable_set_and_stage(tmp_path, fake_fmnist):
    """AutoProg-One's supernet steps train a different candidate at most steps. DDP needs a wrapper per trainable
    set; one is built the first time a set trains in a stage and reused after, never one per step."""
    from conftest import tiny_args

    out = tmp_path / "ap-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "autoprog.cli",
           "pretrain", "--out", str(out), *tiny_args(fake_fmnist, epochs="4"), "--batch-size", "16",
           "--method", "autoprog-one", "--depth", "6", "--alpha", "0", "--search-epochs", "1", "--search-min-updates", "0", "--search-samples",
           "32", "--score-points", "2"]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    searches = res["summary"]["search"]
    assert len(searches) == 3
    # a trainable set is a depth (the resolution changes no parameter): the candidates' distinct depths, the
    # stage's chosen sub-network, and the first wrapper bound what may be built
    bound = 1 + sum(len({r["depth"] for r in s["candidates"]}) + 1 for s in searches)
    built, changes = res["summary"]["ddp_wrappers_built"], res["summary"]["trainable_set_changes"]
    assert 2 <= built <= bound, (built, bound)
    assert changes > built, "the set changed more often than wrappers were built: they were reused (re-wrapping " \
                            "at every change, as before, builds changes + 1)"


def test_a_zero_shot_search_builds_no_ddp_wrapper_for_the_candidates_it_only_scores(tmp_path, fake_fmnist):
    """AutoProg-Zero grows into each candidate to score it and never trains the ones it does not choose: no DDP
    wrapper (a broadcast of every parameter and the candidate's gradient buckets, kept until the next stage) is
    built for them, only for the sets that train, one a stage at most."""
    from conftest import tiny_args

    out = tmp_path / "az-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "autoprog.cli",
           "pretrain", "--out", str(out), *tiny_args(fake_fmnist, epochs="4"), "--batch-size", "16",
           "--method", "autoprog-zero", "--depth", "6", "--proxy-batches", "2", "--proxy-batch-size", "4"]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    res = json.loads((out / "results.json").read_text())
    stages = json.loads((out / "schedule.json").read_text())["stages"]
    assert len(stages) == 4
    # a trainable set is a depth: Accelerate's first wrapper, then one per depth the schedule trains (each
    # scored candidate got its own before: 5 against 3 here, with 22 set changes)
    depths = {s["depth"] for s in stages}
    assert res["summary"]["ddp_wrappers_built"] <= 1 + len(depths), (res["summary"], stages)


LOOP_DRIVER = textwrap.dedent('''
    import json
    import sys

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from autoprog.accelerator import leave_process, make_accelerator
    from autoprog.adapters.vit import ElasticViT
    from autoprog.algorithms.autoprog_one import AutoProgOne, AutoProgOneConfig
    from autoprog.loop import ProgressiveLoop, ProxyData
    from autoprog.models.vit import VisionTransformer

    acc = make_accelerator(cpu=True)  # joins the gloo group of the launch
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = ElasticViT(VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16,
                                         depth=4, num_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    # rank 1's candidate losses are in reverse order: alone, it would pick the candidate rank 0 likes least
    proxy = ProxyData(batches, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]) if rank == 0
                      else 10.0 - F.cross_entropy(m(b[0]), b[1]))
    ctrl = AutoProgOne(model.growth_space(), AutoProgOneConfig(search_fraction=0.5, search_min_updates=1,
                                                               search_samples=16, alpha=0.0))
    loop = ProgressiveLoop.growing(model, opt, 16, schedule=ctrl, proxy=proxy, steps_per_epoch=4,
                                   log=lambda s: None, accelerator=acc)
    for i in range(loop.total_steps):
        x, y = batches[i % 4]
        x, y = x + rank, (y + rank) % 10  # each process its own batch: only DDP's all-reduce keeps them alike
        loop.before_step()
        F.cross_entropy(loop.train_model(loop.resize(x)), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loop.after_step()
    sched = [[s.subnet.resolution, s.subnet.depth] for s in loop.schedule().stages]
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
        wrapper = loop.prepared.current()
        json.dump({"schedule": sched, "same_weights": bool(torch.equal(*gathered)),
                   "wrappers": loop.prepared.built, "bucket_view": wrapper.gradient_as_bucket_view,
                   "broadcast_buffers": wrapper.broadcast_buffers}, f)
    dist.barrier()  # a group destroyed while the other process still works can abort at exit
    dist.destroy_process_group()
    leave_process(0)
''')


def test_a_progressive_loop_follows_the_main_process_decisions_on_every_rank(tmp_path):
    driver = tmp_path / "loop_driver.py"
    driver.write_text(LOOP_DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), str(out)]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=tmp_path / "scratch")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    a, b = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["schedule"] == b["schedule"] and len(a["schedule"]) == 4, "both ranks ran the main process's schedule"
    # with accelerator=, training forwards run through one DDP wrapper per learnable set: the ranks' different
    # batches leave the same weights, and wrappers are built per set, not per step (16 steps)
    assert a["same_weights"] and b["same_weights"]
    assert 1 < a["wrappers"] < 16, a
    assert a["bucket_view"] and not a["broadcast_buffers"], "the command's DDP settings (accelerator.DDP_SETTINGS)"


HOOK_DRIVER = textwrap.dedent('''
    import json
    import sys

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs
    from torch import nn

    from autoprog.accelerator import end_processes, leave_process
    from autoprog.engine import PreparedModel

    kind = sys.argv[2]
    if kind == "fp16":
        ddp = DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16, bucket_cap_mb=1)
    else:  # PowerSGD after 3 steps
        ddp = DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.POWER_SGD, bucket_cap_mb=1,
                                            comm_state_option={"start_powerSGD_iter": 3})
    acc = Accelerator(cpu=True, kwargs_handlers=[ddp])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    prepared = PreparedModel(acc, model)
    hooks, steps = [], []  # each step's hook, and the step count its state started that step from
    # the whole model for 3 steps, then each layer alone, then the whole model again; a stage begins before the last
    for frozen in (None, None, None, 0, 1, None, "stage", 0):
        if frozen == "stage":
            prepared.keep_current_only()
            continue
        for i, layer in enumerate(model):
            layer.requires_grad_(i != frozen)
        wrapper = prepared.current()
        state = wrapper._comm_hooks[0][1]
        steps.append(getattr(state, "iter", None))
        wrapper(torch.randn(2, 4)).sum().backward()
        hooks.append([h.__qualname__ for h, _ in wrapper._comm_hooks])
    if acc.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump({"hooks": hooks, "built": prepared.built, "steps": steps}, f)
    end_processes(acc)  # wait for each other, then destroy the group, as autoprog's CLI does
    leave_process(0)  # skipping the interpreter's shutdown, as autoprog's CLI does
''')


@pytest.mark.parametrize("kind", ["fp16", "powersgd"])
def test_every_ddp_wrapper_gets_the_accelerators_communication_hook(kind, tmp_path):
    """A comm hook set through Accelerate's DDP settings is registered on every wrapper of a changing trainable
    set, not only on the one Accelerate built. PowerSGD: each wrapper gets its own state, whose step count goes
    on from the run's (compression starts after start_powerSGD_iter steps of the run, not of each wrapper)."""
    driver = tmp_path / "hook_driver.py"
    driver.write_text(HOOK_DRIVER)
    out = tmp_path / "hooks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), str(out),
           kind]
    proc, log = _torchrun(cmd, cwd=tmp_path, run_dir=tmp_path / "scratch")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    res = json.loads(out.read_text())
    # Accelerate's, then one per single layer; the whole model's is reused; after the stage began, layer 0's anew
    assert res["built"] == 4
    if kind == "fp16":
        assert res["hooks"] == [["fp16_compress_hook"]] * 7 and res["steps"] == [None] * 7
        return
    assert res["hooks"] == [["powerSGD_hook"]] * 7
    # each wrapper, new or reused, goes on from the steps the run has made: Accelerate's state ran steps 0-2, the
    # second layer's wrapper starts at 3 (start_powerSGD_iter: it compresses at once), the first layer's at 4, the
    # whole model's (reused) at 5, the new stage's wrapper at 6
    assert res["steps"] == [0, 1, 2, 3, 4, 5, 6]


LONE_LIBRARY_CALL = textwrap.dedent('''
    import sys

    import autoprog.accelerator as accelerator
    from autoprog.classification.runner import RunSpec, pretrain
    from autoprog.errors import ConfigError

    accelerator.LIBRARY_RENDEZVOUS_S = 3
    try:
        pretrain(RunSpec(method="prog"), sys.argv[1])
    except ConfigError as e:
        print(f"ConfigError: {e}")
''')


@pytest.mark.parametrize("how", ["cli", "library"])
def test_a_process_whose_group_never_forms_stops_with_one_line(how, tmp_path):
    """Process 0 of 2 launched alone: the CLI (``--rendezvous-timeout``) and a library call given no accelerator
    (the same set-up) stop after the rendezvous timeout with one line, not after torch's 30-minute default."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTEST_"))}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "run"
    if how == "cli":
        cmd = [sys.executable, "-m", "autoprog.cli", "pretrain", "--out", str(out), "--rendezvous-timeout", "3", "--cpu"]
    else:
        (tmp_path / "lone.py").write_text(LONE_LIBRARY_CALL)
        cmd = [sys.executable, str(tmp_path / "lone.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert "process 0 of 2 could not join its group" in log and "within 3 s" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_run_stopped_under_torchrun_resumes_under_torchrun(tmp_path, fake_fmnist):
    """A two-process run stopped early says to continue in a launch of two processes, and does (each process's
    device is ``cpu:0`` there, which safetensors once refused as if the checkpoint were damaged)."""
    from conftest import tiny_args

    out = tmp_path / "stopped"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "autoprog.cli", "pretrain"]
    proc, log = _torchrun([*launch, "--method", "prog", "--out", str(out), *tiny_args(fake_fmnist, epochs="2"),
                           "--stop-after-epochs", "1"], cwd=tmp_path, run_dir=out)
    assert proc.returncode == 0, log[-4000:]
    assert f"--resume {out}` in a launch of 2 processes, as this one" in log
    proc, log = _torchrun([*launch, "--resume", str(out)], cwd=tmp_path, run_dir=tmp_path / "unused")
    assert proc.returncode == 0, log[-4000:]
    assert f"resumed from {out / 'checkpoint'} at step 4" in log
    res = json.loads((out / "results.json").read_text())
    assert res["done"] and [e["epoch"] for e in res["epochs"]] == [1, 2]
