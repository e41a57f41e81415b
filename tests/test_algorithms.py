"""Cross-layer equalization, bias correction and AdaRound (qtoolkit.algorithms), each against a numpy reference."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import models
from helpers import random_inputs
from qtoolkit import datasets, rewrite, schemes, verify, zoo
from qtoolkit.algorithms import adaround, bias_correction, cle
from qtoolkit.pipeline import ptq
from qtoolkit.rewrite.layers import FoldedConv, activate, conv_op

L = keras.layers
FLOAT_ATOL = 1e-4  # float32 round-off of a rescaled chain of a few layers


def relu_chain(input_shape=(8, 8, 3)):
    """conv-BN-ReLU, depthwise-BN-ReLU, pointwise-ReLU, GAP, dense: every pair commutes with scaling."""
    inp = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(name="dw_relu")(x)
    x = L.Conv2D(6, 1, activation="relu", name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(4, name="logits")(x)
    model = models._randomize_bn(keras.Model(inp, out))
    # Unbalanced channels, as trained depthwise layers have them.
    dw = model.get_layer("dw")
    k, b = dw.get_weights()
    dw.set_weights([k * np.geomspace(0.02, 5.0, k.shape[2]).reshape(1, 1, -1, 1), b])
    return model


def _float(rw, x):
    return rw.float_model.predict(x, verbose=0)[0]


# ---- cross-layer equalization -------------------------------------------------------------------

def _forward(layers, x):
    """Numpy forward of a dense chain with ReLU between layers."""
    for i, (_, w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def test_cle_numpy_reference_keeps_function_and_balances_ranges():
    rng = np.random.default_rng(0)
    layers = [("dense", rng.normal(size=(5, 6)) * np.geomspace(0.01, 10, 6), rng.normal(size=6)),
              ("dense", rng.normal(size=(6, 4)), rng.normal(size=4)),
              ("dense", rng.normal(size=(4, 3)), rng.normal(size=3))]
    x = rng.normal(size=(50, 5))
    new, scales = cle.equalize_arrays(layers)
    np.testing.assert_allclose(_forward(new, x), _forward(layers, x), rtol=1e-9, atol=1e-9)
    for (k1, w1, _), (k2, w2, _) in zip(new, new[1:]):
        # Each pair's channel c: output range of layer i == input range of layer i+1.
        np.testing.assert_allclose(cle.output_ranges(k1, w1), cle.input_ranges(k2, w2), rtol=1e-6)
    assert all(np.ptp(np.log(s)) > 1 for s in scales[:1])  # the unbalanced layer really was rescaled


def _channel_error(layer):
    """Mean over output channels of the relative error of the per-tensor quantized kernel."""
    k, qk = layer.kernel.numpy(), layer.quantized_kernel().numpy()
    k, qk = k.reshape(-1, layer.units), qk.reshape(-1, layer.units)
    return float(np.mean(np.sum((qk - k) ** 2, 0) / np.sum(k ** 2, 0)))


def test_cle_on_model_keeps_float_function_and_shrinks_per_tensor_error():
    model = relu_chain()
    x = random_inputs(model, 64)
    rw = rewrite.rewrite(model, schemes.load("int8_per_tensor"))
    before_float = _float(rw, x)
    before_err = _channel_error(rw.model.get_layer("dw"))
    pairs = cle.find_pairs(rw.model)
    assert pairs == [("conv", "dw"), ("dw", "pw"), ("pw", "logits")]
    scales = cle.equalize(rw)
    assert set(scales) == {"conv", "dw", "pw"}
    np.testing.assert_allclose(_float(rw, x), before_float, atol=FLOAT_ATOL, rtol=1e-4)
    # Balanced ranges: the per-tensor depthwise grid now fits every channel.
    dw = rw.model.get_layer("dw").kernel.numpy()
    ranges = cle.output_ranges("depthwise", dw)
    assert ranges.max() / ranges.min() < 30
    assert _channel_error(rw.model.get_layer("dw")) < 0.2 * before_err


def test_cle_relu6_pairs_replaced_by_relu_or_skipped():
    model = models.conv_bn_relu((8, 8, 1))  # dw has ReLU6
    rw = rewrite.rewrite(model, schemes.load("int8_per_tensor"))
    assert ("dw", "pw") not in cle.find_pairs(rw.model, relu6="skip")
    assert ("dw", "pw") in cle.find_pairs(rw.model, relu6="relu")
    cle.equalize(rw, relu6="relu")
    assert rw.model.get_layer("dw").activation == "relu" and rw.float_model.get_layer("dw").activation == "relu"
    with pytest.raises(ValueError, match="relu6 must be one of relu, skip"):
        cle.find_pairs(rw.model, relu6="clip")


# ---- bias correction --------------------------------------------------------------------------------

def _pre_activation_shift(rw, x, quantized_inputs):
    """Per layer: mean over the data of the quantized layer's pre-activation (on the quantized or the
    float model's inputs) minus the float layer's (on float inputs), in numpy-checkable form."""
    out = {}
    for layer in rw.model.layers:
        if not isinstance(layer, FoldedConv):
            continue
        twin = rw.float_model.get_layer(layer.name)
        x_f = tf.constant(keras.Model(rw.float_model.inputs, twin.input).predict(x, verbose=0))
        x_q = tf.constant(keras.Model(rw.model.inputs, layer.input).predict(x, verbose=0)) if quantized_inputs \
            else x_f
        args = (layer.strides, layer.padding, layer.dilation_rate)
        q = tf.nn.bias_add(conv_op(layer.kind, x_q, layer.quantized_kernel(), *args), layer.bias)
        f = tf.nn.bias_add(conv_op(layer.kind, x_f, twin.kernel, *args), twin.bias)
        out[layer.name] = (tf.reduce_mean(tf.reshape(q, (-1, layer.units)), 0)
                           - tf.reduce_mean(tf.reshape(f, (-1, layer.units)), 0)).numpy()
    return out


def test_high_bias_absorption_moves_always_on_bias_into_the_next_layer_and_keeps_the_function():
    """Nagel et al. 2019, 4.1.1: a ReLU channel whose pre-activation stays above c = beta - 3|gamma|
    gives c to the next layer (W2 c in its bias); only channels with beta > 3|gamma| move."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    x = L.Conv2D(4, 1, use_bias=False, name="conv")(inp)
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    x = L.Conv2D(3, 1, name="pw")(x)  # no padding: absorption is exact for every value above c
    model = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(0).uniform(-1, 1, (64, 6, 6, 1)).astype(np.float32)
    # Batch-norm statistics of this data: standardized uniform inputs stay within +-1.74 sigma (> -3).
    pre = model.get_layer("conv")(data).numpy().reshape(-1, 4)
    beta, gamma = np.array([5.0, 0.2, 3.0, -1.0], np.float32), np.full(4, 0.5, np.float32)
    model.get_layer("bn").set_weights([gamma, beta, pre.mean(0), pre.var(0)])
    rw = rewrite.rewrite(model, schemes.load("int8_per_tensor"))
    before = _float(rw, data)
    pw_bias = rw.float_model.get_layer("pw").bias.numpy().copy()
    stats = bias_correction.batch_norm_stats(model, rw)
    moved = cle.absorb_high_bias(rw, stats)
    np.testing.assert_allclose(moved["conv"], np.maximum(0, beta - 3 * gamma), rtol=1e-6)  # channels 0 and 2
    kernel = rw.float_model.get_layer("pw").kernel.numpy()[0, 0]
    np.testing.assert_allclose(rw.float_model.get_layer("pw").bias.numpy() - pw_bias, moved["conv"] @ kernel,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rw.model.get_layer("conv").bias.numpy(), rw.float_model.get_layer("conv").bias.numpy())
    np.testing.assert_allclose(_float(rw, data), before, atol=FLOAT_ATOL)
    # Analytic bias correction after absorption sees the lowered means: E[relu(z - c)] = beta - c = 1.5
    # on the absorbing channels, as measured on the data (not beta, the mean before absorption).
    from qtoolkit import algorithms

    rw = rewrite.rewrite(model, schemes.load("int8_per_tensor"))
    report = algorithms.before_calibration(rw, schemes.Algorithms(high_bias_absorption=True), model)
    measured = keras.Model(rw.float_model.inputs, rw.float_model.get_layer("conv").output)(data).numpy()
    expected = bias_correction.expected_input(rw.float_model, "pw", report["_state"].bn_stats)
    np.testing.assert_allclose(expected[[0, 2]], measured.mean(axis=(0, 1, 2))[[0, 2]], atol=0.01)
    # Through the pipeline (scheme key), reported; the int8 model still matches float.
    scheme = schemes.load("int8_per_tensor").replace(algorithms={"high_bias_absorption": True})
    result = ptq(model, data, scheme, verification_data=data, progress=False)
    assert any("high_bias_absorption {'layers': 1, 'channels': 2" in n for n in result.notes), result.notes
    assert result.comparisons["float vs TFLite"].sqnr_db > 30


