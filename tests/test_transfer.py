"""Fine-tuning a pre-trained classifier on another dataset (Table 4's transfer): the model folder a pre-training run
writes, loading it (or a timm checkpoint) with a new head, unfreezing by learnable blocks, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_args, tiny_vit

from autoprog.classification.pretrained import load_pretrained, locate, save_classifier
from autoprog.errors import ConfigError
from autoprog.space import SubNet

ARCH = {"model": "vit", "img_size": 28, "patch_size": 4, "depth": 4, "embed_dim": 16, "num_heads": 2,
        "drop_path": 0.0, "grid": None}


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, fake_fmnist):
    """A tiny pre-training run (prog, so it grew) that finished and wrote OUT/model."""
    from autoprog.cli import main

    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", "--method", "prog", "--out", str(out), *tiny_args(fake_fmnist, epochs="1")]) == 0
    return out


def saved(tmp_path: Path, **kw) -> Path:
    torch.manual_seed(0)
    net = tiny_vit(**kw)
    return save_classifier(net, tmp_path / "model", {**ARCH, **{k: v for k, v in kw.items() if k in ARCH}})


def test_a_finished_pretraining_run_writes_a_model_folder_that_loads_with_a_new_head(pretrained_run):
    from safetensors.torch import load_file

    model = pretrained_run / "model"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["format"] == "autoprog-classifier/1" and cfg["model"] == "vit" and cfg["num_classes"] == 10
    assert cfg["architecture"]["depth"] == 4 and cfg["method"] == "prog"
    weights = load_file(str(model / "model.safetensors"))
    torch.manual_seed(1)
    net, info = load_pretrained(pretrained_run, num_classes=3, in_chans=1)  # the run folder names its model
    own = net.model.state_dict()
    assert own["head.weight"].shape == (3, 16)
    for key, value in weights.items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
    assert info["build_args"]["depth"] == 4


def test_the_checkpoint_weights_are_what_the_model_folder_holds(pretrained_run):
    from safetensors.torch import load_file

    ck = load_file(str(pretrained_run / "checkpoint" / "model.safetensors"))
    model = load_file(str(pretrained_run / "model" / "model.safetensors"))
    assert set(model) == {k.removeprefix("model.") for k in ck if k.startswith("model.")}
    for key, value in model.items():
        assert torch.equal(ck["model." + key], value)


def test_other_input_channels_adapt_the_first_convolution(tmp_path):
    path = saved(tmp_path)
    net, _ = load_pretrained(path, num_classes=2, in_chans=3)
    w = net.model.patch_embed.proj.weight
    assert w.shape[1] == 3
    torch.manual_seed(0)
    src = tiny_vit()  # the saved model's weights
    # timm's adapt_input_conv repeats the single channel and rescales: the channel sum is the original filter
    assert torch.allclose(w.sum(dim=1), src.model.patch_embed.proj.weight[:, 0], atol=1e-6)
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 2)


def test_unfreezing_trains_only_the_last_blocks_and_the_head_and_runs_every_block(tmp_path):
    net, _ = load_pretrained(saved(tmp_path), num_classes=5, in_chans=1)
    net.set_unfreezing()
    ran = []
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    net.apply_subnet(SubNet(16, 2))
    learnable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert learnable and all(n.startswith(("model.blocks.2.", "model.blocks.3.", "model.norm.", "model.head."))
                             for n in learnable)
    assert any(n.startswith("model.blocks.2.") for n in learnable) and "model.head.weight" in learnable
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    assert ran == [0, 1, 2, 3]
    assert all(p.grad is None for n, p in net.named_parameters() if n not in learnable)
    assert all(p.grad is not None for n, p in net.named_parameters() if n in learnable)
    net.apply_subnet(SubNet(28, 4))  # the whole depth: everything learns
    assert all(p.requires_grad for p in net.parameters())


def test_a_frozen_prefix_keeps_no_graph(tmp_path):
    """Below the first learnable block nothing requires grad, so autograd records nothing there."""
    net, _ = load_pretrained(saved(tmp_path), num_classes=5, in_chans=1)
    net.set_unfreezing()
    net.apply_subnet(SubNet(28, 1))
    outputs = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, a, o: outputs.append(o.requires_grad))
    net(torch.randn(2, 1, 28, 28))
    assert outputs == [False, False, False, True]


def test_a_timm_checkpoint_folder_and_a_weights_file_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    args = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **args)
    folder = tmp_path / "timm"
    folder.mkdir()
    save_file(src.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 7,
                                                    "model_args": args}))
    net, info = load_pretrained(folder, num_classes=3, in_chans=3)
    assert torch.equal(net.model.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert net.model.head.weight.shape == (3, 32) and info["build_args"]["model"] == "timm:vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match="--model timm:NAME"):
        load_pretrained(folder / "model.safetensors", 3, 3)
    with pytest.raises(ConfigError, match="does not fit the model|has shape"):  # the default sizes are other ones
        load_pretrained(folder / "model.safetensors", 3, 3, model="timm:vit_tiny_patch16_224")


def test_bad_bases_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        locate(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        locate(tmp_path / "empty")
    path = saved(tmp_path)
    with pytest.raises(ConfigError, match="drop --model"):
        locate(path, "timm:vit_tiny_patch16_224")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architecture": {**cfg["architecture"], "depth": 3.5}}))
    with pytest.raises(ConfigError, match="depth"):
        locate(path)
    (path / "config.json").write_text(json.dumps({**cfg, "architecture": {**cfg["architecture"], "depth": 6}}))
    with pytest.raises(ConfigError, match="missing"):  # the weights hold 4 blocks
        load_pretrained(path, 2, 1)
    (path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    weights["blocks.0.norm1.weight"][0] = float("nan")
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ConfigError, match="non-finite"):
        load_pretrained(path, 2, 1)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_pretrained(path, 2, 1)


def test_finetune_prog_unfreezes_by_stage_trains_no_frozen_weight_and_resumes(pretrained_run, tmp_path, cli):
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    rc, _, err = cli("finetune", "--task", "classification", "--method", "prog", "--base", pretrained_run,
                     "--dataset", "digits", "--batch-size", "32", "--epochs", "2", "--num-stages", "2",
                     "--start-ratio", "0.5", "--no-flops", "--cpu", "--out", out, "--stop-after-epochs", "1")
    assert rc == 0, err
    before = load_file(str(pretrained_run / "model" / "model.safetensors"))
    ck = load_file(str(out / "checkpoint" / "model.safetensors"))  # after stage 1: blocks 2-3 and the head learn
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight",
                "blocks.1.mlp.fc2.bias"):
        assert torch.equal(before[key], ck["model." + key]), key
    assert not torch.equal(before["blocks.3.attn.qkv.weight"], ck["model.blocks.3.attn.qkv.weight"])
    rc, _, err = cli("finetune", "--resume", out, "--task", "classification")
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["done"] and res["summary"]["method"] == "prog" and res["summary"]["task"] == "transfer"
    assert [s["depth"] for s in res["summary"]["schedule"]["stages"]] == [2, 4]
    assert res["stages"][0]["learnable_blocks"] == [2, 3]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["dataset"] == "digits"
    load_pretrained(out, num_classes=4, in_chans=1)  # the fine-tuned model is itself a base
    after = load_file(str(out / "model" / "model.safetensors"))
    assert not torch.equal(before["blocks.0.mlp.fc1.weight"], after["blocks.0.mlp.fc1.weight"])  # stage 2: all


def test_finetune_autoprog_zero_scores_neighbouring_candidates(pretrained_run, tmp_path, cli):
    out = tmp_path / "az"
    rc, _, err = cli("finetune", "--task", "classification", "--method", "autoprog-zero", "--base", pretrained_run,
                     "--dataset", "digits", "--batch-size", "32", "--epochs", "2", "--num-stages", "2",
                     "--proxy-batches", "2", "--proxy-batch-size", "4", "--no-flops", "--cpu", "--out", out)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    search = res["summary"]["search"][0]
    assert search["candidate_space"] == "neighbours" and len(search["candidates"]) >= 2
    assert all(c["ntk_cond"] > 0 for c in search["candidates"])


def test_finetune_refuses_what_it_does_not_read(pretrained_run, tmp_path, cli):
    base = ["finetune", "--task", "classification", "--base", pretrained_run, "--cpu", "--out", tmp_path / "x"]
    rc, _, err = cli(*base, "--method", "full", "--num-stages", "3")
    assert rc == 2 and "--num-stages" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(*base, "--method", "bitfit")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = cli(*base, "--growth", "mogrow")
    assert rc == 2 and "unrecognized" in err
    rc, _, err = cli("finetune", "--task", "classification", "--base", tmp_path / "none", "--cpu", "--out",
                     tmp_path / "y")
    assert rc == 2 and "does not exist" in err


def test_compare_transfer_measures_against_full_fine_tunings_front(pretrained_run, tmp_path, cli):
    out = tmp_path / "cmp"
    rc, stdout, err = cli("compare", "--task", "transfer", "--methods", "prog", "--base", pretrained_run,
                          "--dataset", "digits", "--subset", "256", "--batch-size", "64", "--epochs", "1",
                          "--front", "0.5", "--no-budget-baseline", "--num-stages", "2", "--no-flops", "--cpu",
                          "--out", out)
    assert rc == 0, err
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["full", "prog", "full@0.5"]
    assert rows[0]["tq_speedup"] is not None and rows[1]["growth"] is None
    md = (out / "summary.md").read_text()
    assert "full's front" in md and "fine-tuned on digits" in md
    assert "\nreading: " in md and "full fine-tuning" in md.rstrip().splitlines()[-1]


def test_unfreezing_volo_trains_its_class_token_and_post_network_with_the_last_blocks():
    from test_adapters import _tiny_volo

    from autoprog.adapters.base import elastic

    net = elastic(_tiny_volo())
    net.set_unfreezing()
    net.apply_subnet(SubNet(net.full_resolution, 1))
    m = net.model
    assert m.cls_token.requires_grad and all(p.requires_grad for p in m.post_network.parameters())
    assert all(p.requires_grad for p in net.blocks[-1].parameters())
    assert not any(p.requires_grad for p in net.blocks[0].parameters())
    assert not any(p.requires_grad for p in m.network[0].parameters())  # the outlookers: a frozen prefix


def test_the_python_api_refuses_what_a_fine_tuning_run_takes_from_its_base(pretrained_run, tmp_path):
    from autoprog.classification.runner import TransferSpec, finetune_classifier

    for bad in ({"adareg": True}, {"depth": 3}, {"growth": "mogrow"}):
        with pytest.raises(ConfigError, match="cannot be set"):
            finetune_classifier(TransferSpec(base=str(pretrained_run), **bad), tmp_path / "x", overwrite=True)
