"""Adaptive regularization: strengths grow by stage (the official rule) or with the sub-network (the size rule),
and reach the batches and the blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ctrl_c_at_step, resumes_like_uninterrupted, tiny_args, tiny_vit
from timm.layers import DropPath

from autoprog.classification.adareg import AdaptiveRegularization, AdaRegRanges
from autoprog.space import GrowthSpace, SubNet

SPACE = GrowthSpace(28, 4, 6, 4, 0.5)


def official_schedule(num_stages, aa_scale=0.5, aa_max=9.0, dp_scale=0.0, dp_max=0.1, re_scale=0.0, re_max=0.25):
    """The official progressive_schedule's RandAugment policies, drop-path rates and erasing probabilities
    (changlin31/AutoProg prog/progressive.py), the oracle of the stage rule."""
    m = [round(max(0.0, i)) for i in np.linspace(aa_scale, 1.0, num_stages) * aa_max]
    dp = [max(0.0, i) for i in np.linspace(dp_scale, 1.0, num_stages) * dp_max]
    re = [max(0.0, i) for i in np.linspace(re_scale, 1.0, num_stages) * re_max]
    return m, dp, re


def test_the_stage_rule_gives_the_official_codes_strengths_stage_by_stage():
    """4 stages: magnitudes 4, 6, 7, 9 (numpy's 7.4999... rounds down, as there), erasing 0 to 0.25, drop path 0
    to 0.1; other stage counts and Table 14's D1 column too; one stage (the original model) at the maximum."""
    reg = AdaptiveRegularization(SPACE)
    assert reg.rule == "stage"
    for n in (2, 3, 4, 5, 6):
        m, dp, re = official_schedule(n)
        got = [reg.stage_values(k, n) for k in range(n)]
        assert [g.randaug_magnitude for g in got] == m
        assert [g.drop_path for g in got] == pytest.approx(dp) and [g.erase_prob for g in got] == pytest.approx(re)
    assert [reg.stage_values(k, 4).randaug_magnitude for k in range(4)] == [4, 6, 7, 9]
    d1 = AdaptiveRegularization(SPACE, AdaRegRanges(erase_prob=(0.0625, 0.25), drop_path=(0.1, 0.2)))
    m, dp, re = official_schedule(4, dp_scale=0.5, dp_max=0.2, re_scale=0.25)
    assert [d1.stage_values(k, 4).drop_path for k in range(4)] == pytest.approx(dp)
    assert [d1.stage_values(k, 4).erase_prob for k in range(4)] == pytest.approx(re)
    assert reg.stage_values(0, 1) == reg.stage_values(3, 4)
    with pytest.raises(ValueError, match="at least 0.5"):
        AdaptiveRegularization(SPACE, AdaRegRanges(randaug_magnitude=(0.0, 9.0)))
    with pytest.raises(ValueError, match="stage, size"):
        AdaptiveRegularization(SPACE, rule="depth")


def test_the_stage_rule_ignores_the_subnets_size_and_a_supernet_phase_takes_the_final_strengths():
    """Stage k's strengths whatever sub-network it trains; inside a supernet, the last stage's, with drop-path
    rates over the supernet's blocks that a candidate does not change (the official max model's)."""
    net = tiny_vit(depth=6)
    reg = AdaptiveRegularization(SPACE, AdaRegRanges(drop_path=(0.0, 0.3)))
    rates = lambda: [getattr(net.blocks[i].drop_path1, "drop_prob", 0.0) for i in range(6)]  # noqa: E731
    reg.set_subnet(net, SPACE.full, stage=1, num_stages=4)  # the full model at stage 2: stage 2's strengths
    assert (reg.settings.randaug_magnitude, reg.settings.erase_prob) == (6, pytest.approx(0.25 / 3))
    assert rates() == pytest.approx([0.1 * j / 5 for j in range(6)])
    reg.set_subnet(net, SPACE.subnet(0.5), stage=1, num_stages=4)  # a small one at stage 2: the same strengths
    assert reg.settings == reg.stage_values(1, 4)
    supernet = SubNet(28, 6)
    reg.set_subnet(net, SubNet(20, 3), stage=1, num_stages=4, supernet=supernet)
    assert reg.settings == reg.stage_values(3, 4)
    assert rates() == pytest.approx([0.3 * j / 5 for j in range(6)])  # the supernet's six blocks, not the three's
    reg.randaugment(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert {op.magnitude for op in reg._randaug[1].ops} == {9}


def test_the_stage_rules_randaugment_is_the_official_policy_filled_with_the_datas_mean():
    """rand-m9-mstd0.5-inc1 (the increasing operations, two a time, magnitude std 0.5), filled with the mean
    the data is normalised by; the size rule keeps rand-m9-n2-mstd0.5 with a grey fill."""
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    mean = (0.485, 0.456, 0.406)
    reg = AdaptiveRegularization(SPACE, mean=mean)
    ra = reg.pil_randaugment(3)
    assert [op.name for op in ra.ops] == _RAND_INCREASING_TRANSFORMS and ra.num_layers == 2
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    rotate = next(op for op in ra.ops if op.name == "Rotate")
    assert rotate.kwargs["fillcolor"] == (124, 116, 104)
    size = AdaptiveRegularization(SPACE, rule="size", mean=mean).pil_randaugment(3)
    assert "Posterize" in [op.name for op in size.ops]  # (not PosterizeIncreasing)
    assert next(op for op in size.ops if op.name == "Rotate").kwargs["fillcolor"] == (128, 128, 128)


def test_strengths_run_from_min_at_the_smallest_subnet_to_max_at_the_full_model():
    reg = AdaptiveRegularization(SPACE, rule="size")
    small, full = SPACE.subnet(0.5), SPACE.full
    assert reg.fraction(small) == 0.0 and reg.fraction(full) == 1.0
    lo, hi = reg.values(small), reg.values(full)
    r = AdaRegRanges()
    assert (lo.randaug_magnitude, lo.erase_prob, lo.drop_path) == (r.randaug_magnitude[0], r.erase_prob[0], r.drop_path[0])
    assert (hi.randaug_magnitude, hi.erase_prob, hi.drop_path) == (r.randaug_magnitude[1], r.erase_prob[1], r.drop_path[1])
    mid = SubNet(20, 4)
    f = reg.fraction(mid)
    assert 0.0 < f < 1.0
    # linear in size: (patches × depth − smallest) / (full − smallest)
    size = lambda s: (s.resolution // 4) ** 2 * s.depth  # noqa: E731
    assert f == pytest.approx((size(mid) - size(small)) / (size(full) - size(small)))
    assert reg.values(mid).erase_prob == pytest.approx(0.25 * f)


def test_the_size_rule_sets_linear_drop_path_over_the_active_blocks_and_the_augment_strengths():
    net = tiny_vit(depth=6)
    reg = AdaptiveRegularization(SPACE, AdaRegRanges(drop_path=(0.0, 0.3)), rule="size")
    reg.set_subnet(net, SPACE.full)
    rates = [getattr(net.blocks[i].drop_path1, "drop_prob", 0.0) for i in range(6)]
    assert rates == pytest.approx([0.0, 0.06, 0.12, 0.18, 0.24, 0.3])
    assert all(isinstance(net.blocks[i].drop_path2, DropPath) for i in range(1, 6))
    assert reg.erasing.probability == pytest.approx(0.25)
    reg.randaugment(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))  # builds the grayscale RandAugment
    assert all(op.magnitude == pytest.approx(9.0) for op in reg._randaug[1].ops)
    reg.set_subnet(net, SPACE.subnet(0.5))
    assert reg.erasing.probability == 0.0
    assert all(op.magnitude == pytest.approx(4.5) for op in reg._randaug[1].ops)
    assert net.blocks[2].drop_path1.drop_prob == 0.0


def test_randaugment_and_erasing_change_images_but_not_shapes():
    torch.manual_seed(0)
    import random

    random.seed(0)
    reg = AdaptiveRegularization(SPACE)
    reg.set_subnet(tiny_vit(depth=6), SPACE.full)
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    y = reg.randaugment(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert not torch.equal(x, y)
    rgb = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert reg.randaugment(rgb).shape == rgb.shape
    reg.erasing.probability = 1.0
    z = torch.zeros(8, 1, 28, 28)
    assert not torch.equal(reg.erase(z.clone()), z)


def test_pretrain_with_adareg_runs_and_records_it(cli, fake_fmnist, tmp_path):
    out = tmp_path / "adareg"
    rc, _, err = cli("pretrain", "--method", "prog", "--adareg", "--out", out, *tiny_args(fake_fmnist))
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["done"] and res["summary"]["adareg"] is True


@pytest.mark.parametrize("rule, first_magnitude", [("stage", 4), ("size", 4.5)])
def test_on_decoded_images_adareg_randaugments_in_the_loader_at_each_stages_magnitude(cli, image_folder, tmp_path,
                                                                                        monkeypatch, rule,
                                                                                        first_magnitude):
    """ImageFolder data: RandAugment runs where the images are decoded (the loader), each epoch at its stage's
    magnitude (stage rule: stage 1 of 2's, rounded; size rule: its sub-network's, the smallest's), sent with the
    samples; the trainer does no RandAugment of its own."""
    from autoprog.classification.adareg import AdaptiveRegularization
    from autoprog.data import SeededSamples

    seen, magnitudes, sides = [], [], []
    real_get = SeededSamples.__getitem__

    def recorded(self, item):
        if isinstance(item, tuple):
            seen.append(item[2] if len(item) >= 3 else None)
            out = real_get(self, item)
            magnitudes.append({op.magnitude for op in self.randaugment.ops})
            sides.append((item[3] if len(item) == 4 else None, tuple(out[0].shape[-2:])))
            return out
        return real_get(self, item)

    def host_randaugment(self, x):
        raise AssertionError("decoded images were RandAugmented again by the trainer")

    monkeypatch.setattr(SeededSamples, "__getitem__", recorded)
    monkeypatch.setattr(AdaptiveRegularization, "randaugment", host_randaugment)
    out = tmp_path / "run"
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", out, "--subset", "0", "--batch-size", "4",
                     "--epochs", "2", "--num-stages", "2", "--method", "prog", "--adareg", "--embed-dim", "16",
                     "--depth", "4", "--num-heads", "2", "--patch-size", "4", "--workers", "0", "--no-flops", "--cpu",
                     "--loader-resolution", "stage", "--adareg-rule", rule)
    assert rc == 0, err
    per_epoch = len(seen) // 2  # 10 training images, each read once an epoch
    first, last = set(seen[:per_epoch]), set(seen[per_epoch:])
    assert first == {first_magnitude} and last == {9.0}  # the full model: Table 14's max
    assert all(m == {s} for m, s in zip(magnitudes, seen))  # the workers' operations at the magnitude sent
    # and each image cropped at its stage's resolution, sent with it (--loader-resolution stage)
    first_sides, last_sides = set(sides[:per_epoch]), set(sides[per_epoch:])
    assert len(first_sides) == 1 and last_sides == {(None, (32, 32))}  # the training size: sent as none
    (side, shape), = first_sides
    assert side < 32 and shape == (side, side)


def test_adareg_on_a_subset_of_decoded_images_resumes_from_an_epochs_last_step_identical(cli, image_folder, tmp_path):
    """A --subset smaller than the folder (a Subset over it) takes the workers' RandAugment too; Ctrl-C at an
    epoch's last step (checkpointed before that epoch's evaluation) resumes into the same epoch records, its
    evaluation with its own stage's sub-network, and the same weights as an uninterrupted run."""

    from safetensors.torch import load_file


    args = ["--dataset", image_folder, "--subset", "8", "--batch-size", "4", "--epochs", "3", "--num-stages", "3",
            "--method", "prog", "--adareg", "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size",
            "4", "--workers", "0", "--no-flops", "--cpu"]
    rc, _, err = cli("pretrain", "--out", tmp_path / "full", *args)
    assert rc == 0, err
    with ctrl_c_at_step(1):  # the last of epoch 1's two steps
        rc, _, err = cli("pretrain", "--out", tmp_path / "run", *args)
        assert rc == 130 and "interrupted at step 2" in err, err
    rc, _, err = cli("pretrain", "--resume", tmp_path / "run", "--cpu")
    assert rc == 0, err
    got, want = (json.loads((tmp_path / r / "results.json").read_text())["epochs"] for r in ("run", "full"))
    fields = ("stage", "resolution", "depth", "train_loss")
    assert [[e[k] for k in fields] for e in got] == [[e[k] for k in fields] for e in want]
    a, b = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in ("run", "full"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_autoprog_one_under_the_stage_rule_trains_supernets_at_the_final_strengths_and_each_choice_at_its_stages(
        cli, fake_fmnist, tmp_path, monkeypatch):
    """24 steps, 4 stages of 6, each searched stage's supernet training its first 4 steps: every supernet step at
    the final strengths (magnitude 9, erasing 0.25, the supernet's drop-path rates for every candidate), the chosen
    sub-network's last 2 steps at its stage's (4, 6, 7 as the official 4-stage schedule), the full last stage at 9."""
    seen, nets = [], []
    real_adopt, real_erase = AdaptiveRegularization._adopt, AdaptiveRegularization.erase

    def adopt(self, net, s, rated):
        nets[:] = [net]
        return real_adopt(self, net, s, rated)

    def erase(self, x):
        rates = tuple(round(getattr(b.drop_path1, "drop_prob", 0.0), 6) for b in nets[0].blocks)
        seen.append((self.settings.randaug_magnitude, round(self.erasing.probability, 6), rates))
        return real_erase(self, x)

    monkeypatch.setattr(AdaptiveRegularization, "_adopt", adopt)
    monkeypatch.setattr(AdaptiveRegularization, "erase", erase)
    rc, _, err = cli("pretrain", "--out", tmp_path / "ap", *tiny_args(fake_fmnist, epochs="3"), "--method",
                     "autoprog-one", "--depth", "6", "--alpha", "0", "--search-epochs", "0.5", "--search-min-updates",
                     "0", "--search-samples", "64", "--adareg", "--first-supernet", "random")  # (a choice below 6)
    assert rc == 0, err
    summary = json.loads((tmp_path / "ap" / "results.json").read_text())["summary"]
    sizes = [len(e["candidates"]) for e in summary["search"]]
    # (a stage whose previous choice is already the largest searches one candidate: no supernet, its own strengths)
    want = [m for k, n in enumerate(sizes) for m in ([9] * 4 + [(4, 6, 7)[k]] * 2 if n > 1 else [(4, 6, 7)[k]] * 6)]
    assert sizes[0] > 1 and [m for m, _, _ in seen] == want + [9] * 6
    assert {p for m, p, _ in seen if m == 9} == {0.25} and {p for m, p, _ in seen if m == 4} == {0.0}
    supernet_rates = {r for _, _, r in seen[:4]}
    assert len(supernet_rates) == 1  # one set of rates while the candidates change
    (rates,) = supernet_rates
    assert rates[0] == 0.0 and max(rates) == pytest.approx(0.1)  # the final rate at the supernet's last block
    d = summary["schedule"]["stages"][0]["depth"]  # the choice, compacted to blocks 0..d-1 (the others idle, their rates unread)
    assert d < 6 and {r[:d] for _, _, r in seen[4:6]} == {(0.0,) * d}  # stage 1's rate: 0
    for k, steps in ((1, slice(10, 12)), (2, slice(16, 18))):  # stages 2 and 3's choices: their stage's rates
        d = summary["schedule"]["stages"][k]["depth"]
        want = tuple(round(0.1 * k / 3 * j / max(1, d - 1), 6) for j in range(d))
        assert {r[:d] for _, _, r in seen[steps]} == {want}, k
    assert {r[:6] for _, _, r in seen[-6:]} == {tuple(round(0.1 * j / 5, 6) for j in range(6))}
    config = json.loads((tmp_path / "ap" / "config.json").read_text())
    assert config["adareg_rule"] == "stage"


def test_a_saved_run_with_adareg_from_before_the_stage_rule_keeps_the_size_rule():
    from autoprog.classification.runner import RunSpec

    saved = RunSpec(adareg=True).to_dict()
    assert saved["adareg_rule"] == "stage" and RunSpec.from_dict(saved).adareg_rule == "stage"
    del saved["adareg_rule"]  # saved before the option
    assert RunSpec.from_dict(saved).adareg_rule == "size"
    saved["adareg"] = False  # (without --adareg it stays unread and unwarned)
    assert RunSpec.from_dict(saved).adareg_rule == "stage"


AP_ADAREG = ("--method", "autoprog-one", "--depth", "6", "--alpha", "0", "--search-epochs", "0.5",
             "--search-min-updates", "0", "--search-samples", "64", "--adareg")


@pytest.mark.parametrize("step", [2, 10], ids=["mid-supernet", "mid-stage"])
def test_under_the_stage_rule_a_run_resumed_mid_supernet_or_mid_stage_trains_as_one_never_stopped(
        cli, fake_fmnist, tmp_path, step):
    """Stopped in stage 1's supernet phase (step 2 of 0-3), or in stage 2 after its search (step 10, whose choice
    trains at stage 2's strengths), the resumed run takes the strengths it stopped with: the same weights."""
    resumes_like_uninterrupted(cli, tmp_path, [*tiny_args(fake_fmnist, epochs="3"), *AP_ADAREG], step)


def test_on_decoded_images_an_autoprog_one_supernet_epoch_randaugments_at_the_final_magnitude(cli, image_folder,
                                                                                            tmp_path, monkeypatch):
    """Stage 1 of 2 (two epochs of three steps) searches its first epoch: that epoch's samples carry the final
    magnitude (9), the next one stage 1's (4), the full model's stage 9."""
    from autoprog.data import SeededSamples

    seen = []
    real_get = SeededSamples.__getitem__

    def recorded(self, item):
        if isinstance(item, tuple):
            seen.append(item[2])
        return real_get(self, item)

    monkeypatch.setattr(SeededSamples, "__getitem__", recorded)
    rc, _, err = cli("pretrain", "--dataset", image_folder, "--out", tmp_path / "run", "--subset", "0",
                     "--batch-size", "4", "--epochs", "4", "--num-stages", "2", "--method", "autoprog-one", "--adareg",
                     "--search-epochs", "1", "--search-min-updates", "0", "--alpha", "0", "--search-samples", "8",
                     "--embed-dim", "16", "--depth", "4", "--num-heads", "2", "--patch-size", "4", "--workers", "0",
                     "--no-flops", "--cpu")
    assert rc == 0, err
    per_epoch = len(seen) // 4
    assert [set(seen[e * per_epoch:(e + 1) * per_epoch]) for e in range(4)] == [{9}, {4}, {9}, {9}]


def decoded_search_args(image_folder, workers: str = "0") -> list:
    """Decoded images, 4 epochs of 5 steps, 2 stages: stage 1 searches its first 2 steps (0.4 of an epoch)."""
    return ["--dataset", image_folder, "--subset", "0", "--batch-size", "2", "--epochs", "4", "--num-stages", "2",
            "--method", "autoprog-one", "--adareg", "--search-epochs", "0.4", "--search-min-updates", "0",
            "--alpha", "0", "--search-samples", "8", "--embed-dim", "16", "--depth", "4", "--num-heads", "2",
            "--patch-size", "4", "--workers", workers, "--no-flops", "--cpu"]


def test_on_decoded_images_a_search_ending_mid_epoch_switches_the_magnitude_at_its_end(cli, image_folder,
                                                                                       tmp_path, monkeypatch):
    """Stage 1's search ends after 2 of its first epoch's 5 steps: the images its supernet trained on carry the
    final magnitude (9), every later image of that epoch stage 1's (4): the epoch's rest is re-read at it (what
    was read ahead at 9 is read again, not trained on)."""
    from autoprog.data import SeededSamples

    reads = []
    real_get = SeededSamples.__getitem__

    def recorded(self, item):
        if isinstance(item, tuple):
            reads.append((item[0], item[1], item[2]))
        return real_get(self, item)

    monkeypatch.setattr(SeededSamples, "__getitem__", recorded)
    rc, _, err = cli("pretrain", "--out", tmp_path / "run", *decoded_search_args(image_folder))
    assert rc == 0, err
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert len(summary["search"][0]["candidates"]) > 1
    trained = {}  # each epoch's images, in order, at the magnitude they were last read with
    for key, i, m in reads:
        trained.setdefault(key, {})[i] = m
    epochs = [list(trained[k].values()) for k in sorted(trained)]
    assert epochs == [[9] * 4 + [4] * 6, [4] * 10, [9] * 10, [9] * 10]
    assert len(reads) > 40  # (the first epoch's read-ahead at 9 was read again)


@pytest.mark.parametrize("step", [1, 3])
def test_on_decoded_images_a_run_resumed_around_a_mid_epoch_search_end_trains_as_one_never_stopped(
        cli, image_folder, tmp_path, step):
    """Stopped in the supernet phase (step 1) or after the epoch's rest was re-read at stage 1's magnitude
    (step 3), the resumed run reads the same images at the same magnitudes: the same weights."""
    resumes_like_uninterrupted(cli, tmp_path, decoded_search_args(image_folder), step)


def test_on_decoded_images_the_mid_epoch_switch_gives_the_same_run_with_loader_workers(cli, image_folder, tmp_path):
    """Two persistent loader workers, whose read-ahead at the old magnitude is dropped when the epoch is re-read:
    the same weights as reading in the training process."""
    from safetensors.torch import load_file

    for workers in ("0", "2"):
        rc, _, err = cli("pretrain", "--out", tmp_path / workers, *decoded_search_args(image_folder, workers))
        assert rc == 0, err
    a, b = (load_file(tmp_path / w / "checkpoint" / "model.safetensors") for w in ("0", "2"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_rule_counts_in_a_saved_runs_settings_only_with_adareg(tmp_path):
    """A comparison reuses a finished run whose settings match: the rule differs only when --adareg reads it, and
    a run saved with --adareg before the option (the size rule) is another run than one with today's default."""
    from autoprog.classification.runner import RunSpec, run_differences

    def differ(saved: dict, spec: RunSpec) -> list[str]:
        (tmp_path / "config.json").write_text(json.dumps(saved))
        return run_differences(tmp_path, spec)

    assert differ(RunSpec(adareg_rule="size").to_dict(), RunSpec()) == []
    assert differ(RunSpec(adareg=True, adareg_rule="size").to_dict(), RunSpec(adareg=True)) == [
        "adareg_rule: 'size' there, 'stage' now"]
    old = RunSpec(adareg=True).to_dict()
    del old["adareg_rule"]
    assert differ(old, RunSpec(adareg=True)) == ["adareg_rule: 'size' there, 'stage' now"]
    assert differ(old, RunSpec(adareg=True, adareg_rule="size")) == []


def test_supernet_only_trains_the_full_models_drop_path_rates_throughout():
    from autoprog.algorithms.supernet import SupernetOnly

    ctrl = SupernetOnly(SPACE)
    assert ctrl.training_supernet() == ctrl.full and ctrl.full.depth == SPACE.full.depth


def test_a_rule_without_adareg_is_warned_about_as_unread(fake_fmnist, capsys):
    from autoprog.classification.runner import RunSpec, build_run

    build_run(RunSpec(adareg_rule="size", data_root=str(fake_fmnist), subset=64, depth=2, embed_dim=16, num_heads=2))
    assert "--adareg-rule size set without --adareg: unread" in capsys.readouterr().err
    build_run(RunSpec(adareg=True, adareg_rule="size", data_root=str(fake_fmnist), subset=64, depth=2, embed_dim=16,
                      num_heads=2))
    assert "unread" not in capsys.readouterr().err