def _folded_depthwise_range_ratios(model):
    """Largest over smallest per-channel |weight| range of each depthwise kernel, as the rewriter folds it."""
    twin = rewrite.rewrite(model, schemes.load("int8")).float_model
    ranges = [cle.output_ranges("depthwise", layer.kernel.numpy()) for layer in twin.layers
              if isinstance(layer, FoldedConv) and layer.kind == "depthwise"]
    return [r.max() / r.min() for r in ranges]


def test_cle_rescues_per_tensor_weights_where_dead_channels_make_them_collapse():
    """The paper's per-tensor failure on a trained model (issue 7): dead channels' folded depthwise
    kernels are hundreds of times wider than the live ones'; plain per-tensor W8A8 collapses, and
    cross-layer equalization with bias correction brings it back within a point of float."""
    try:
        (x_train, _), (x_test, y_test) = datasets.load("fashion_mnist")
    except datasets.DatasetUnavailable as e:
        pytest.skip(str(e))
    model = zoo.load("mobilenet_v1_dead_fmnist")
    assert max(_folded_depthwise_range_ratios(model)) > 300
    x, y = x_test[:2000], y_test[:2000]
    float_acc = float(np.mean(model.predict(x, batch_size=500, verbose=0).argmax(1) == y))
    per_tensor = schemes.load("int8_per_tensor")
    recipes = {"plain": per_tensor,
               "cle+bc": per_tensor.replace(algorithms={"cle": True, "bias_correction": "empirical"})}
    results = {name: ptq(model, x_train[:500], s, verification_data=x, labels=y, num_verification_samples=len(x),
                         progress=False).comparisons["float vs TFLite"].candidate_accuracy
               for name, s in recipes.items()}
    assert results["plain"] < float_acc - 0.3, (float_acc, results)  # collapsed (measured: 91.9% -> ~29%)
    assert results["cle+bc"] > float_acc - 0.01, (float_acc, results)


