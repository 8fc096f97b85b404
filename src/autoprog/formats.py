"""The one reader of what autoprog is given: every JSON and YAML file it reads (run folders' ``config.json``,
``schedule.json``, ``state.json``, model folders' configs, ``--config`` files and presets) goes through here, so
each is checked the same way before anything trains.

* text must be UTF-8;
* JSON is strict: ``NaN`` and ``Infinity`` (which Python's ``json`` accepts) and duplicate keys are refused;
* YAML duplicate keys are refused (PyYAML lets the last one win silently);
* :func:`check_fields` checks a mapping against a schema of expected types (integers where integers are meant,
  finite numbers, required keys);
* weights (:func:`read_weights`: a ``.safetensors`` file, or a PyTorch state dict read with ``weights_only``) must
  be readable and finite (:func:`check_finite`).

Every error is a one-line :class:`~autoprog.errors.ConfigError` that names the file, the key and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

INT64 = (-(2 ** 63), 2 ** 63 - 1)


def read_text(path: str | Path, what: str = "") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is a one-line error."""
    name = f"{what} {path}".strip()
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{name} is a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None


def _unique_keys(where: str):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ConfigError(f"{where}: key {k!r} appears twice")
            seen[k] = v
        return seen
    return hook


def _no_constant(where: str):
    def refuse(name: str):
        raise ConfigError(f"{where}: {name} is not a number JSON allows (a non-finite value was saved or typed)")
    return refuse


def _finite(where: str):
    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {text} is too large for a number")
        return value
    return number


def parse_json(text: str, where: str) -> Any:
    """Strict JSON: finite numbers, each key once."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(where), parse_constant=_no_constant(where),
                          parse_float=_finite(where))
    except json.JSONDecodeError as e:
        truncated = " (the file ends early: truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{truncated}") \
            from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a settings file") from None


def read_json(path: str | Path, what: str = "") -> Any:
    """The strict JSON value in ``path`` (see :func:`parse_json`)."""
    return parse_json(read_text(path, what), f"{what} {path}".strip())


def read_json_object(path: str | Path, what: str = "") -> dict:
    """:func:`read_json`, which must be a JSON object."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path}".strip() + f" must hold a JSON object, not a {kind_of(value)}")
    return value


def parse_yaml(text: str, where: str) -> Any:
    """YAML through PyYAML's safe loader, with duplicate keys refused; an empty document is ``None``."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"{where}: a key must be a name or number, got {key!r} "
                                  f"(line {key_node.start_mark.line + 1})") from None
            if key in keys:
                raise ConfigError(f"{where}: key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            keys.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a settings file") from None


def read_yaml(path: str | Path, what: str = "") -> Any:
    return parse_yaml(read_text(path, what), f"{what} {path}".strip())


# ------------------------------------------------------------------------------------------- schemas
def kind_of(value: Any) -> str:
    """How an error names a value's type: mapping, list, string, true/false, integer, number, null, or its class."""
    return {dict: "mapping", list: "list", str: "string", bool: "true/false", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_value(value: Any, expected: Any, where: str) -> None:
    """Raise a one-line error unless ``value`` (read from a file) is of the ``expected`` type.

    ``expected`` is a Python type (``int``, ``float``, ``str``, ``bool``, ``dict``), a tuple of them (any one),
    ``None`` in such a tuple for null, or a list ``[type]`` for a list of them. Integers must fit in 64 bits,
    numbers must be finite, and a float is no integer (``14.5`` is refused where a resolution is meant)."""
    options = expected if isinstance(expected, tuple) else (expected,)
    for option in options:
        if option is None and value is None:
            return
        if isinstance(option, list):
            if isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    check_value(item, option[0], f"{where}[{i}]")
                return
            continue
        if option is None:
            continue
        if option is bool and isinstance(value, bool):
            return
        if isinstance(value, bool):
            continue
        if option is int and isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                raise ConfigError(f"{where} must be an integer that fits in 64 bits, got {value}")
            return
        if option is float and isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value}")
            return
        if option in (str, dict) and isinstance(value, option):
            return
    names = " or ".join(_WANTED.get(o, "a list") if not isinstance(o, list) else "a list" for o in options)
    shown = f"a {kind_of(value)}" if isinstance(value, (dict, list)) else repr(value)
    raise ConfigError(f"{where} must be {names}, got {shown}")


_WANTED = {None: "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
           dict: "a mapping"}


def check_fields(d: Mapping, schema: Mapping[str, Any], where: str, required: tuple[str, ...] = (),
                 closed: bool = False) -> None:
    """Check each key of ``schema`` present in ``d`` with :func:`check_value`; ``required`` keys must be present,
    and with ``closed`` no other key may be."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping, got a {kind_of(d)}")
    unknown = sorted(set(d) - set(schema)) if closed else []
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(map(repr, missing))}")
    for key, expected in schema.items():
        if key in d:
            check_value(d[key], expected, f"{where}: {key}")


def check_finite(tensors, where) -> None:
    """Refuse weights with a NaN or inf (a diverged model saved by mistake) before anything trains or scores."""
    import torch

    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        raise ConfigError(f"{where} holds non-finite weights (a diverged model?)")


def read_weights(path: str | Path) -> dict:
    """The tensors of a weights file: ``.safetensors``, or a PyTorch checkpoint read safely (``weights_only``, timm's
    ``load_state_dict``: a ``state_dict``/``model`` entry is unwrapped). A damaged or foreign file and non-finite
    weights are one-line errors."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            from timm.models import load_state_dict

            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # safetensors / torch.load raise their own types for truncated or foreign files
        raise ConfigError(f"{path} cannot be read ({' '.join(str(e).split())[:120]})") from None
    check_finite(state.values(), path)
    return state
