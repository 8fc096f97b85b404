"""The one reader of autoprog's files (autoprog.formats): strict JSON and YAML, typed fields, one-line errors."""

from __future__ import annotations

import pytest

from autoprog.errors import ConfigError
from autoprog.formats import (
    check_fields,
    check_value,
    parse_json,
    parse_yaml,
    read_json,
    read_json_object,
    read_text,
)


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("data, needle", [
    (b"\xff\xfe{}", "is not UTF-8 text (byte 0 is 0xff)"),
    (b'{"a": NaN}', "NaN is not a number JSON allows"),
    (b'{"a": Infinity}', "Infinity is not a number JSON allows"),
    (b'{"a": 1, "a": 2}', "key 'a' appears twice"),
    (b'{"a": [1, 2', "the file ends early: truncated?"),
    (b"", "is not valid JSON"),
])
def test_damaged_json_is_one_line_naming_the_file(tmp_path, data, needle):
    f = tmp_path / "state.json"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        read_json(f, "checkpoint state")
    line = _one_line(e)
    assert needle in line and str(f) in line


def test_read_text_refuses_folders_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        read_text(tmp_path, "--config")
    with pytest.raises(ConfigError, match="cannot read --config .*nope.yaml"):
        read_text(tmp_path / "nope.yaml", "--config")


def test_a_json_object_is_required_where_one_is_meant(tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, not a list"):
        read_json_object(tmp_path / "c.json", "run settings")
    assert parse_json('{"a": {"b": [1, 2.5, null]}}', "x") == {"a": {"b": [1, 2.5, None]}}


def test_yaml_duplicate_keys_are_refused_at_any_depth():
    assert parse_yaml("a: 1\nb: {c: 2}\n", "c.yaml") == {"a": 1, "b": {"c": 2}}
    assert parse_yaml("", "c.yaml") is None
    with pytest.raises(ConfigError, match=r"c.yaml: key 'epochs' appears twice \(line 3\)"):
        parse_yaml("epochs: 1\nlr: 0.1\nepochs: 2\n", "c.yaml")
    with pytest.raises(ConfigError, match="key 'c' appears twice"):
        parse_yaml("b:\n  c: 1\n  c: 2\n", "c.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: [1\n", "c.yaml")


@pytest.mark.parametrize("value, expected, ok", [
    (3, int, True), (3.0, int, False), (14.5, int, False), ("3", int, False), (True, int, False),
    (2 ** 63 - 1, int, True), (2 ** 63, int, False), (3, float, True), (float("nan"), float, False),
    (float("inf"), float, False), (None, (int, None), True), (None, int, False), ([1, 2], [int], True),
    ([1, "2"], [int], False), ({}, dict, True), ([], dict, False), (True, bool, True), (1, bool, False),
])
def test_check_value(value, expected, ok):
    if ok:
        check_value(value, expected, "f: k")
    else:
        with pytest.raises(ConfigError, match="^f: k"):
            check_value(value, expected, "f: k")


def test_check_fields_required_and_closed():
    schema = {"a": int, "b": (str, None)}
    check_fields({"a": 1}, schema, "f")
    with pytest.raises(ConfigError, match="f lacks 'a'"):
        check_fields({"b": "x"}, schema, "f", required=("a",))
    with pytest.raises(ConfigError, match="unknown key"):
        check_fields({"a": 1, "zz": 2}, schema, "f", closed=True)
    with pytest.raises(ConfigError, match="f must be a mapping, got a list"):
        check_fields([1], schema, "f")


def test_weights_are_read_safely_and_must_be_finite(tmp_path):
    import torch
    from safetensors.torch import save_file

    from autoprog.formats import read_weights

    good = {"w": torch.ones(2, 2), "step": torch.tensor(3)}
    save_file(good, str(tmp_path / "a.safetensors"))
    torch.save({"state_dict": good}, tmp_path / "b.pth")
    for name in ("a.safetensors", "b.pth"):  # a checkpoint's state_dict entry is unwrapped
        assert torch.equal(read_weights(tmp_path / name)["w"], good["w"])
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="bad.safetensors holds non-finite weights"):
        read_weights(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:40])
    torch.save({"w": torch.ones(1), "code": tmp_path}, tmp_path / "pickle.pth")  # not a plain state dict
    for name in ("cut.safetensors", "pickle.pth"):
        with pytest.raises(ConfigError, match=f"{name} cannot be read") as e:
            read_weights(tmp_path / name)
        assert len(str(e.value).splitlines()) == 1