@pytest.mark.parametrize("quantized_inputs", [True, False])
def test_empirical_bias_correction_zeroes_mean_shift_on_calibration_set(quantized_inputs):
    keras.utils.set_random_seed(0)  # weights independent of what earlier tests drew
    model = relu_chain()
    x = random_inputs(model, 64)
    rw = rewrite.rewrite(model, schemes.load("w4a8"))  # 4-bit weights: a clear shift
    before = _pre_activation_shift(rw, x, quantized_inputs)
    assert max(np.abs(v).max() for v in before.values()) > 1e-3
    shifts = bias_correction.correct_empirical(rw, [x], batch_size=16, quantized_inputs=quantized_inputs)
    after = _pre_activation_shift(rw, x, quantized_inputs)
    assert set(shifts) == set(before)
    for name in before:
        np.testing.assert_allclose(after[name], 0.0, atol=1e-5)
    if not quantized_inputs:  # the paper's weight-only shift E[(W~ - W) x], independent of other layers
        for name in before:
            np.testing.assert_allclose(shifts[name], before[name], atol=1e-5)


def test_relu_mean_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-1.0, 0.0, 2.0, 7.0]), np.array([0.5, 1.0, 3.0, 2.0])
    z = rng.normal(mu, sigma, size=(400000, 4))
    np.testing.assert_allclose(bias_correction.relu_mean(mu, sigma), np.maximum(z, 0).mean(0), atol=0.02)
    np.testing.assert_allclose(bias_correction.relu_mean(mu, sigma, 6.0), np.clip(z, 0, 6).mean(0), atol=0.02)


