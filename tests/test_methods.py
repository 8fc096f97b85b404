"""The method registry: every method registered once, with the tasks it serves and what its name implies."""

from __future__ import annotations

import pytest

from autoprog.errors import ConfigError
from autoprog.methods import (
    FINETUNE,
    PRETRAIN,
    TRANSFER,
    Method,
    get_method,
    method_names,
    methods_help,
    register_method,
)


def test_each_task_lists_its_methods():
    assert method_names(PRETRAIN) == ("original", "prog", "progstack", "fixed", "autoprog-one", "autoprog-zero",
                                      "supernet-only", "autoprog-one-gain", "autoprog-zero-gain")
    assert set(method_names(FINETUNE)) == {
        "prog", "autoprog-one", "autoprog-zero", "autoprog-zero-gain", "full", "bitfit", "difffit", "lora",
        "lora-r8", "lora-r16", "adapter-parallel", "adapter-sequential", "vpt-deep", "prog-nosid", "autoprog-one-nosid",
        "autoprog-zero-nosid"}
    assert method_names(TRANSFER) == ("full", "prog", "autoprog-zero", "autoprog-zero-gain")


@pytest.mark.parametrize("name, task, base, kind, options", [
    ("lora-r16", FINETUNE, "lora", "static", {"rank": 16}),
    ("lora-r4", FINETUNE, "lora", "static", {"rank": 4}),  # any rank, not only the listed ones
    ("lora", FINETUNE, "lora", "static", {"rank": None}),
    ("autoprog-zero-nosid", FINETUNE, "autoprog-zero", "search", {"sid": False}),
    ("prog-nosid", FINETUNE, "prog", "manual", {"sid": False}),
    ("autoprog-zero-gain", FINETUNE, "autoprog-zero", "search", {"criterion": "gain"}),
    ("autoprog-one-gain", PRETRAIN, "autoprog-one", "search", {"criterion": "gain"}),
    ("difffit", FINETUNE, "difffit", "static", {}),
    ("fixed", PRETRAIN, "fixed", "fixed", {}),
])
def test_a_name_resolves_to_its_base_method_and_what_it_implies(name, task, base, kind, options):
    m = get_method(name, task)
    assert (m.base, m.kind, m.options) == (base, kind, options)


@pytest.mark.parametrize("name, task", [
    ("foo", FINETUNE), ("full-nosid", FINETUNE), ("lora-r", FINETUNE), ("lora-r0", FINETUNE), ("lora-16", FINETUNE),
    ("LORA", FINETUNE), ("autoprog", FINETUNE), ("", FINETUNE), ("autoprog-one-gain", FINETUNE),
    ("full", PRETRAIN), ("lora-r8", PRETRAIN), ("original", FINETUNE),
])
def test_unknown_names_and_methods_of_the_other_task_are_one_line(name, task):
    with pytest.raises(ConfigError, match="choose from") as e:
        get_method(name, task)
    assert "\n" not in str(e.value)


def test_a_name_is_registered_once_and_help_lists_every_method():
    with pytest.raises(ValueError, match="registered already"):
        register_method(Method("prog", "manual", (PRETRAIN,), "again"))
    with pytest.raises(ValueError, match="kind"):
        Method("x", "clever", (PRETRAIN,), "no such kind")
    assert all(f"{name} (" in methods_help(PRETRAIN) for name in method_names(PRETRAIN))
    assert all(f"{name} (" in methods_help(FINETUNE) for name in method_names(FINETUNE))


def test_the_command_line_offers_the_registry(cli):
    rc, out, _ = cli("pretrain", "--help")
    assert rc == 0 and all(name in out for name in method_names(PRETRAIN))
    rc, _, err = cli("pretrain", "--method", "lora-r8", "--out", "x")
    assert rc == 2 and "lora-r8" in err
