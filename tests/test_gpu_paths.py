"""The code paths a CUDA run takes, checked on the CPU where they run too (#26): the precision a run picks and
the fused AdamW that CUDA parameters get."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import saved_tensors_and_grads, tiny_args
from safetensors.torch import load_file


def test_auto_precision_is_fp32_on_the_cpu_and_explicit_choices_stay():
    from autoprog.accelerator import resolve_precision

    assert resolve_precision("auto", cpu=True) == "no"
    assert resolve_precision("bf16", cpu=True) == "bf16" and resolve_precision("no", cpu=False) == "no"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", cpu=False) == "no"


def test_the_optimizer_is_fused_exactly_when_every_parameter_is_on_cuda():
    from autoprog.optim import build_optimizer

    opt = build_optimizer(torch.nn.Linear(3, 3), 1e-3, 0.05)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    assert build_optimizer(torch.nn.Linear(3, 3), 1e-3, 0.05, fused=True).defaults["fused"]


def test_growth_and_resume_with_fused_adamw(cli, fake_fmnist, tmp_path, monkeypatch):
    """The fused optimizer CUDA runs get follows grown weights and gates (ReZero, identity growth) and resumes from
    a checkpoint to the same weights as an uninterrupted run."""
    import autoprog.optim as optim

    build, made = optim.build_optimizer, []

    def fused_always(m, lr, wd, fused=None):
        made.append(build(m, lr, wd, fused=True))
        return made[-1]

    monkeypatch.setattr(optim, "build_optimizer", fused_always)
    for module in ("autoprog.classification.trainer", "autoprog.diffusion.trainer"):
        monkeypatch.setattr(f"{module}.build_optimizer", optim.build_optimizer)
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "prog", "--growth", "identity", *tiny_args(fake_fmnist)]
    assert cli("pretrain", "--out", a, *args)[0] == 0
    assert cli("pretrain", "--out", b, "--stop-after-epochs", "1", *args)[0] == 0
    rc, _, err = cli("pretrain", "--resume", b, "--cpu")
    assert rc == 0, err
    assert json.loads((b / "results.json").read_text())["done"] is True
    wa, wb = (load_file(r / "checkpoint" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    opt = load_file(b / "checkpoint" / "optimizer.safetensors")
    assert any(".gate" in k for k in opt), "the gates' moments are kept"
    assert made and all(o.defaults["fused"] for o in made)


@pytest.mark.parametrize("fused", [False, True])
def test_shadow_update_builds_the_same_kind_of_optimizer(fused):
    from autoprog.optim import build_optimizer
    from autoprog.steptime import ShadowUpdate

    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, 1e-3, 0.0, fused=fused)
    model(torch.randn(2, 3)).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ShadowUpdate(model.parameters(), opt, 1.0, 0.99)()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "shadow copies only"


class _OneLayer:
    """The engine's update on a one-layer model, with ``--mixed-precision`` ``precision`` (CPU)."""

    def __new__(cls, precision: str):
        from types import SimpleNamespace

        from accelerate import Accelerator

        from autoprog.engine import RunTemplate

        class Tiny(RunTemplate):
            def _set_lr(self, position):
                pass

        t = Tiny.__new__(Tiny)
        t.acc = Accelerator(mixed_precision=precision, cpu=True)
        t.cfg = SimpleNamespace(grad_clip=1.0)
        torch.manual_seed(0)
        t.model = torch.nn.Linear(8, 1)
        t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=0.1)
        t._init_run_state()
        return t


def _step(t, scale_grads: float = 1.0):
    x = torch.full((4, 8), 0.1)
    with t.autocast():
        loss = t.model(x).float().pow(2).mean()  # a loss in fp32, as cross-entropy and MSE are under autocast
    hook = t.model.weight.register_hook(lambda g: g * scale_grads)
    try:
        t._apply_update(loss)
    finally:
        hook.remove()
    t.step += 1


