"""Sequence layers as int8 ops: Embedding (GATHER), LSTM and GRU unrolled into int8 cell ops (recurrent.py).

Each lowering is checked against the float layer (the rewritten float twin computes the same function)
and against TFLite (fully integer, the simulation within a few steps of the int8 file).
"""

import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from helpers import SIMULATION_GAP_STEPS, TWIN_ATOL, tflite_graph
from qtoolkit import rewrite, runtime, schemes

L = keras.layers
INT8 = schemes.load("int8")


def _rnn_model(kind, return_sequences=False, use_bias=True, steps=6, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((steps, 8), name="frames")
    h = L.Conv1D(12, 3, padding="same", activation="relu", name="conv")(inp)
    h = getattr(L, kind)(10, return_sequences=return_sequences, use_bias=use_bias, name="rnn")(h)
    if return_sequences:
        h = L.GlobalAveragePooling1D(name="gap")(h)
    model = keras.Model(inp, L.Dense(4, name="fc")(h))
    # Non-zero biases (a fresh layer's are zero but for the LSTM's forget gate).
    layer = model.get_layer("rnn")
    rng = np.random.default_rng(seed)
    layer.set_weights([w + (rng.normal(0, 0.3, w.shape) if w.ndim != 2 else 0) for w in layer.get_weights()])
    return model


def _x(n=96, steps=6, seed=1):
    return np.random.default_rng(seed).normal(size=(n, steps, 8)).astype(np.float32)


@pytest.mark.parametrize("kind,return_sequences,use_bias", [
    pytest.param("LSTM", False, True, marks=pytest.mark.slow), ("LSTM", True, False),
    pytest.param("GRU", False, True, marks=pytest.mark.slow),
    pytest.param("GRU", True, True, marks=pytest.mark.slow)])
def test_recurrent_float_twin_matches_the_layer(kind, return_sequences, use_bias):
    model = _rnn_model(kind, return_sequences, use_bias)
    result = rewrite.rewrite(model, INT8)
    assert result.float_layers == []
    x = _x()
    twin = result.float_model.predict(x, verbose=0)[0]
    np.testing.assert_allclose(twin, model.predict(x, verbose=0), atol=TWIN_ATOL, rtol=1e-4)


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_is_fully_int8(kind):
    model = _rnn_model(kind, return_sequences=True)
    r = qtoolkit.ptq(model, _x(160), "int8", progress=False)
    assert r.inspection.float_ops == [] and r.float_layers == ()
    ops = {op["op_name"] for op in tflite_graph(r.tflite)[1]}
    assert {"FULLY_CONNECTED", "LOGISTIC", "TANH", "MUL", "ADD"} <= ops and "DEQUANTIZE" not in ops, ops
    # No shrinking STRIDED_SLICE, no SPLIT_V: XNNPACK takes the slices and splits of the unrolled cell
    # (recurrent.py); here it leaves the returned sequence's PACK (and in the GRU one ADD) to LiteRT.
    assert not {op for op, _ in runtime.delegation(r.tflite).outside} & {"STRIDED_SLICE", "SPLIT_V", "SPLIT"}
    # Per-step roundings of the int8 cell ops (LOGISTIC/TANH tables vs tf.sigmoid) stay a few output steps.
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= 4.0
    assert r.comparisons["float vs TFLite"].sqnr_db > 25.0


def test_recurrent_without_static_steps_is_a_one_line_error():
    inp = keras.Input((None, 8))
    model = keras.Model(inp, L.LSTM(4, name="rnn")(inp))
    with pytest.raises(ValueError, match="rnn .*LSTM.*time steps is not static"):
        rewrite.rewrite(model, INT8)


def test_embedding_text_classifier_is_fully_int8():
    keras.utils.set_random_seed(0)
    inp = keras.Input((32,), dtype="int32", name="tokens")
    h = L.Embedding(50, 16, name="emb")(inp)
    h = L.Conv1D(16, 3, padding="same", activation="relu", name="conv")(h)
    model = keras.Model(inp, L.Dense(4, name="fc")(L.GlobalAveragePooling1D(name="gap")(h)))
    emb = model.get_layer("emb")
    emb.set_weights([np.random.default_rng(0).normal(0, 1, (50, 16)).astype(np.float32)])
    tokens = np.random.default_rng(1).integers(0, 50, (160, 32)).astype(np.int32)
    r = qtoolkit.ptq(model, tokens, "int8", progress=False)
    assert r.inspection.float_ops == [] and r.float_layers == ()
    _, ops, tensors = tflite_graph(r.tflite)
    gather = next(op for op in ops if op["op_name"] == "GATHER")
    assert tensors[gather["inputs"][0]]["dtype"] == np.int8  # the table, per tensor, on the output's grid
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= SIMULATION_GAP_STEPS
