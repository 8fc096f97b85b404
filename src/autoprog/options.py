"""Options declared once: dataclass fields carry their help text, and the command line, YAML configs and
``from_dict`` are generated from them.

A spec field is ``name: int = option(64, "images per batch")``; nested spec dataclasses (a run spec's
``train``) contribute their options too. :func:`add_options` adds one argparse flag per field (``--batch-size``;
booleans that default to True get a ``--no-…`` switch), :func:`from_args` builds the spec back from the parsed
flags, and :func:`from_dict` is the one rule for loading a saved spec: every key must be a field (an unknown
key is a one-line :class:`ConfigError` naming it), missing keys take their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Any

from .errors import ConfigError
from .formats import INT64, check_value, kind_of

MAX_IMAGE_SIZE = 65536  # pixels per side: beyond it sizes overflow torch's 64-bit counts before memory runs out


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: typing.Sequence | None = None, metavar: str | None = None, zero_is_none: bool = False,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           below: float | None = None, group: str | None = None, cli: bool = True,
           default_factory: Any = dataclasses.MISSING, show_default: bool = True):
    """A spec field with what the command line needs: ``help``, an optional ``flag`` name, ``choices``, bounds
    (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive; checked by :func:`check_bounds`),
    ``zero_is_none`` (``--subset 0`` means None), an argparse ``group`` and ``cli=False`` for fields that are
    not flags."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "metavar": metavar,
            "zero_is_none": zero_is_none, "bounds": (minimum, maximum, above, below), "group": group, "cli": cli,
            "show_default": show_default}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"option": meta})
    return dataclasses.field(default=default, metadata={"option": meta})


def default(base, name: str, value: Any):
    """``base``'s option ``name`` (help, flag, bounds, group: declared once there) with another default, for a
    subclass's own default: ``batch_size: int = default(OptimConfig, "batch_size", 128)``."""
    return dataclasses.field(default=value, metadata=base.__dataclass_fields__[name].metadata)


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get("option", {"help": "", "flag": None, "choices": None, "metavar": None,
                                     "zero_is_none": False, "bounds": (None,) * 4, "group": None, "cli": True,
                                     "show_default": True})


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _scalar_type(tp) -> tuple[type, bool]:
    """``int | None`` → ``(int, True)``."""
    args = typing.get_args(tp)
    if args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return tp, False


def _is_spec(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def flag_of(f: dataclasses.Field, default: Any) -> str:
    meta = _meta(f)
    if meta["flag"]:
        return meta["flag"]
    if default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def _number(kind: type, flag: str):
    def parse(text: str):
        return parse_number(kind, text)
    parse.__name__ = kind.__name__
    return parse


def parse_number(kind: type, text: str):
    """``text`` as an ``int`` (fitting in 64 bits) or a finite ``float``; else :class:`argparse.ArgumentTypeError`."""
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if kind is int and not INT64[0] <= v <= INT64[1]:
        raise argparse.ArgumentTypeError(f"must be an integer that fits in 64 bits, got {text}")
    return v


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def add_options(parser: argparse.ArgumentParser, spec_cls, *, defaults=None, exclude: set[str] = frozenset(),
                prefix: str = "", groups: dict | None = None) -> None:
    """One flag per field of ``spec_cls`` (and of its nested specs); ``defaults`` (an instance) overrides the
    class defaults, ``exclude`` names dotted fields that get no flag."""
    defaults = defaults if defaults is not None else spec_cls()
    groups = {} if groups is None else groups
    hints = _hints(spec_cls)
    for f in dataclasses.fields(spec_cls):
        meta, path = _meta(f), prefix + f.name
        if not meta["cli"] or path in exclude:
            continue
        value = getattr(defaults, f.name)
        if _is_spec(hints[f.name]):
            add_options(parser, hints[f.name], defaults=value, exclude=exclude, prefix=path + ".", groups=groups)
            continue
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kind, _ = _scalar_type(hints[f.name])
        help_text = meta["help"]
        flag = flag_of(f, value)
        if kind is bool:
            target.add_argument(flag, dest=path, action="store_false" if value else "store_true", help=help_text)
            continue
        if meta["show_default"]:
            shown = "0" if value is None and meta["zero_is_none"] else _show(value)
            help_text = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        kw = {"dest": path, "default": value, "help": help_text}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if not meta["choices"]:
            kw["metavar"] = meta["metavar"] or flag[2:].replace("-", "_").upper()
        if kind in (int, float):
            kw["type"] = _number(kind, flag)
        target.add_argument(flag, **kw)


def from_args(spec_cls, args: argparse.Namespace, *, defaults=None, prefix: str = "", **overrides):
    """The spec of ``spec_cls`` the parsed flags describe (fields without a flag keep ``defaults``')."""
    defaults = defaults if defaults is not None else spec_cls()
    hints = _hints(spec_cls)
    values = {}
    for f in dataclasses.fields(spec_cls):
        path = prefix + f.name
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif _is_spec(hints[f.name]):
            values[f.name] = from_args(hints[f.name], args, defaults=getattr(defaults, f.name), prefix=path + ".")
        elif hasattr(args, path):
            v = getattr(args, path)
            values[f.name] = None if _meta(f)["zero_is_none"] and v == 0 else v
        else:
            values[f.name] = getattr(defaults, f.name)
    spec = spec_cls(**values)
    check_bounds(spec)
    return spec


def check_bounds(spec, prefix: str = "", where: str | None = None) -> None:
    """Raise :class:`ConfigError` (naming the flag, or the file ``where`` and the key) for a value outside its
    field's bounds or choices."""
    hints = _hints(type(spec))
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if _is_spec(hints[f.name]):
            check_bounds(v, prefix + f.name + ".", where)
            continue
        meta = _meta(f)
        if v is None or isinstance(v, bool):
            continue
        name = f"{where}: {prefix}{f.name}" if where else meta["flag"] or "--" + f.name.replace("_", "-")
        if meta["choices"] and v not in meta["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
        if not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v}")
        lo, hi, above, below = meta["bounds"]
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above) \
                or (below is not None and v >= below):
            raise ConfigError(f"{name} must be {_range_text(lo, hi, above, below)}, got {v}")


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _range_text(lo, hi, above, below) -> str:
    left = f"[{_g(lo)}" if lo is not None else (f"({_g(above)}" if above is not None else "(-inf")
    right = f"{_g(hi)}]" if hi is not None else (f"{_g(below)})" if below is not None else "inf)")
    if right == "inf)" and left.startswith("["):
        return f"at least {_g(lo)}"
    if right == "inf)" and left.startswith("("):
        return f"above {_g(above)}"
    return f"in {left}, {right}"