def test_fp16_unscales_before_clipping_and_skips_an_overflow(monkeypatch, fresh_accelerate):
    from autoprog.errors import DivergedError

    t = _OneLayer("fp16")
    assert t._scaler is not None and t._scaler.get_scale() == 65536.0
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        seen.append(float(torch.stack([p.grad.norm() for p in params]).norm()))
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 1)  # the same weights in fp32
    loss = ref(torch.full((4, 8), 0.1)).pow(2).mean()
    loss.backward()
    true_norm = float(torch.stack([p.grad.norm() for p in ref.parameters()]).norm())
    _step(t)
    assert seen[0] == pytest.approx(true_norm, rel=0.05), "clipping sees the unscaled gradients"
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    _step(t, scale_grads=float("inf"))  # an overflow: skipped, the scale halves, no divergence
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert t._scaler.get_scale() == 32768.0
    t.health.check(t.acc)
    for _ in range(t.health.overflow_patience):
        _step(t, scale_grads=float("inf"))
    with pytest.raises(DivergedError, match="overflowed"):
        t.health.check(t.acc)


def test_fp16_training_runs_and_resumes(cli, fake_fmnist, tmp_path, fresh_accelerate):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--method", "prog", "--mixed-precision", "fp16", *tiny_args(fake_fmnist)]
    rc, _, err = cli("pretrain", "--out", a, *args)
    assert rc == 0, err
    assert cli("pretrain", "--out", b, "--stop-after-epochs", "1", *args)[0] == 0
    assert json.loads((b / "checkpoint" / "state.json").read_text())["scaler"]["scale"] > 0
    rc, _, err = cli("pretrain", "--resume", b, "--cpu", "--mixed-precision", "fp16")
    assert rc == 0, err
    wa, wb = (load_file(r / "checkpoint" / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ gradient checkpointing
def _assert_checkpointing_keeps_less_and_changes_no_gradient(model, set_on, loss_fn):
    torch.manual_seed(3)
    plain, grads = saved_tensors_and_grads(model, loss_fn)
    set_on(model)
    torch.manual_seed(3)
    kept, grads_ckpt = saved_tensors_and_grads(model, loss_fn)
    assert kept < plain / 2, (kept, plain)
    assert grads.keys() == grads_ckpt.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gradient_checkpointing_of_a_growing_vit_keeps_less_and_draws_the_same_drop_path():
    from autoprog.adapters.factory import ModelOverrides, build_elastic
    from autoprog.space import SubNet

    net = build_elastic("vit", 10, 1, ModelOverrides(patch_size=4, embed_dim=32, depth=4, num_heads=2,
                                                     drop_path=0.2)).train()
    net.apply_subnet(SubNet(20, 3))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))

    _assert_checkpointing_keeps_less_and_changes_no_gradient(
        net, lambda m: m.set_gradient_checkpointing(True), lambda m: torch.nn.functional.cross_entropy(m(x), y))


@pytest.mark.parametrize("kind", ["dit", "diffusers-dit", "text-unet"])
def test_gradient_checkpointing_of_each_diffusion_backbone(kind):
    from autoprog.diffusion.sampling import diffusion_loss, training_scheduler
    from autoprog.models.dit import build_backbone
    from autoprog.models.text_unet import build_text_unet

    torch.manual_seed(0)
    if kind == "text-unet":
        model = build_text_unet(image_size=8, in_chans=1, channels=(8, 16), text_dim=32, text_layers=1,
                                vocabulary="a photo of a coat".split(), max_length=12)
        model.train_text_encoder = True
        y = model.tokenize(["a photo of a coat"] * 4)
    else:
        model = build_backbone(kind, image_size=8, patch_size=2, in_chans=1, num_classes=4, hidden_size=16, depth=3,
                               num_heads=2)
        y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # the zero-initialised output layers would make most gradients zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    x0 = torch.randn(4, 1, 8, 8)

    def loss(m):
        return diffusion_loss(m, x0, y, training_scheduler(), m.null_condition(y),
                              generator=torch.Generator().manual_seed(0))

    _assert_checkpointing_keeps_less_and_changes_no_gradient(
        model, lambda m: m.set_gradient_checkpointing(True), loss)


