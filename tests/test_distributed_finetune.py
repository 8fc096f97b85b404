"""Two processes on the CPU (torchrun + Accelerate, gloo): diffusion fine-tuning inside DDP.

A driver script runs ``autoprog.diffusion.runner.finetune`` under torchrun for several methods in one launch
(one process-group start-up for all of them), with a DiffusionTrainer subclass that, after ``fit``, has every
rank save its own weights and what it saw (the trainer itself writes only on rank 0). The test then checks:

* ``prog``: the learnable parameter set changes at every stage, so DDP must be re-prepared each time
  (``_rewrap_if_needed``); without that the newly unfrozen blocks would train apart on the two ranks;
* ``autoprog-zero`` and ``autoprog-one``: the choice made at each stage is rank 0's (broadcast), so both ranks
  follow one schedule;
* ``lora-r4``: peft's adapters inside DDP;

and that the CLI itself runs a fine-tuning under torchrun, printing its progress once. Every launch runs with a
short process-group timeout, so a collective that one process never joins fails in seconds, not 30 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_base_dit
from safetensors.torch import load_file
from test_distributed import PORT_RACE, torchrun_env

from autoprog.diffusion.trainer import DiffusionConfig

pytestmark = pytest.mark.slow

STEPS = 8  # 4 stages of 2 steps; 150 training images (classes 5-9), 8 per process and step on 2 processes
# method -> steps; autoprog-one gets 4-step stages, so that its supernet phase samples 3 candidates (one step
# would make it train a single candidate, the full model here, and never re-wrap)
METHODS = {"prog": STEPS, "autoprog-zero": STEPS, "autoprog-one": 2 * STEPS, "lora-r4": STEPS}

DRIVER = textwrap.dedent('''
    import json
    import sys
    from dataclasses import replace
    from datetime import timedelta
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    import autoprog.diffusion.runner as runner
    from autoprog.accelerator import end_processes, leave_process
    from autoprog.diffusion.runner import FinetuneSpec
    from autoprog.diffusion.trainer import DiffusionConfig

    base, data_root, cache_dir, root, methods, pg_timeout, mixed_precision = sys.argv[1:8]
    root = Path(root)

    def stack_depth():
        frame, n = sys._getframe(), 0
        while frame is not None:
            frame, n = frame.f_back, n + 1
        return n


    class RecordingTrainer(runner.DiffusionTrainer):
        def _train_step(self, batch=None):
            # how deep the first block runs below _train_step: wrappers piling up around forward show here
            base = stack_depth()
            depths = self.__dict__.setdefault("forward_depths", [])
            hook = self.model.blocks[0].register_forward_pre_hook(lambda m, a: depths.append(stack_depth() - base))
            try:
                return super()._train_step(batch)
            finally:
                hook.remove()

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
                    # entries for this model Accelerate still holds after fit: re-preparing replaces the old one
                    # and a finished run releases it, so a comparison's later runs do not keep it alive
                    "wrappers_held": sum(getattr(m, "module", m) is self.model for m in self.acc._models),
                    "forward_depths": self.forward_depths}
            (d / f"rank{rank}.json").write_text(json.dumps(info))
            return res


    import autoprog.diffusion.trainer as trainer_module
    from autoprog.diffusion.quality import to_uint8
    from autoprog.diffusion.sampling import balanced_labels
    from autoprog.errors import DivergedError

    one_process_sample = trainer_module.sample
    sampled = []  # (samples asked for, samples this process made) per sample() call


    def counting_sample(model, conditions, *args, **kwargs):
        out = one_process_sample(model, conditions, *args, **kwargs)
        sampled.append([len(conditions), len(out)])
        return out


    trainer_module.sample = counting_sample


    class EvaluatingTrainer(RecordingTrainer):
        def fit(self, resume=False):
            res = super().fit(resume)
            rank = self.acc.process_index
            d = root / "ranks" / self.run_info["method"]
            info = json.loads((d / f"rank{rank}.json").read_text())
            info["sampled"] = list(sampled)
            info["evaluator"] = type(self.evaluator).__name__  # built by the main process alone
            sampled.clear()
            # the evaluation images, sampled in shares and gathered, against one process sampling them all
            conds = self.data.conditions(balanced_labels(self.data.classes, 7))
            gathered = self._eval_images(conds, seed=5)
            if rank == 0:
                alone = to_uint8(self.data.decode(one_process_sample(
                    self.eval_model(), conds, steps=self.cfg.sample_steps, cfg_scale=self.cfg.cfg_scale, seed=5,
                    eta=self.cfg.sample_eta)))
                info["gathered_vs_alone"] = [list(gathered.shape), list(alone.shape),
                                             int((gathered.int() - alone.int()).abs().max())]
            else:
                info["gathered_vs_alone"] = gathered
            # a non-finite sample on one process stops both (no process left waiting in a collective)
            decode = self.data.decode
            if rank == 1:
                self.data.decode = lambda x: torch.full_like(decode(x), float("nan"))
            try:
                self._eval_images(conds, seed=5)
                info["nan_raised"] = None
            except DivergedError as e:
                info["nan_raised"] = str(e)
            finally:
                self.data.decode = decode
                sampled.clear()  # the next method's count starts empty
            (d / f"rank{rank}.json").write_text(json.dumps(info))
            return res


    runner.DiffusionTrainer = EvaluatingTrainer  # finetune() looks the trainer up in its module
    cfg = DiffusionConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=1, eval_points=2, curve_samples=8,
                          fd_samples=16, sample_steps=2, proxy_batches=2, proxy_batch_size=4, time_repeats=1)
    # a collective that one process never joins fails after pg_timeout seconds instead of hanging for 30 minutes
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=int(pg_timeout)))
    acc = Accelerator(cpu=True, mixed_precision=mixed_precision, kwargs_handlers=[pg])
    for item in methods.split(","):
        method, steps = item.split(":")
        # AutoProg-One with an EMA: the DDP wrappers its supernet phase builds mid-stage must not upset the EMA's
        # deferred updates
        ema = 0.9 if method == "autoprog-one" else None
        spec = FinetuneSpec(method=method, base=base, data_root=data_root, cache_dir=cache_dir, feature_epochs=1,
                            train=replace(cfg, steps=int(steps), ema_decay=ema))
        runner.finetune(spec, root / method, acc)
    end_processes(acc)  # wait for each other, then destroy the group, as autoprog's CLI does
    leave_process(0)  # skipping the interpreter's shutdown, as autoprog's CLI does
''')


# `python -m autoprog.cli ARGS` with the process group created beforehand with a short timeout (Accelerate uses
# a group that exists), so that a deadlock fails in seconds instead of hanging for gloo's default 30 minutes
CLI_WRAPPER = textwrap.dedent('''
    import runpy
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=int(sys.argv[1])))
    sys.argv = ["autoprog", *sys.argv[2:]]
    runpy.run_module("autoprog.cli", run_name="__main__", alter_sys=True)
''')


def _launch(cmd: list[str], cwd, run_dir, timeout: int = 200):
    """Run a torchrun command line on the CPU; returns (exit status, combined log).

    As test_distributed's ``_torchrun`` (one more try, from an empty run directory, when the rendezvous port
    was taken), but in its own session so that a run past ``timeout`` is killed with all its workers.
    """
    env = torchrun_env(scratch := tempfile.mkdtemp())
    try:
        for _attempt in range(2):
            shutil.rmtree(run_dir, ignore_errors=True)
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                log, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
                log, _ = proc.communicate()
                pytest.fail(f"torchrun did not finish in {timeout}s:\n{log[-6000:]}")
            if proc.returncode == 0 or not any(m in log for m in PORT_RACE):
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return proc.returncode, log


@pytest.fixture(scope="module")
def base(fake_fmnist, cache_dir, tmp_path_factory):
    train = DiffusionConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, eval_points=1, curve_samples=8,
                            fd_samples=16, sample_steps=2, ema_decay=0.9)
    return tiny_base_dit(fake_fmnist, cache_dir, tmp_path_factory.mktemp("ddp-base"), train)


def _run_driver(work, base, fake_fmnist, cache_dir, methods: dict[str, int], mixed_precision="no"):
    """Fine-tune with each of ``methods`` (name -> steps) in one torchrun launch, FD/KID made rank-local."""
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    runs = ",".join(f"{m}:{n}" for m, n in methods.items())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(base), str(fake_fmnist), str(cache_dir), str(work / "run"), runs, "60", mixed_precision]
    rc, log = _launch(cmd, cwd=work, run_dir=work / "run")
    assert rc == 0, f"torchrun failed ({rc}):\n{log[-6000:]}"
    return work / "run", log


@pytest.fixture(scope="module")
def ddp_runs(base, fake_fmnist, cache_dir, tmp_path_factory):
    """One torchrun launch that fine-tunes with every method of METHODS, one after the other."""
    return _run_driver(tmp_path_factory.mktemp("ddp-finetune"), base, fake_fmnist, cache_dir, METHODS)


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
    n = METHODS[method]
    assert res["summary"]["steps"] == res["summary"]["total_steps"] == n
    assert [p["step"] for p in res["curve"]] == [n // 2, n] and all("fd" in p for p in res["curve"])
    assert (run / method / "model" / "model.safetensors").is_file()
    infos, _ = _ranks(run, method)
    assert [i["rank"] for i in infos] == [0, 1] and [i["world"] for i in infos] == [2, 2]
    assert all("MULTI_CPU" in i["distributed_type"] for i in infos)
    assert all(i["steps"] == i["total_steps"] == n for i in infos)
    assert all(i["wrapped"] == "DistributedDataParallel" and i["wrapped_module_is_model"] for i in infos)
    depths = [d for i in infos for d in i["forward_depths"]]
    assert len(depths) == 2 * n and len(set(depths)) == 1, depths
    assert "terminate called" not in log


@pytest.mark.parametrize("method", [m for m in METHODS if not m.startswith("lora")])
def test_rewrapping_replaces_the_model_in_accelerate(ddp_runs, method):
    infos, _ = _ranks(ddp_runs[0], method)
    assert [i["wrappers_held"] for i in infos] == [0, 0]


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
    # printed by the main process only: once per progressive method of the launch
    assert log.count("stage 4/4: 28px") == sum(not m.startswith("lora") for m in METHODS)
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


@pytest.mark.parametrize("method", ["autoprog-zero", "autoprog-one"])
def test_searching_methods_follow_rank_zeros_choices(ddp_runs, method):
    run, log = ddp_runs
    infos, _ = _ranks(run, method)
    res = json.loads((run / method / "results.json").read_text())
    log0, log1 = infos[0]["stage_log"], infos[1]["stage_log"]
    assert log0 == res["stages"]
    n = METHODS[method]
    starts = [0, n // 4, n // 2, 3 * n // 4, n]
    assert [s["step"] for s in log0] == [s["step"] for s in log1]
    assert [s["stage"] for s in log0] == [0, 1, 2, 3]
    for k, s in enumerate(log0):  # zero-shot: at the stage start; autoprog-one: when its supernet phase ends
        assert starts[k] <= s["step"] < starts[k + 1] and (method != "autoprog-zero" or s["step"] == starts[k])
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
    if method == "autoprog-zero":  # its candidate table, printed by the main process only, once per search
        assert log.count("ntk_cond") == 3
    sched = json.loads((run / method / "schedule.json").read_text())
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
    wrapper = tmp_path / "cli_wrapper.py"
    wrapper.write_text(CLI_WRAPPER)
    out = tmp_path / "cli-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper), "15",
           "finetune", "--method", "prog", "--base", str(base), "--data-root", str(fake_fmnist),
           "--cache-dir", str(cache_dir), "--out", str(out), "--steps", str(STEPS), "--batch-size", "8",
           "--eval-points", "2", "--curve-samples", "8", "--fd-samples", "16", "--sample-steps", "2",
           "--feature-epochs", "1", "--cpu"]
    rc, log = _launch(cmd, cwd=tmp_path, run_dir=out)
    assert rc == 0, log[-4000:]
    assert "terminate called" not in log
    res = json.loads((out / "results.json").read_text())
    assert res["done"] is True and res["summary"]["steps"] == STEPS
    assert log.count("stage 4/4") == 1, "progress is printed by the main process only"
    assert log.count("done: ") == 1
    assert (out / "model" / "model.safetensors").is_file()


def test_rewrapping_under_mixed_precision_does_not_nest_forward_wrappers(base, fake_fmnist, cache_dir, tmp_path):
    run, _ = _run_driver(tmp_path, base, fake_fmnist, cache_dir, {"prog": STEPS}, mixed_precision="bf16")
    infos, (r0, r1) = _ranks(run, "prog")
    _assert_same_weights(r0, r1)
    depths = [d for i in infos for d in i["forward_depths"]]
    assert len(depths) == 2 * STEPS
    assert len(set(depths)) == 1, f"the forward runs deeper after each re-wrap: {depths}"


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_samples_are_shared_out_and_scored_on_the_main_process(ddp_runs, method):
    """Each process samples half of every evaluation (the curve point's 8 images, the final 16); the main process
    gets them all, the images one process would make, and alone builds the evaluator and scores them; a
    non-finite sample on one process stops both."""
    infos, _ = _ranks(ddp_runs[0], method)
    assert [i["sampled"] for i in infos] == [[[8, 4], [16, 8]]] * 2
    gathered, alone, differ = infos[0]["gathered_vs_alone"]
    assert gathered == alone and gathered[0] == 7 and differ <= 1  # a smaller batch may round a pixel apart
    assert infos[1]["gathered_vs_alone"] is None
    assert [i["evaluator"] for i in infos] == ["QualityEvaluator", "ScoredOnMainProcess"]
    assert all(i["nan_raised"] and "not finite" in i["nan_raised"] for i in infos), [i["nan_raised"] for i in infos]


FOLDER_DRIVER = textwrap.dedent('''
    import json
    import sys

    import torch
    from accelerate import Accelerator

    import autoprog.data as data_mod
    import autoprog.diffusion.data as ddata
    from autoprog.accelerator import end_processes, leave_process
    from autoprog.errors import DataError

    folder, out = sys.argv[1:3]
    acc = Accelerator(cpu=True)
    reads = []
    real = data_mod.read_image
    data_mod.read_image = lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k)
    first = ddata.load_diffusion_data(folder, classes=None, image_size=16, accelerator=acc)
    first_reads = list(reads)
    again = ddata.load_diffusion_data(folder, classes=None, image_size=16, accelerator=acc)  # held: no decoding
    again_reads = len(reads) - len(first_reads)
    ddata._DECODED.clear()
    alone = ddata.load_diffusion_data(folder, classes=None, image_size=16)  # this process alone, every image
    same = all(torch.equal(getattr(first, k), getattr(alone, k))
               for k in ("train_images", "train_labels", "test_images", "test_labels"))
    # an unreadable image in process 1's share of the training split stops both, neither waiting for the other
    bad = sorted(p for p in reads if "/train/" in p)[-1]
    if acc.process_index == 1:
        data_mod.read_image = lambda path, *a, **k: (_ for _ in ()).throw(DataError(f"cannot read image {path}")) \\
            if str(path) == bad else real(path, *a, **k)
    ddata._DECODED.clear()
    try:
        ddata.load_diffusion_data(folder, classes=None, image_size=16, accelerator=acc)
        error = None
    except DataError as e:
        error = str(e)
    # a file gone while process 1 lists the folder: both stop, neither waiting for the other
    data_mod.read_image = real
    real_manifest = ddata._manifest
    if acc.process_index == 1:
        ddata._manifest = lambda splits: (_ for _ in ()).throw(FileNotFoundError(f"{bad}: gone"))
    try:
        ddata.load_diffusion_data(folder, classes=None, image_size=16, accelerator=acc)
        listing = None
    except (DataError, OSError) as e:
        listing = f"{type(e).__name__}: {e}"
    # process 1 sees one training image fewer (the folder changed while it was listed): both stop
    ddata._manifest = real_manifest if acc.process_index == 0 else lambda splits: "another list"
    try:
        ddata.load_diffusion_data(folder, classes=None, image_size=16, accelerator=acc)
        apart = None
    except DataError as e:
        apart = str(e)
    with open(f"{out}/rank{acc.process_index}.json", "w") as f:
        json.dump({"reads": first_reads, "again": again_reads, "same": same, "error": error, "listing": listing,
                   "apart": apart}, f)
    end_processes(acc)
    leave_process(0)
''')


def test_an_image_folder_is_decoded_in_shares_by_the_processes(image_folder, tmp_path):
    """Fine-tuning on an ImageFolder under two processes: each decodes half of each split (5 of 10 training, 2 of
    4 validation images) and both hold every image, equal to one process's read; a second read while held decodes
    nothing; an unreadable image in one process's share, a file gone while one process lists the folder, or
    processes that list different files, stop both."""
    driver = tmp_path / "folder_driver.py"
    driver.write_text(FOLDER_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(image_folder), str(tmp_path)]
    rc, log = _launch(cmd, cwd=tmp_path, run_dir=tmp_path / "scratch")
    assert rc == 0, f"torchrun failed ({rc}):\n{log[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert sum("/train/" in p for p in r["reads"]) == 5 and sum("/val/" in p for p in r["reads"]) == 2
        assert r["again"] == 0 and r["same"]
    assert not set(ranks[0]["reads"]) & set(ranks[1]["reads"])
    assert "cannot read image" in ranks[1]["error"] and "another process could not read" in ranks[0]["error"]
    assert ranks[1]["listing"].startswith("FileNotFoundError") and "another process could not list" in ranks[0]["listing"]
    assert all("the processes see different files" in r["apart"] for r in ranks)


CLASS_IMAGES_DRIVER = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    tests, work = sys.argv[1:3]
    sys.path.insert(0, tests)
    import test_text_to_image as t2i

    import autoprog.diffusion.sampling as sampling
    from autoprog.accelerator import end_processes, leave_process
    from autoprog.diffusion.dreambooth import class_images, read_images
    from autoprog.errors import ConfigError, DataError

    work = Path(work)
    work.mkdir(exist_ok=True)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    model, logs, sampled = t2i.tiny(), [], []
    real_sample = sampling.sample

    def counted(*a, **k):
        x = real_sample(*a, **k)
        sampled.append(len(x))
        return x

    sampling.sample = counted

    def make(n, folder, **k):
        return class_images(model, lambda x: x, "a photo of a dress", n, folder, 8, 1, 2, 4.0, 1.0, 0,
                            log=logs.append, accelerator=acc, **k)

    def outcome(call):
        try:
            call()
            return None
        except (ConfigError, DataError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"

    folder = work / "class"
    first = make(5, folder)
    first_sampled = list(sampled)
    on_disk = read_images(folder, 8, 1)
    more = make(7, folder)  # topped up: 2 more, one on each process
    more_sampled = sampled[len(first_sampled):]
    again = make(7, folder)  # all there: none generated
    again_sampled = len(sampled) - len(first_sampled) - len(more_sampled)
    alone = None
    if rank == 0:  # one process alone, into another folder: the same images, 5 then topped up to 7
        for n in (5, 7):
            alone = class_images(model, lambda x: x, "a photo of a dress", n, work / "alone", 8, 1, 2, 4.0, 1.0, 0,
                                 log=lambda *_: None)
    # the main process cannot write the folder: both stop with its message
    (work / "a-file").write_text("x")
    unwritable = outcome(lambda: make(2, work / "a-file" / "class"))
    # process 1's sampling fails: both stop, neither waits for the other
    sampling.sample = (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))) if rank == 1 \\
        else counted
    failed = outcome(lambda: make(3, work / "other"))
    sampling.sample = counted
    # an unreadable image in the main process's folder: both stop with its message
    (work / "broken").mkdir(exist_ok=True)
    (work / "broken" / "class-00000.png").write_bytes(b"not a png")
    unreadable = outcome(lambda: make(2, work / "broken"))
    # a folder with a user's image that sorts after the new ones, and a gap: nothing overwritten, and every
    # process gets what the folder reads back
    import autoprog.diffusion.dreambooth as db
    mixed = work / "mixed"
    if rank == 0:
        db.write_images(first[:1], mixed, start=1)  # class-00001.png only
        db.write_images(first[1:2], mixed, prefix="dog")  # dog-00000.png
    acc.wait_for_everyone()
    got = make(4, mixed)
    mixed_ok = torch.equal(got, read_images(mixed, 8, 1)) and len(list(mixed.iterdir())) == 4
    # the main process cannot list its folder: both stop with its message
    real_files = db.image_files
    if rank == 0:
        db.image_files = lambda folder: (_ for _ in ()).throw(PermissionError(f"{folder}: permission denied"))
    unlisted = outcome(lambda: make(2, work / "locked"))
    db.image_files = real_files
    out = {"mixed_ok": mixed_ok, "unlisted": unlisted, "first_sampled": first_sampled, "more_sampled": more_sampled, "again_sampled": again_sampled,
           "equal_disk": torch.equal(first, on_disk), "kept": torch.equal(more[:5], first),
           "again_same": torch.equal(again, more), "shape": list(more.shape), "logs": logs,
           "files": len(list(folder.glob("class-*.png"))), "unwritable": unwritable, "failed": failed,
           "unreadable": unreadable, "more": more.tolist(),
           "alone_differ": None if alone is None else int((alone.int() - more.int()).abs().gt(1).sum())}
    with open(work / f"rank{rank}.json", "w") as f:
        json.dump(out, f)
    end_processes(acc)
    leave_process(0)
''')


def test_dreambooth_class_images_are_generated_in_shares_by_the_processes(tmp_path):
    """Prior preservation under two processes: each samples half of the missing class images (2 and 3 of 5, then
    1 and 1 of the 2 topping them up to 7, then none), the main process writes them, and both return the same
    images, those the folder holds (read back, as a resumed run reads them) and one process alone makes; added
    images overwrite none there; the main process's unwritable, unreadable or unlistable folder, or one process's
    failed sampling, stop both."""
    driver, work = tmp_path / "class_driver.py", tmp_path / "work"
    driver.write_text(CLASS_IMAGES_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           str(Path(__file__).parent), str(work)]
    rc, log = _launch(cmd, cwd=tmp_path, run_dir=work)  # (a retry starts from an empty work directory)
    assert rc == 0, f"torchrun failed ({rc}):\n{log[-6000:]}"
    r0, r1 = (json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["first_sampled"], r1["first_sampled"]) == ([2], [3])
    assert (r0["more_sampled"], r1["more_sampled"]) == ([1], [1]) and r0["again_sampled"] == r1["again_sampled"] == 0
    for r in (r0, r1):
        assert r["equal_disk"] and r["kept"] and r["again_same"] and r["shape"] == [7, 1, 8, 8] and r["files"] == 7
    assert r0["more"] == r1["more"] and r0["alone_differ"] == 0  # (a smaller batch may round a pixel by one)
    assert "generating 5 class images" in r0["logs"][0] and "generating 2" in r0["logs"][1] and not r1["logs"]
    assert all("cannot write images to" in r["unwritable"] for r in (r0, r1))
    assert "out of memory" in r1["failed"] and "another process could not generate" in r0["failed"]
    assert all(r["unreadable"].startswith("DataError: cannot read image") for r in (r0, r1))
    assert r0["mixed_ok"] and r1["mixed_ok"]
    assert all(r["unlisted"].startswith("DataError: cannot read") and "permission denied" in r["unlisted"]
               for r in (r0, r1))


LATENT_WRAPPER = textwrap.dedent('''
    import json
    import runpy
    import sys
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    import autoprog.diffusion.runner as runner

    record = Path(sys.argv[1])
    fit = runner.DiffusionTrainer.fit

    def recording_fit(self, resume=False):
        res = fit(self, resume)
        rank = dist.get_rank()
        (record / f"rank{rank}.json").write_text(json.dumps({
            "pixels": self.data.train_images.device.type, "test_pixels": self.data.test_images.device.type,
            "images": len(self.data.train_images), "latents": self.data.latents.device.type}))
        return res

    runner.DiffusionTrainer.fit = recording_fit
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    sys.argv = ["autoprog", *sys.argv[2:]]
    runpy.run_module("autoprog.cli", run_name="__main__", alter_sys=True)
''')


def test_latent_fine_tuning_holds_the_pixels_on_the_main_process_alone(fake_fmnist, cache_dir, tmp_path):
    """In latent space only the main process, which scores, keeps the images' pixels; the other trains on the
    latents with its pixels dropped to meta tensors (so any read of them would fail, not pass silently), and the
    run ends with the same results as ever."""
    from diffusers import AutoencoderKL

    from autoprog.cli import main

    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=28).save_pretrained(vae_dir)
    flags = ["--batch-size", "8", "--curve-samples", "8", "--fd-samples", "16", "--sample-steps", "2",
             "--feature-epochs", "1", "--eval-points", "1", "--cpu"]
    base = tmp_path / "base"
    assert main(["pretrain", "--task", "diffusion", "--vae", str(vae_dir), "--patch-size", "2", "--hidden-size", "16",
                 "--depth", "2", "--num-heads", "2", "--data-root", str(fake_fmnist), "--cache-dir", str(cache_dir),
                 "--out", str(base), "--steps", "2", *flags]) == 0
    wrapper, record, out = tmp_path / "wrapper.py", tmp_path / "record", tmp_path / "ft"
    wrapper.write_text(LATENT_WRAPPER)
    record.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           str(record), "finetune", "--method", "full", "--base", str(base / "model"), "--data-root", str(fake_fmnist),
           "--cache-dir", str(cache_dir), "--out", str(out), "--steps", "4", *flags]
    rc, log = _launch(cmd, cwd=tmp_path, run_dir=out)
    assert rc == 0, log[-4000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pixels"] == ranks[0]["test_pixels"] == "cpu", "the main process scores against the pixels"
    assert ranks[1]["pixels"] == ranks[1]["test_pixels"] == "meta" and ranks[1]["latents"] == "cpu"
    assert ranks[0]["images"] == ranks[1]["images"] > 0
    assert json.loads((out / "results.json").read_text())["done"] is True