def from_dict(spec_cls, d: dict, *, where: str = "settings", prefix: str = ""):
    """``spec_cls`` from a saved dict: keys must be fields (an unknown one is a one-line error naming it),
    nested specs load recursively, missing keys take the defaults (settings added since the file was written) except
    ``method`` and the nested sections, which every saved spec has."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the spec'} must be a mapping, got {type(d).__name__}")
    hints = _hints(spec_cls)
    names = {f.name for f in dataclasses.fields(spec_cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(prefix + k for k in unknown)}")
    # a saved spec always held its method and nested sections: one without them was cut, not made by an old version
    missing = [k for k in sorted(names) if (k == "method" or _is_spec(hints[k])) and k not in d]
    if missing:
        raise ConfigError(f"{where}: lacks {', '.join(prefix + k for k in missing)}")
    values = {}
    for k, v in d.items():
        if _is_spec(hints[k]):
            values[k] = from_dict(hints[k], v, where=where, prefix=f"{prefix}{k}.")
        else:
            check_value(v, _expected(hints[k]), f"{where}: {prefix}{k}")
            values[k] = v
    try:
        spec = spec_cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not prefix:
        check_bounds(spec, where=where)
    return spec


def _expected(hint) -> tuple:
    """The :func:`~autoprog.formats.check_value` type of a field's annotation (``int | None`` → ``(int, None)``)."""
    kind, optional = _scalar_type(hint)
    return (kind, None) if optional else (kind,)


def option_names(spec_cls, prefix: str = "") -> dict[str, str]:
    """Flag (without ``--``) → dotted field, for every field with a flag."""
    out = {}
    hints = _hints(spec_cls)
    defaults = spec_cls()
    for f in dataclasses.fields(spec_cls):
        if not _meta(f)["cli"]:
            continue
        if _is_spec(hints[f.name]):
            out.update(option_names(hints[f.name], prefix + f.name + "."))
        else:
            out[flag_of(f, getattr(defaults, f.name))[2:]] = prefix + f.name
    return out


def check_types(spec, where: str, prefix: str = "") -> None:
    """Raise a one-line :class:`ConfigError` naming ``where`` and the field for a value of the wrong type (a
    spec made in Python: ``TrainConfig(epochs="2")``), nested specs included; a path (``pathlib.Path``) where a
    string is declared becomes that string."""
    hints = _hints(type(spec))
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if _is_spec(hints[f.name]):
            names = {g.name for g in dataclasses.fields(hints[f.name])}
            if not (dataclasses.is_dataclass(v) and {g.name for g in dataclasses.fields(v)} == names):
                got = type(v).__name__ if dataclasses.is_dataclass(v) else kind_of(v)
                raise ConfigError(f"{where}: {prefix}{f.name} must be a {hints[f.name].__name__}, got a {got}")
            check_types(v, where, prefix + f.name + ".")  # (a TrainConfig in a TransferSpec: the same settings)
            continue
        kind, _ = _scalar_type(hints[f.name])
        if kind is str and isinstance(v, os.PathLike):
            object.__setattr__(spec, f.name, v := os.fspath(v))
        check_value(v, _expected(hints[f.name]), f"{where}: {prefix}{f.name}")


class Spec:
    """Mixin of the run specs: ``to_dict`` (what ``config.json`` holds) and the one ``from_dict`` rule. Made in
    Python, a spec checks its fields' types (:func:`check_types`)."""

    settings_name = "settings"  # how errors name this spec

    def __post_init__(self):
        check_types(self, type(self).__name__)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """The spec saved as ``d``; ``where`` (the file it came from) names it in errors."""
        return from_dict(cls, d, where=where or cls.settings_name)