def test_gradient_checkpointing_is_an_option_of_both_tasks():
    from autoprog.classification.trainer import TrainConfig
    from autoprog.diffusion.trainer import DiffusionConfig

    assert TrainConfig().gradient_checkpointing is False and DiffusionConfig().gradient_checkpointing is False
    assert "gradient_checkpointing" in TrainConfig.__dataclass_fields__


# ------------------------------------------------------------------------------------------ --compile
@pytest.fixture
def light_compile(monkeypatch):
    """torch.compile through dynamo and AOT autograd without generating C++ (the inductor backend a GPU run uses
    takes minutes to compile on 2 cores); the compile caches start empty and are reset after."""
    import torch._dynamo

    import autoprog.compute as compute

    monkeypatch.setattr(compute, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_grows_through_a_prog_run_to_the_same_weights(cli, fake_fmnist, tmp_path, light_compile):
    """--compile: every block compiled in place (checkpoint names unchanged), recompiled per resolution as the
    network grows, and the trained weights are those of the uncompiled run."""
    import torch._dynamo.utils

    args = tiny_args(fake_fmnist, "--method", "prog", epochs="2")
    assert cli("pretrain", *args, "--out", tmp_path / "plain")[0] == 0
    torch._dynamo.utils.counters.clear()
    assert cli("pretrain", *args, "--compile", "--out", tmp_path / "compiled")[0] == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4, "blocks ran compiled, at several sizes"
    plain = load_file(tmp_path / "plain" / "checkpoint" / "model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "checkpoint" / "model.safetensors")
    assert plain.keys() == compiled.keys()
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)
    cfg = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert cfg["train"]["compile"] is True


def test_an_augmentation_stream_saved_on_another_device_is_reseeded_with_a_warning(capsys):
    """A mid-epoch checkpoint from a CUDA run resumed with --cpu (or the other way): a CUDA generator's state does
    not fit a CPU one, so the rest of the epoch draws from a fresh seed, said in one warning."""
    import random
    from types import SimpleNamespace

    import numpy as np

    from autoprog.classification.trainer import TrainConfig, Trainer

    trainer = SimpleNamespace(cfg=TrainConfig(seed=3), epoch=2, step=17)
    gen = torch.Generator()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state().tolist(), "python": Trainer._rng_states.__globals__["_jsonable"](
              random.getstate()), "generator": [0] * 16, "generator_device": "cuda",
              "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    Trainer._restore_rngs(trainer, states, gen)
    assert "drawn on cuda" in capsys.readouterr().err
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3 * 7 + 2 * 104729 + 17).get_state())