def test_analytic_bias_correction_uses_batch_norm_statistics():
    model = relu_chain()
    rw = rewrite.rewrite(model, schemes.load("w4a8"))
    stats = bias_correction.batch_norm_stats(model, rw)
    assert set(stats) == {"conv", "dw"}
    bn = model.get_layer("bn")
    np.testing.assert_allclose(stats["conv"][0], bn.beta.numpy())
    b0 = rw.model.get_layer("dw").bias.numpy()
    shifts = bias_correction.correct_analytic(rw, stats)
    assert set(shifts) == {"dw", "pw"}  # the layers fed by a batch-normed layer
    np.testing.assert_allclose(rw.model.get_layer("dw").bias.numpy(), b0 - shifts["dw"])
    # The dw shift, by hand: sum over the kernel window of (W~ - W) times E[relu(N(beta, gamma^2))].
    err = bias_correction.weight_error(rw.model.get_layer("dw"))
    ex = bias_correction.relu_mean(*stats["conv"])
    np.testing.assert_allclose(shifts["dw"], err.sum(axis=(0, 1))[:, 0] * ex, rtol=1e-5, atol=1e-7)


# ---- AdaRound ---------------------------------------------------------------------------------------

def test_adaround_within_one_step_and_lowers_reconstruction_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 6)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    x = (rng.normal(size=(256, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)  # correlated, as real inputs
    qmax = 7
    scale = (np.abs(w).max(0) / qmax).astype(np.float32)
    y = np.maximum(x @ w + b, 0)
    # All 256 samples in every step: deterministic (with 32 per step the error over 20 seeds was 0.383 +- 0.004,
    # and 0.379 +- 0.005 with the loop before issue 23; single seeds range 0.35-0.42).
    codes = adaround.round_layer("dense", w, b, scale, -qmax, qmax, x, y, "relu", iterations=400, batch_size=256)
    assert np.all(codes == np.round(codes)) and codes.min() >= -qmax and codes.max() <= qmax
    assert np.all(np.abs(codes - w / scale) < 1.0 + 1e-5)  # floor or ceil of the float weight
    nearest = np.clip(np.round(w / scale), -qmax, qmax)
    assert np.mean(codes != nearest) > 0.01  # it really chose differently somewhere
    error = lambda c: np.mean((np.maximum(x @ (c * scale) + b, 0) - y) ** 2)  # noqa: E731
    assert error(codes) < 0.9 * error(nearest)  # measured: 0.341 vs 0.440


def test_rectified_sigmoid_init_starts_at_float_weight():
    rest = np.array([0.05, 0.3, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(adaround.rectified_sigmoid(adaround.init_v(rest)).numpy(), rest, atol=1e-5)


def _filters(data):
    """name -> int8 values of every constant int8 4-D tensor of a flatbuffer (conv filters, OHWI)."""
    interp = verify.LiteRTModel(data).interpreter
    out = {}
    for t in interp.get_tensor_details():
        if t["dtype"] == np.int8 and len(t["shape"]) == 4:
            try:
                out[t["name"]] = (interp.get_tensor(t["index"]), t["quantization_parameters"]["scales"])
            except ValueError:
                pass  # activations
    return out


@pytest.mark.parametrize("base", [pytest.param("w4a8", marks=pytest.mark.slow), "int8"])
def test_adaround_weights_survive_export_and_ops_unchanged(base):
    model = relu_chain((8, 8, 1))
    x = random_inputs(model, 96, low=0.0, high=1.0)
    plain = ptq(model, x, base, num_calibration_samples=64, progress=False)
    s = schemes.load(base).replace(algorithms={"cle": True, "adaround": True, "adaround_iterations": 30,
                                               "bias_correction": "empirical"})
    rw_codes = {}
    original = adaround.adaround

    def spy(rewritten, inputs, *args, **kwargs):
        times = original(rewritten, inputs, *args, **kwargs)
        for layer in rewritten.model.layers:
            if isinstance(layer, FoldedConv) and layer.kind != "dense":
                scale, _, _ = adaround.grid_of(layer)
                rw_codes[layer.name] = layer.kernel.numpy() / scale
        return times

    adaround.adaround = spy
    try:
        result = ptq(model, x, s, num_calibration_samples=64, progress=False)
    finally:
        adaround.adaround = original
    assert result.inspection.ops == plain.inspection.ops
    assert any("adaround" in n for n in result.notes)
    assert set(rw_codes) == {"conv", "dw", "pw"}
    exported = _filters(result.tflite)
    for name, codes in rw_codes.items():
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # on the grid
        codes = np.round(codes).astype(np.int8)
        # TFLite filters: conv OHWI (kernel HWIO), depthwise 1HW(I*M) (kernel HWIM).
        want = codes.reshape(1, *codes.shape[:2], -1) if name == "dw" else np.transpose(codes, (3, 0, 1, 2))
        matches = [v for v, _ in exported.values() if v.shape == want.shape and np.array_equal(v, want)]
        assert matches, f"{name}: exported int8 weights differ from the AdaRound codes"


def test_schemes_validate_algorithm_keys():
    s = schemes.load("w4a8_adaround")
    assert s.algorithms.adaround and s.algorithms.cle and s.algorithms.cle_relu6 == "skip"
    m = schemes.load("int8_max_accuracy")
    assert m.weights.bits == 8 and m.algorithms.cle and m.algorithms.adaround
    assert schemes.QuantScheme.from_dict(s.to_dict()) == s
    base = schemes.load("int8").to_dict()
    for key, value, fragment in [("bias_correction", "always", "algorithms.bias_correction must be one of none"),
                                 ("cle", "yes", "algorithms.cle must be bool"),
                                 ("adaround_iterations", 0, "adaround_iterations must be from 1"),
                                 ("cle_relu6", "clip", "cle_relu6 must be one of relu, skip"),
                                 ("adaround_steps", 10, "unknown key algorithms.adaround_steps")]:
        with pytest.raises(schemes.SchemeError, match=fragment):
            schemes.QuantScheme.from_dict({**base, "algorithms": {key: value}}, source="x.yaml")
    with pytest.raises(schemes.SchemeError, match="weight-only or int16x8"):
        schemes.load("weight_only_int8").replace(algorithms={"cle": True})


def test_cli_flags_override_scheme_algorithms(tmp_path, capsys):
    from absl.testing import flagsaver

    from qtoolkit import convert

    model = models.conv_bn_relu((8, 8, 1))
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).uniform(0, 1, (60, 8, 8, 1)).astype(np.float32))
    common = {"model": str(tmp_path / "m.keras"), "output": str(tmp_path / "m.tflite"),
              "calibration_data": str(tmp_path / "c.npy")}
    with flagsaver.flagsaver(**common, scheme="int8_per_tensor", cle=True, bias_correction="analytic"):
        assert convert.main(["convert"]) == 0
    printed = capsys.readouterr().out
    assert "algorithms: cle {'pairs': 3" in printed and "'kind': 'analytic'" in printed
    with flagsaver.flagsaver(**{**common, "output": str(tmp_path / "w.tflite")}, scheme="weight_only_int8",
                             adaround=True):
        assert convert.main(["convert"]) == 1
    assert "do not apply to weight-only or int16x8 schemes" in capsys.readouterr().err
    assert not (tmp_path / "w.tflite").exists()
