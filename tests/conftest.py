"""Shared fixtures: a fake Fashion-MNIST directory, tiny models and a tiny command line."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny models are dominated by per-op overhead; with a busy CPU, more threads only oversubscribe it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def interactive_sigint():
    """Give every test Python's own Ctrl-C handler, whatever the suite was launched under.

    A background launch (``nohup pytest &``) starts Python with SIGINT ignored, and autoprog rightly leaves
    an ignored signal ignored; the tests that press Ctrl-C would then test nothing.
    """
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# The fake Fashion-MNIST the tests train on: small, well-formed IDX files with a learnable class pattern.
FAKE_TRAIN, FAKE_TEST = 300, 100


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file (magic 0x00000803 for images, 0x00000801 labels)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.tobytes())


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28×28 uint8 images whose class is visible: class c lights a 3-px horizontal band at row 2 + 2.5c."""
    n = len(labels)
    imgs = np.zeros((n, 28, 28), dtype=np.uint8)
    rows = (2 + (labels * 5) // 2).astype(np.int64)
    for dr in range(3):
        imgs[np.arange(n), rows + dr, 4:24] = 220
    noise = rng.integers(0, 4, size=imgs.shape, dtype=np.uint8) * 10  # a little low-entropy noise
    return np.maximum(imgs, noise)


def make_fake_fashion_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", class_images(y, rng))
        write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    """A fake Fashion-MNIST directory: 300 training and 100 test images, 10 balanced classes."""
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), FAKE_TRAIN, FAKE_TEST)


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder dataset: train/ (5 per class) and val/ (2 per class), classes circle and square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for split, n in (("train", 5), ("val", 2)):
        for cls, colour in (("circle", (255, 0, 0)), ("square", (0, 0, 255))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((20 + i, 24, 3)) * 60).astype(np.uint8)
                arr[5:15, 5:15] = colour
                mode = "L" if i == 0 else "RGB"  # a greyscale file must come out as 3 channels too
                Image.fromarray(arr).convert(mode).save(d / f"{i}.png")
    return root


def tiny_vit(img_size=28, patch_size=4, depth=4, embed_dim=16, num_heads=2, num_classes=10, in_chans=1):
    from autoprog.adapters.vit import ElasticViT
    from autoprog.models.vit import VisionTransformer

    return ElasticViT(VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                        num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                                        num_heads=num_heads))


def tiny_args(data_root: Path, *extra: str, epochs: str = "2", subset: str = "256") -> list[str]:
    """Options for a tiny run: 256 images, batches of 32 (8 steps/epoch), a 4-block 16-wide ViT."""
    return [
        "--data-root", str(data_root), "--subset", subset, "--batch-size", "32", "--epochs", epochs,
        "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size", "4", "--eval-samples", "64", "--no-flops",
        "--cpu", *extra,
    ]


@pytest.fixture
def cli(capsys):
    """Run ``autoprog.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    from autoprog.cli import main

    def run(*argv: str):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse-level mistakes exit instead of returning
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@contextlib.contextmanager
def ctrl_c_at_step(step: int):
    """Within it, pre-training's ``Trainer`` gets a Ctrl-C (SIGINT, as a user's arrives) as it begins
    training step ``step`` (0-based): a run stops with the checkpoint after that step; outside it, as ever."""
    from autoprog.classification.trainer import Trainer

    real = Trainer._train_step

    def ctrl_c(self, batch):
        if self.step == step:
            signal.raise_signal(signal.SIGINT)
        return real(self, batch)

    Trainer._train_step = ctrl_c
    try:
        yield
    finally:
        Trainer._train_step = real


def resumes_like_uninterrupted(cli, tmp_path: Path, args: list, step: int) -> tuple[Path, Path]:
    """``pretrain *args`` run whole into ``tmp_path/full``, and into ``tmp_path/run`` stopped by a Ctrl-C at training
    step ``step`` (see :func:`ctrl_c_at_step`) then resumed; asserts both end with the same weights and returns
    ``(run, full)`` for the caller's further checks."""
    from safetensors.torch import load_file

    run, full = tmp_path / "run", tmp_path / "full"
    rc, _, err = cli("pretrain", "--out", full, *args)
    assert rc == 0, err
    with ctrl_c_at_step(step):
        rc, _, err = cli("pretrain", "--out", run, *args)
        assert rc == 130 and f"interrupted at step {step + 1}" in err, err
    rc, _, err = cli("pretrain", "--resume", run, "--cpu")
    assert rc == 0, err
    a, b = (load_file(r / "checkpoint" / "model.safetensors") for r in (run, full))
    assert all(torch.equal(a[k], b[k]) for k in b), "the resumed run's weights differ from the uninterrupted run's"
    return run, full


def replay_fixed(cli, run_dir: Path, out: Path, *args) -> tuple[dict, dict]:
    """Replay ``run_dir``'s schedule.json with ``pretrain --method fixed``; the two runs' results."""
    import json

    rc, _, err = cli("pretrain", "--method", "fixed", "--schedule", run_dir / "schedule.json", "--out", out, *args)
    assert rc == 0, err
    a, b = (json.loads((d / "results.json").read_text()) for d in (run_dir, out))
    assert b["done"] and b["summary"]["method"] == "fixed"
    return a, b


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The feature classifier's cache: trained once per test module (by its base model's run), then loaded."""
    return tmp_path_factory.mktemp("feature-cache")


def tiny_base_dit(fake_fmnist: Path, cache_dir: Path, out: Path, train) -> Path:
    """A tiny base DiT (4 blocks, 16 wide) trained in this process on fake Fashion-MNIST classes 0-4."""
    from autoprog.diffusion.runner import BaseSpec, pretrain_base

    pretrain_base(BaseSpec(data_root=str(fake_fmnist), hidden_size=16, depth=4, num_heads=2, patch_size=4,
                           feature_epochs=1, cache_dir=str(cache_dir), train=train), out)
    return out / "model"


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state, made with the first Accelerator's precision: start and end these
    tests with a new one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def saved_tensors_and_grads(model, loss_fn) -> tuple[int, dict]:
    """How many tensors autograd keeps for the backward pass of ``loss_fn(model)``, and the gradients it gives
    (cleared after)."""
    import torch

    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return count, grads


def fake_cuda_events(monkeypatch, log: list, gpu_ms, sync_word: str = "event sync") -> None:
    """``torch.cuda.Event`` as a fake on the CPU: ``record()`` reads the device clock ``gpu_ms`` (an iterator of
    milliseconds) and logs "record", ``synchronize()`` logs ``sync_word``; ``torch.cuda.device`` does nothing."""
    import contextlib

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = next(gpu_ms)
            log.append("record")

        def synchronize(self):
            log.append(sync_word)

        def elapsed_time(self, later):
            assert later.at is not None and self.at is not None
            return later.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