def test_a_device_without_an_index_is_its_indexed_form(monkeypatch):
    """Accelerate names a single GPU ``cuda`` (the current device); tensors and generators there say ``cuda:0``.
    Comparing them with ``==`` sent every diffusion step's noise to be drawn on the host with a CUDA generator."""
    from autoprog.data import same_device, to_device

    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda:1"), "cuda")  # (no GPU to ask here)
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "cuda") and same_device("cpu", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert same_device("cuda", "cuda:0") and same_device("cuda:0", "cuda") and not same_device("cuda:1", "cuda")
    monkeypatch.undo()
    t = torch.ones(2)
    assert to_device(t, torch.device("cpu")) is t


def test_a_fused_optimizers_step_count_is_loaded_onto_the_parameters_device():
    """Torch's fused AdamW kernel reads the step count where the parameter is; checkpoints keep it on the host. As
    torch's own ``load_state_dict`` does: fused or capturable groups get it on the parameter's device as float32,
    others keep a host tensor (here the parameters are on the meta device, to see where each goes)."""
    from autoprog.optim import load_optimizer_state

    saved = {"weight::step": torch.tensor(7.0, dtype=torch.float64), "weight::exp_avg": torch.ones(2, 2)}
    for fused in (True, False):
        model = torch.nn.Linear(2, 2, bias=False, device="meta")
        opt = torch.optim.AdamW(model.parameters(), foreach=False)
        opt.param_groups[0]["fused"] = fused  # (AdamW refuses fused=True for meta parameters)
        load_optimizer_state(opt, model, saved)
        state = opt.state[model.weight]
        assert state["exp_avg"].device.type == "meta"
        if fused:
            assert state["step"].device.type == "meta" and state["step"].dtype == torch.float32
        else:
            assert state["step"].device.type == "cpu" and state["step"] is not saved["weight::step"]


def test_forked_rng_keeps_a_cuda_devices_stream_too(monkeypatch):
    """Scoring, FLOP counts and seeded set-ups fork the training device's generator as well as the host's: on a GPU
    drop path and dropout draw there, and a ``torch.manual_seed`` inside reseeds it."""
    from autoprog.rng import forked_rng

    seen = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices=None, **k: seen.append(devices))
    forked_rng(torch.device("cuda"))
    forked_rng("cpu")
    forked_rng(None)
    assert seen == [[torch.device("cuda")], [], []]
    monkeypatch.undo()
    state = torch.get_rng_state()
    with forked_rng("cpu"):
        torch.manual_seed(123)
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_learned_sigma_diffusers_dit_copies_its_variance_mask_once(monkeypatch):
    """Without the hybrid loss the variance rows' gradients are zeroed by a mask made on the host at load time; on
    a GPU copying it at every backward pass (weight and bias) waited for the device twice a step."""
    import sys

    from autoprog.models.dit import build_backbone

    torch.manual_seed(0)
    m = build_backbone("diffusers-dit", image_size=8, patch_size=4, in_chans=1, num_classes=10, hidden_size=16,
                       depth=1, num_heads=2, learned_sigma=True)
    copies, real = [], torch.Tensor.to

    def to(self, *a, **k):
        caller = sys._getframe(1)
        if caller.f_globals.get("__name__") == "autoprog.models.dit" and caller.f_code.co_name in (
                "<lambda>", "zero_variance_rows"):
            copies.append(caller.f_code.co_name)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    head = m.model.proj_out_2
    for _ in range(3):
        m.zero_grad()
        m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 3])).square().mean().backward()
    assert len(copies) == 1, copies
    out = head.out_features // 16  # rows per pixel of a 4×4 patch (2C), channel fastest
    variance = (torch.arange(head.out_features) % out) >= out // 2
    assert head.weight.grad[variance].abs().sum() == 0 and head.weight.grad[~variance].abs().sum() > 0


def test_in_memory_batches_are_indexed_on_the_images_device(monkeypatch):
    """Fashion-MNIST and digits live on the GPU: a host index into them is copied by the indexing with a blocking
    copy (a wait for every queued step); the index is copied there first, without waiting (here: the meta device,
    to see where it goes)."""
    import autoprog.data as data

    seen, real = [], data.to_device
    monkeypatch.setattr(data, "to_device", lambda t, d: seen.append((t.dtype, torch.device(d))) or real(t, d))
    ds = data.TensorImages(torch.zeros(4, 1, 2, 2, dtype=torch.uint8, device="meta"),
                           torch.zeros(4, dtype=torch.long, device="meta"))
    x, y = ds.__getitems__([0, 2])
    assert seen == [(torch.int64, torch.device("meta"))]
    assert x.shape == (2, 1, 2, 2) and x.device.type == "meta" and y.device.type == "meta"


@pytest.mark.parametrize("capability, local_rank, expected, index", [
    ((9, 0), "0", "bf16", 0), ((8, 0), "1", "bf16", 1), ((7, 0), "0", "no", 0),
    ((9, 0), "3", "bf16", 1),  # more processes than GPUs: Accelerate's local rank modulo the GPUs
    ((9, 0), "-1", "bf16", 0), ((9, 0), "x", "bf16", 0)])  # stray values outside a launcher mean nothing
def test_auto_precision_reads_this_processs_gpu_without_allocating_on_it(capability, local_rank, expected, index,
                                                                       monkeypatch):
    """bf16 where this process's GPU runs it natively (Ampere or later); an older card would emulate it. Read from
    the device's properties: nothing is allocated, on GPU 0 or any other, before the process takes its own."""
    from autoprog.accelerator import resolve_precision

    asked = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: asked.append(i) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("allocates a test tensor"))
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", cpu=False) == expected and asked == [index]
    assert resolve_precision("auto", cpu=True) == "no"


