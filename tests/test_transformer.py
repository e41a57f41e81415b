"""Transformer layers as int8 ops: LayerNormalization, Dense on tokens, GELU (see docs/design.md).

Each lowering is checked against the float layer (the rewritten float twin computes the same function)
and against TFLite (the fake-quant simulation and the int8 file differ by at most the documented steps).
"""

import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from helpers import SIMULATION_GAP_STEPS, TWIN_ATOL, tflite_graph
from qtoolkit import export, rewrite, schemes, verify

L = keras.layers
INT8 = schemes.load("int8")


def _tokens(n=320, t=16, c=24, seed=0):
    """Token batches whose tokens differ in spread: some nearly constant (a LayerNorm's hard case)."""
    rng = np.random.default_rng(seed)
    spread = rng.choice([0.05, 0.3, 1.0], size=(n, t, 1))
    offset = rng.normal(0, 0.5, (n, t, 1))
    return (offset + spread * rng.normal(0, 1, (n, t, c))).astype(np.float32)


def _layernorm_model(epsilon=1e-3, center=True, scale=True, c=24, seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, c), name="tokens")
    ln = L.LayerNormalization(epsilon=epsilon, center=center, scale=scale, name="ln")
    model = keras.Model(inp, ln(inp), name="ln_model")
    rng = np.random.default_rng(seed)
    weights = []
    if scale:
        weights.append(rng.uniform(0.5, 2.0, c).astype(np.float32))
    if center:
        weights.append(rng.normal(0, 0.3, c).astype(np.float32))
    ln.set_weights(weights)
    return model


def _ops(data):
    _, ops, _ = tflite_graph(data)
    return [op["op_name"] for op in ops]


@pytest.mark.parametrize("epsilon,center,scale", [(1e-3, True, True), (1e-6, True, True), (1e-3, False, True),
                                                  (1e-3, True, False), (0.1, False, False)])
def test_layernorm_float_twin_matches_the_layer(epsilon, center, scale):
    model = _layernorm_model(epsilon, center, scale)
    result = rewrite.rewrite(model, INT8)
    assert result.float_layers == []
    x = _tokens(64)
    twin = result.float_model.predict(x, verbose=0)[0]
    np.testing.assert_allclose(twin, model.predict(x, verbose=0), atol=TWIN_ATOL, rtol=1e-4)
    # The mean and the centered values share the input's range; the L2 output's is TFLite's fixed one.
    assert result.quant_points == ["tokens_quant", "ln_mean_quant", "ln_centered_quant", "ln_quant"]
    assert result.fixed_points == ["ln_l2_quant"]
    assert {frozenset(t) for t in result.tied_points} == {frozenset(("tokens_quant", "ln_mean_quant")),
                                                          frozenset(("tokens_quant", "ln_centered_quant"))}


def test_layernorm_is_int8_l2_normalization_and_matches_its_simulation():
    model = _layernorm_model()
    x = _tokens()
    r = qtoolkit.ptq(model, x, "int8", progress=False)
    assert r.inspection.float_ops == [] and r.float_layers == ()
    ops = _ops(r.tflite)
    assert ops.count("L2_NORMALIZATION") == 1 and "RSQRT" not in ops, ops
    # The mean shares the input's range (times 1 + 1e-4: no exact ties), so the SUB is exact, and
    # L2_NORMALIZATION's int32 arithmetic matches the float division: the simulation is TFLite's.
    ranges = r.calibration.ranges
    assert ranges["ln_centered_quant"] == ranges["tokens_quant"]
    np.testing.assert_allclose(ranges["ln_mean_quant"], ranges["tokens_quant"], rtol=1e-6)
    assert r.comparisons["simulated vs TFLite"].max_error_steps <= SIMULATION_GAP_STEPS
    # Nearly constant tokens (spread 0.05 on a +-4 range) have a few codes each: both files are far from
    # float on them, the converter's RSQRT decomposition much further (measured: 9.0 vs 17.6 dB).
    converter = export.converter_ptq_tflite(model, lambda: ([x[i:i + 1]] for i in range(256)))
    reference = model.predict(x[256:], verbose=0)
    converter_db = verify.sqnr_db(reference, verify.LiteRTModel(converter).predict(x[256:]))
    assert r.comparisons["float vs TFLite"].sqnr_db > converter_db + 6.0, converter_db
