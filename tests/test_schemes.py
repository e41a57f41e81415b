"""Schemes: presets, validation errors naming file/key/allowed values, round-trips."""

import dataclasses

import pytest
import yaml

from qtoolkit import schemes
from qtoolkit.schemes import QuantScheme, SchemeError

REQUIRED_PRESETS = ["int8", "int8_per_tensor", "int16x8", "weight_only_int8", "w4a8", "w8a4"]


def test_required_presets_exist_and_validate():
    names = schemes.preset_names()
    for name in REQUIRED_PRESETS:
        assert name in names
    for name in names:
        s = schemes.load(name)
        assert s.name == name  # the file's name and its `name:` agree


def test_int8_is_the_papers_recommendation():
    s = schemes.load("int8")
    assert (s.weights.bits, s.weights.symmetric, s.weights.narrow_range, s.weights.granularity) == \
        (8, True, True, "per_channel")
    assert (s.activations.bits, s.activations.symmetric, s.activations.granularity) == (8, False, "per_tensor")
    assert QuantScheme() == dataclasses.replace(s, name="custom", description="")


def test_preset_specifics():
    assert schemes.load("int8_per_tensor").weights.granularity == "per_tensor"
    s16 = schemes.load("int16x8")
    assert s16.activations.bits == 16 and s16.activations.symmetric and s16.weights.bits == 8
    assert schemes.load("weight_only_int8").weight_only
    assert schemes.load("w4a8").weights.bits == 4 and schemes.load("w4a8").activations.bits == 8
    assert schemes.load("w8a4").activations.bits == 4


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_round_trip_dict_and_yaml(name, tmp_path):
    s = schemes.load(name)
    assert QuantScheme.from_dict(s.to_dict()) == s
    path = tmp_path / "s.yaml"
    path.write_text(s.to_yaml())
    assert schemes.load(str(path)) == s


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


BAD = [
    # (yaml text, fragments the single error message must contain)
    ("weights:\n  bitz: 8\n", ["bad.yaml", "weights.bitz", "weights.bits", "weights.granularity"]),
    ("colour: red\n", ["bad.yaml", "unknown key colour", "activations"]),
    ("weights:\n  bits: 1\n", ["bad.yaml", "weights.bits", "2 to 16", "got 1"]),
    ("activations:\n  bits: 17\n", ["bad.yaml", "activations.bits", "2 to 16", "got 17"]),
    ("activations:\n  granularity: per_channel\n", ["bad.yaml", "activations.granularity", "per_tensor"]),
    ("activations:\n  method: magic\n", ["bad.yaml", "activations.method", "minmax", "entropy", "magic"]),
    ("weights:\n  granularity: per_row\n", ["bad.yaml", "weights.granularity", "per_channel", "per_tensor"]),
    ("weights:\n  bits: eight\n", ["bad.yaml", "weights.bits", "int", "eight"]),
    ("weights:\n  symmetric: 1\n", ["bad.yaml", "weights.symmetric", "bool"]),
    ("activations:\n  bits: 16\n", ["bad.yaml", "activations.symmetric"]),
    ("activations:\n  ema_decay: 1.5\n", ["bad.yaml", "activations.ema_decay", "(0, 1)"]),
    ("- int8\n", ["bad.yaml", "mapping"]),
    ("weights: [1, 2\n", ["bad.yaml", "not valid YAML"]),
]


@pytest.mark.parametrize("text,fragments", BAD)
def test_invalid_schemes_give_one_clear_error(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    with pytest.raises(SchemeError) as info:
        schemes.load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_preset_lists_presets():
    with pytest.raises(SchemeError, match="unknown scheme 'int7'.*int16x8.*int8"):
        schemes.load("int7")


def test_missing_file():
    with pytest.raises(SchemeError, match="cannot read scheme file"):
        schemes.load("/nonexistent/scheme.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = _write(tmp_path, "name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(SchemeError, match="not valid YAML"):
        schemes.load(path)
    assert not (tmp_path / "pwned").exists()


def test_replace_overrides_and_validates():
    s = schemes.load("int8").replace(activations={"method": "percentile", "percentile": 99.9})
    assert s.activations.method == "percentile" and s.weights == schemes.load("int8").weights
    with pytest.raises(SchemeError, match="activations.method"):
        s.replace(activations={"method": "nope"})
    with pytest.raises(SchemeError, match="no activations"):
        schemes.load("weight_only_int8").replace(activations={"bits": 8})


def test_defaults_fill_missing_keys(tmp_path):
    s = schemes.load(_write(tmp_path, "weights:\n  bits: 4\n"))
    assert s.weights.bits == 4 and s.weights.granularity == "per_channel"
    assert s.activations == schemes.ActivationQuant()
    assert yaml.safe_load(s.to_yaml())["weights"]["bits"] == 4