def test_the_budget_matched_run_trains_every_processs_agreed_choice():
    """Each process measured its own wall-clock (a checkpoint stops only the main process's clock), so under
    torchrun they would pick different step counts and their collectives would stop matching: the choice goes
    through ``agree`` (the main process's, broadcast)."""
    from autoprog.experiment import BUDGET_SUFFIX, budget_matched_run

    results = {"original": {"summary": {"wall_time_s": 100.0}}, "prog": {"summary": {"wall_time_s": 50.0}},
               "autoprog-one": {"summary": {"wall_time_s": 60.0}}}
    runs, offered = [], []

    def agree(choice):
        offered.append(choice)
        return "autoprog-one", 30  # what the main process measured

    budget_matched_run(results, "original", ["prog", "autoprog-one"], None, 80,
                       lambda name, steps: runs.append((name, steps)) or {"summary": {}}, log=lambda *a: None,
                       agree=agree)
    assert offered == [("prog", 40)] and runs == [("original" + BUDGET_SUFFIX, 30)]
    assert results["original" + BUDGET_SUFFIX]["summary"]["budget_of"] == "autoprog-one"


def test_the_stage_identifiers_dropout_mask_reaches_the_device_without_waiting(cli, fake_fmnist, tmp_path,
                                                                              monkeypatch):
    """The SID's dropout mask is drawn on the host from the step's seed; every block reads it on the device, so it
    is copied there once per step through ``to_device`` (pinned, not waiting), not by each block."""
    import autoprog.diffusion.trainer as trainer_module

    seen, real = [], trainer_module.to_device
    monkeypatch.setattr(trainer_module, "to_device", lambda t, d: seen.append(t.dtype) or real(t, d))
    rc, _, err = cli("finetune", "--method", "prog", "--steps", "4", "--batch-size", "8", "--eval-points", "1",
                     "--fd-samples", "8", "--curve-samples", "8", "--sample-steps", "2", "--feature-epochs", "1",
                     "--cache-dir", tmp_path / "cache", "--data-root", fake_fmnist, "--out", tmp_path / "ft", "--cpu")
    assert rc == 0, err
    assert seen.count(torch.bool) == 4, seen


@pytest.mark.parametrize("method", ["prog", "autoprog-one"])
def test_a_finished_run_leaves_no_trainer_behind_without_a_garbage_collection(method, fake_fmnist, tmp_path):
    """A comparison runs its methods one after the other in one process: a trainer caught in a reference cycle
    would keep its model, optimizer and data on the GPU through the next run, until a garbage collection that
    nothing asks for. Reference counting alone must free it."""
    import gc

    from autoprog.cli import main
    from autoprog.engine import RunTemplate

    gc.collect()
    gc.disable()
    try:
        assert main(["pretrain", "--method", method, "--out", str(tmp_path / "run"),
                     *tiny_args(fake_fmnist, epochs="4")]) == 0
        alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, RunTemplate)]
    finally:
        gc.enable()
    assert alive == []


class _Built(Exception):
    pass


def _library_calls():
    from autoprog.classification.runner import RunSpec, TransferSpec, compare, finetune_classifier, pretrain
    from autoprog.diffusion.runner import FinetuneSpec, compare_finetune, finetune

    return {"pretrain": lambda out: pretrain(RunSpec(method="prog"), out),
            "compare": lambda out: compare(RunSpec(), ["original", "prog"], out),
            "finetune_classifier": lambda out: finetune_classifier(TransferSpec(method="prog"), out),
            "finetune": lambda out: finetune(FinetuneSpec(method="prog"), out),
            "compare_finetune": lambda out: compare_finetune(FinetuneSpec(), ["full", "prog"], out)}


@pytest.mark.parametrize("call", ["pretrain", "compare", "finetune_classifier", "finetune", "compare_finetune"])
def test_a_library_call_given_no_accelerator_builds_the_clis(call, monkeypatch, tmp_path, fresh_accelerate):
    """A library call without an accelerator gets the CLI's (bf16 on a GPU that runs it, TF32, the launcher's
    group checked), not ``Accelerator()``'s fp32: it asks :func:`default_accelerator` before any work."""
    import autoprog.accelerator as accelerator

    monkeypatch.setattr(accelerator, "default_accelerator", lambda: (_ for _ in ()).throw(_Built()))
    with pytest.raises(_Built):
        _library_calls()[call](tmp_path / "out")


