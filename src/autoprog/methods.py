"""Every method autoprog runs, registered once (as PEFT's ``register_peft_method``).

A :class:`Method` names the tasks it serves, its kind, the method it runs (``base``) and the settings its name
implies: a ``-gain`` suffix sets our criterion, ``-nosid`` drops the stage identifier, ``lora-rN`` sets the
adapters' rank. The command line's choices and help, ``compare`` and the Python API read this registry; the
tasks build what a method's ``base`` and ``options`` say.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

PRETRAIN, FINETUNE, TRANSFER = "pretrain", "finetune", "transfer"  # transfer: fine-tuning a classifier
KINDS = {
    "manual": "a schedule fixed in advance",
    "fixed": "a schedule you give (--schedule)",
    "search": "a schedule chosen during training",
    "static": "the same learnable parameters for the whole run",
    "supernet": "an elastic supernet trained throughout",
}


@dataclass(frozen=True)
class Method:
    """One registered method: ``name`` as the user writes it, the ``base`` method it runs with ``options`` set."""

    name: str
    kind: str
    tasks: tuple[str, ...]
    help: str
    base: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind must be one of {', '.join(KINDS)}")
        if not self.base:
            object.__setattr__(self, "base", self.name)


_REGISTRY: dict[str, Method] = {}
_LORA = re.compile(r"^lora-r([1-9]\d*)$")


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (once per name)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def method_names(task: str) -> tuple[str, ...]:
    """The registered names serving ``task``, in the order they were registered (``lora-rN`` for any N too)."""
    return tuple(m.name for m in _REGISTRY.values() if task in m.tasks)


def get_method(name: str, task: str) -> Method:
    """The method ``name`` of ``task``; an unknown name is one line listing the known ones."""
    found = _REGISTRY.get(name)
    if found is None and task == FINETUNE and _LORA.match(name):
        found = Method(name, "static", (FINETUNE,), f"LoRA of rank {_LORA.match(name).group(1)}", base="lora",
                       options={"rank": int(_LORA.match(name).group(1))})
    if found is None or task not in found.tasks:
        extra = " (lora-rN for rank N)" if task == FINETUNE else ""
        what = "fine-tuning method" if task == FINETUNE else "method"
        raise ConfigError(f"unknown {what} {name!r}; choose from {', '.join(method_names(task))}{extra}")
    return found


@dataclass(frozen=True)
class SearchSettings:
    """A task's settings that only its searches read: AutoProg-One's, AutoProg-Zero's, and both's."""

    autoprog_one: tuple[str, ...]
    autoprog_zero: tuple[str, ...]
    both: tuple[str, ...]

    def unread_by(self, method: Method) -> tuple[str, ...]:
        """What ``method`` never reads: a saved run of it that differs only in these is the same run."""
        if method.base == "autoprog-one":
            return self.autoprog_zero
        if method.base == "autoprog-zero":
            return self.autoprog_one
        return self.autoprog_one + self.autoprog_zero + self.both


    def users(self) -> dict[str, Callable[[Method], bool]]:
        """Setting → whether a method reads it, for every setting listed here (see :func:`unused_options`)."""
        return {name: (lambda m, name=name: name not in self.unread_by(m))
                for name in self.autoprog_one + self.autoprog_zero + self.both}


def unused_options(given: Iterable[str], methods: Iterable[Method],
                   users: dict[str, Callable[[Method], bool]]) -> list[str]:
    """The settings among ``given`` (dotted option names) that none of ``methods`` reads, by ``users``: setting
    (the last part of its name) → whether a method reads it; a setting not in ``users`` is read by every method."""
    methods = list(methods)
    return [name for name in given if (rule := users.get(name.rsplit(".", 1)[-1])) is not None
            and not any(rule(m) for m in methods)]


def methods_help(task: str) -> str:
    """One clause per registered method of ``task``, for ``--help``."""
    return "; ".join(f"{m.name} ({m.help})" for m in _REGISTRY.values() if task in m.tasks)


BOTH = (PRETRAIN, FINETUNE)
ALL = (PRETRAIN, FINETUNE, TRANSFER)
for _m in (
    Method("full", "static", (FINETUNE, TRANSFER), "every parameter"),
    Method("bitfit", "static", (FINETUNE,), "biases"),
    Method("difffit", "static", (FINETUNE,), "biases and scale factors"),
    Method("lora", "static", (FINETUNE,), "low-rank adapters through peft, --lora-rank", options={"rank": None}),
    Method("lora-r8", "static", (FINETUNE,), "LoRA of rank 8", base="lora", options={"rank": 8}),
    Method("lora-r16", "static", (FINETUNE,), "LoRA of rank 16", base="lora", options={"rank": 16}),
    Method("adapter-parallel", "static", (FINETUNE,), "bottleneck adapters beside each block's attention and MLP, "
           "--adapter-dim", base="adapter", options={"parallel": True}),
    Method("adapter-sequential", "static", (FINETUNE,), "bottleneck adapters after each block's attention and MLP",
           base="adapter", options={"parallel": False}),
    Method("vpt-deep", "static", (FINETUNE,), "VPT-Deep: learnable prompt tokens at every block's input, "
           "--vpt-tokens", base="vpt"),
    Method("original", "manual", (PRETRAIN,), "the full model throughout"),
    Method("prog", "manual", ALL, "uniform linear growth, or unfreezing when fine-tuning"),
    Method("progstack", "manual", (PRETRAIN,), "progressive stacking"),
    Method("fixed", "fixed", (PRETRAIN,), "replay --schedule"),
    Method("autoprog-one", "search", BOTH, "one-shot search on an elastic supernet"),
    Method("autoprog-zero", "search", ALL, "zero-shot proxies' ranked vote"),
    Method("supernet-only", "supernet", (PRETRAIN,), "Table 20's baseline: the elastic supernet trained the whole "
           "run, a random sub-network of the growth space per step, the full model evaluated"),
    Method("autoprog-one-gain", "search", (PRETRAIN,), "autoprog-one with --criterion gain", base="autoprog-one",
           options={"criterion": "gain"}),
    Method("autoprog-zero-gain", "search", ALL, "autoprog-zero with --criterion gain", base="autoprog-zero",
           options={"criterion": "gain"}),
    Method("prog-nosid", "manual", (FINETUNE,), "prog without the stage identifier", base="prog",
           options={"sid": False}),
    Method("autoprog-one-nosid", "search", (FINETUNE,), "autoprog-one without the stage identifier",
           base="autoprog-one", options={"sid": False}),
    Method("autoprog-zero-nosid", "search", (FINETUNE,), "autoprog-zero without the stage identifier",
           base="autoprog-zero", options={"sid": False}),
):
    register_method(_m)
