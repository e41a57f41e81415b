"""The scheme's `layers` keys: layers the user keeps float, reported as asked, and refused 16-bit requests.

The model: tokens -> Dense proj -> LayerNormalization ln -> Dense fc1 -> Dense fc2 -> pooling -> Dense head;
`ln` is kept float by its class, `fc2` by a pattern. What is float is read from the written file: `ln`, `fc2`,
and `gap`, which reads `fc2`'s float output (a one-op layer kept float has no output range: with one the
converter would run it in int8; docs/design.md).
"""

import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from qtoolkit import inspection, rewrite, schemes
from qtoolkit.errors import SchemeError, UnquantizableLayersError
from qtoolkit.prepare import prepare
from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.plan import plan

L = keras.layers
KEEP = {"float_types": ["LayerNormalization"], "float_pattern": "f.2"}


def _tokens_model():
    inp = keras.Input((8, 12), name="tokens")
    x = L.Dense(16, name="proj")(inp)
    x = L.LayerNormalization(name="ln")(x)
    x = L.Dense(16, activation="relu", name="fc1")(x)
    x = L.Dense(16, name="fc2")(x)
    return keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling1D(name="gap")(x)), name="tokens_net")


def _scheme(**layers):
    return schemes.load("int8").replace(activations={"method": "minmax"}, layers=layers)


@pytest.mark.parametrize("layers, fragments", [
    ({"float_pattern": "fc["}, ["layers.float_pattern", "'fc['", "not a valid regular expression"]),
    ({"float_names": "fc1"}, ["layers.float_names", "must be a list", "got 'fc1'"]),
    ({"float_types": [3]}, ["layers.float_types", "must be a list"]),
    ({"float_layer": ["fc1"]}, ["unknown key layers.float_layer", "layers.float_names"]),
    ({"int16_names": ["fc1"]}, ["layers.int16_names", "not available", "keep these layers float", "int16x8"]),
    ({"int16_types": ["Dense"]}, ["layers.int16_types", "LiteRT computes as zeros"]),
])
def test_bad_layer_keys_are_one_error_naming_the_key(layers, fragments):
    with pytest.raises(SchemeError) as e:
        _scheme(**layers)
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_layer_keys_need_the_int8_rewrite_and_round_trip(tmp_path):
    with pytest.raises(SchemeError, match="layers.float_.*int16x8"):
        schemes.load("int16x8").replace(layers={"float_names": ["fc1"]})
    s = _scheme(**KEEP)
    assert s.layers.float_types == ("LayerNormalization",) and s.layers.float_pattern == "f.2"
    path = tmp_path / "keep.yaml"
    path.write_text(s.to_yaml())
    assert schemes.load(str(path)) == s


def test_a_value_that_matches_no_layer_is_an_error_naming_it_and_the_layers():
    flat = g.flatten(_tokens_model())
    with pytest.raises(SchemeError) as e:
        plan(flat, _scheme(float_names=["fc9"], float_types=["LayerNormalization", "Conv2D"]))
    message = str(e.value)
    assert "layers.float_names fc9" in message and "layers.float_types Conv2D" in message
    assert "LayerNormalization" not in message.split("matches no layer")[0]  # ln exists: not reported
    assert "fc1 (Dense)" in message and "ln (LayerNormalization)" in message


def test_requested_layers_are_float_steps_that_nothing_absorbs():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, L.ReLU(name="relu")(x))
    steps = plan(g.flatten(model), _scheme(float_names=["bn"]))
    kinds = {s.node.name: (s.kind, s.requested, [a.name for a in s.absorbed]) for s in steps}
    assert kinds["conv"] == ("fused", None, [])  # the batch norm is not folded into the conv
    assert kinds["bn"] == ("float", "layers.float_names bn", [])
    rw = rewrite.rewrite(model, _scheme(float_names=["bn"]))
    assert rw.requested_float == {"bn": "layers.float_names bn"}


@pytest.fixture(scope="module")
def kept():
    """The model prepared with `ln` and `fc2` kept float, and its PTQ result (one conversion)."""
    x = np.random.default_rng(0).normal(size=(48, 8, 12)).astype(np.float32)
    prepared = prepare(_tokens_model(), x, _scheme(**KEEP), num_verification_samples=16, progress=False)
    return prepared, qtoolkit.ptq(prepared, progress=False)


def test_the_file_has_exactly_the_requested_float_ops_and_the_report_names_them(kept):
    _, result = kept
    facts = inspection.inspect(result.tflite)
    assert facts.float_ops and result.float_layers == ("ln", "fc2", "gap")  # read from the file
    assert set(inspection.float_layers(facts, ["proj", "ln", "fc1", "fc2", "gap", "head"])) == {"ln", "fc2", "gap"}
    assert {w.name.split("/")[1]: w.dtype for w in facts.weights} == {
        "proj": "int8", "fc1": "int8", "fc2": "float32", "head": "int8"}
    assert result.requested_float == {"ln": "layers.float_types LayerNormalization",
                                      "fc2": "layers.float_pattern 'f.2'"}
    lines = result.float_report()
    assert lines == ["kept float as the scheme asks: ln (layers.float_types LayerNormalization), "
                     "fc2 (layers.float_pattern 'f.2')", "left in float (not asked by the scheme): gap"]
    assert lines[0] in result.notes and result.to_dict()["requested_float"] == result.requested_float
    assert result.comparisons["float vs TFLite"].sqnr_db > 20  # a sanity bound: random weights, 16 samples (24.7-26 dB)


def test_strict_still_fails_on_requested_float_layers_naming_the_key(kept):
    prepared, _ = kept
    with pytest.raises(UnquantizableLayersError) as e:
        qtoolkit.ptq(prepared, progress=False, strict=True)
    message = str(e.value)
    assert "--strict" in message and "ln (kept float by the scheme: layers.float_types LayerNormalization)" in message
    assert "fc2 (kept float by the scheme: layers.float_pattern 'f.2')" in message
    assert "gap (" not in message and "drop the scheme's layers.float_* keys or --strict" in message