def test_the_default_accelerator_is_the_clis_unless_accelerate_is_set_up(monkeypatch, fresh_accelerate):
    from accelerate import Accelerator

    import autoprog.accelerator as accelerator

    asked = []
    real = accelerator.make_accelerator
    monkeypatch.setattr(accelerator, "make_accelerator",
                        lambda precision, **kw: asked.append(precision) or real(precision, **kw))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert accelerator.default_accelerator().mixed_precision == "no" and asked == ["auto"]  # auto: fp32 on a CPU
    fresh_accelerate_state()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert accelerator.default_accelerator().mixed_precision == "bf16" and asked == ["auto", "bf16"]
    fresh_accelerate_state()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    Accelerator(cpu=True, mixed_precision="bf16")  # the caller's own: followed, not refused by Accelerate
    assert accelerator.default_accelerator().mixed_precision == "bf16" and asked == ["auto", "bf16"]
    fresh_accelerate_state()
    from accelerate import PartialState

    PartialState(cpu=True)  # the caller's own process state: followed too
    assert accelerator.default_accelerator().device.type == "cpu" and asked == ["auto", "bf16"]


def test_the_clis_ddp_wrappers_use_bucket_views_and_broadcast_no_buffers(fresh_accelerate):
    """Every DDP wrapper a command builds (Accelerate's first, and one per trainable set) takes the accelerator's
    DDP settings: gradients as views of the all-reduce buckets, no buffer broadcast before each forward."""
    from autoprog.accelerator import DDP_SETTINGS, make_accelerator

    acc = make_accelerator(cpu=True)
    assert DDP_SETTINGS == {"gradient_as_bucket_view": True, "broadcast_buffers": False}
    assert acc.ddp_handler is not None and acc.ddp_handler.to_kwargs() == DDP_SETTINGS


def fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("counts, chunk_rows, gathers", [([5, 3], 2, 3), ([5, 5], 64, 1), ([4, 0], 3, 2), ([0, 0], 3, 0)])
def test_gather_rows_sends_bounded_chunks_and_keeps_each_processs_rows(counts, chunk_rows, gathers):
    """The main process's rows of every process, in process order, gathered in collectives of at most
    ``chunk_bytes`` per process and never larger than the most rows a process holds (a small evaluation sends
    a small buffer). A stand-in accelerator plays both processes: process 1 sends the rows process 0 sends."""
    from types import SimpleNamespace

    from autoprog.engine import gather_rows

    local = torch.arange(counts[0] * 6, dtype=torch.uint8).view(counts[0], 1, 2, 3)
    sent = []

    def gather(piece):
        sent.append(len(piece))
        return torch.cat([piece, piece])

    acc = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True, device=torch.device("cpu"),
                          gather=gather)
    out = gather_rows(acc, local, counts, chunk_bytes=chunk_rows * 6)
    assert len(sent) == gathers and all(n <= min(chunk_rows, max(counts)) for n in sent), sent
    assert torch.equal(out, torch.cat([local, local[:counts[1]]]))
    with pytest.raises(ValueError, match="holds"):
        gather_rows(acc, torch.zeros(counts[0] + 1, 1, 2, 3, dtype=torch.uint8), counts)


class _Group:
    """An accelerator of two processes that records how its group is torn down."""

    num_processes = 2

    def __init__(self):
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait")

    def end_training(self):
        self.calls.append("destroy")


@pytest.mark.parametrize("ends", ["normally", "failed", "diverged"])
def test_the_cli_waits_for_every_process_before_destroying_the_group_after_a_successful_run(ends, monkeypatch):
    """A gloo group destroyed while the other process still worked (DDP wrappers alive) aborted about one
    two-process run in twenty at exit (SIGABRT after every file was written: a failed CI run). After a command
    that ends alike on every process (done, or diverged) every process waits for the others first; after a
    failure none waits (they may never come), and the group is still destroyed."""
    import autoprog.cli as cli

    group = _Group()
    monkeypatch.setattr(cli, "make_accelerator", lambda *a, **k: group)

    def run(args, acc):
        if ends == "failed":
            raise cli.AutoprogError("a stand-in failure")
        if ends == "diverged":
            raise cli.DivergedError("a stand-in divergence")
        return 0

    monkeypatch.setattr(cli, "_run", run)
    assert cli._main(["compare"]) == {"normally": 0, "failed": 2, "diverged": 3}[ends]
    assert group.calls == (["destroy"] if ends == "failed" else ["wait", "destroy"])


def test_full_precision_finds_the_module_accelerate_patched_inside_a_wrapper():
    """``engine.full_precision`` undoes Accelerate's autocast forward on the module it patched, also when handed a
    DDP-like wrapper (``.module``) or torch.compile's (``._orig_mod``) around it, and puts it back after."""
    from autoprog.engine import full_precision

    class Wrapper(torch.nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            setattr(self, name, inner)

    for name in ("module", "_orig_mod", None):
        inner = torch.nn.Linear(2, 2)
        own = inner.forward
        inner._original_forward, inner.forward = own, lambda x: x  # as Accelerate's prepare_model under bf16
        patched = inner.forward
        outer = Wrapper(name, inner) if name else inner
        with full_precision(outer) as m:
            assert m is outer and inner.forward == own
        assert inner.forward is patched
    plain = torch.nn.Linear(2, 2)
    with full_precision(plain):  # nothing patched: nothing changed
        assert "forward" not in plain.__dict__


class _Event:
    """A CUDA event's stand-in: recorded at ``ms`` milliseconds of device time."""

    def __init__(self, ms):
        self.ms, self.waited = ms, False

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, end):
        return end.ms - self.ms


def test_a_segments_step_times_on_a_gpu_are_the_devices_between_the_marked_steps(monkeypatch, fresh_accelerate):
    """On a GPU a step's host time is the time to queue it; the step times a point records come from the CUDA
    events marked before each step, read once at the segment's end (a step split by a measurement is left out);
    on the CPU they are the host clock's."""
    from autoprog.steptime import StepMark

    t = _OneLayer("no")
    seg = {"step_times": [0.01, 0.01, 0.01]}
    assert t.step_seconds(seg) == [0.01, 0.01, 0.01]  # no marks (the CPU): the clock's
    end = StepMark(9.0, 1, _Event(1000.0))
    monkeypatch.setattr(type(t), "step_marks", property(lambda self: type("M", (), {"mark": lambda s: end})()))
    seg["marks"] = [StepMark(0.0, 0, _Event(0.0)), StepMark(0.1, 0, _Event(250.0)),  # a measurement came after
                    StepMark(0.2, 1, _Event(700.0))]                                # this one: a new stretch
    assert t.step_seconds(seg) == [0.25, 0.3] and end.event.waited
    seg["end_mark"] = StepMark(0.3, 1, _Event(800.0))  # marked as the segment's steps ended, before anything else
    assert t.step_seconds(seg) == [0.25, 0.1]
    from autoprog.classification.trainer import Trainer
    from autoprog.diffusion.trainer import DiffusionTrainer

    assert Trainer.records_step_times and not DiffusionTrainer.records_step_times  # no events a task never reads


def test_pretraining_records_the_segments_step_times_as_step_seconds_gives_them(cli, fake_fmnist, tmp_path,
                                                                                 monkeypatch):
    import json

    from autoprog.classification.trainer import Trainer

    monkeypatch.setattr(Trainer, "step_seconds", lambda self, seg: [0.7, 0.2, 0.4])
    rc, _, err = cli("pretrain", "--method", "prog", "--out", tmp_path / "r", *tiny_args(fake_fmnist, epochs="1"))
    assert rc == 0, err
    curve = json.loads((tmp_path / "r" / "results.json").read_text())["epochs"]
    assert [p["step_time_median_s"] for p in curve] == [0.4]
